"""Tokenized data, cached on disk: a second run with the same data, tokenizer and settings loads it (memory-mapped,
in a fraction of a second) instead of tokenizing again.

The key is a hash of the examples' content, the tokenizer (its vocabulary, normaliser, pre- and post-processor,
special tokens, chat template), the settings that change the result (max length, ...) and the source of the
module that tokenizes: a change to any of them is a new entry, never a stale one. Entries are written to a
temporary dir and renamed into place. The cache lives in `$FINETUNE_CACHE` (default `~/.cache/finetune`),
under `tokenized/`; delete it at will. `FINETUNE_CACHE=off` turns it off.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

CACHE_ENV = "FINETUNE_CACHE"
EXTRA_FILE = "finetune_extra.json"


def cache_root() -> Path | None:
    """Where tokenized data is cached; None when the cache is off."""
    value = os.environ.get(CACHE_ENV)
    if value and value.lower() in ("off", "0", "false", "none"):
        return None
    base = Path(value) if value else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "finetune"
    return base / "tokenized"


def content_hash(ds: Dataset) -> str:
    """A hash of the rows' values (not of how Arrow happens to lay them out), columns in order."""
    digest = hashlib.blake2b(digest_size=16)
    table = ds.with_format("arrow")[:]  # honours an indices mapping (a split, a shuffle)
    for name in table.column_names:
        digest.update(name.encode())
        digest.update(json.dumps(table.column(name).to_pylist(), ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the tokenizer's output; not of its truncation and padding state, which a fast
    tokenizer changes when it is called."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:  # a slow (Python) tokenizer: its vocabulary
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": tokenizer.chat_template,
        "init": {k: repr(v) for k, v in sorted(tokenizer.init_kwargs.items()) if k != "name_or_path"},
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cached_tokenization(
    examples: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: dict,
    tokenize: Callable[[], tuple[Dataset, dict]],
    code: Callable,
) -> tuple[Dataset, dict]:
    """`tokenize()` -> (tokenized dataset, JSON-able extra), or the cached result of an earlier run with the same
    `examples`, `tokenizer`, `settings` and source of `code`'s module."""
    root = cache_root()
    if root is None:
        return tokenize()
    source = Path(inspect.getsourcefile(code)).read_bytes()
    key = hashlib.blake2b(digest_size=16)
    for part in (content_hash(examples), tokenizer_hash(tokenizer), json.dumps(settings, sort_keys=True, default=str)):
        key.update(part.encode())
    key.update(source)
    entry = root / key.hexdigest()
    # EXTRA_FILE is written last: the entry is complete (one with no data file is an empty set an older version
    # saved unreadably: tokenized again, and left uncached).
    if (entry / EXTRA_FILE).is_file() and any(entry.glob("*.arrow")):
        return load_from_disk(str(entry)), json.loads((entry / EXTRA_FILE).read_text())
    tokenized, extra = tokenize()
    tmp = root / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    try:
        # datasets writes no shard at all for 0 rows, and then cannot load what it wrote: give it one.
        tokenized.save_to_disk(str(tmp), num_shards=None if len(tokenized) else 1)
        (tmp / EXTRA_FILE).write_text(json.dumps(extra))
        tmp.rename(entry)
    except OSError:  # a read-only or full disk, or another process won the race: the run goes on uncached
        shutil.rmtree(tmp, ignore_errors=True)
        return tokenized, extra
    return load_from_disk(str(entry)), extra
