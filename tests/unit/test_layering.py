"""The package's layout holds: no import cycle, no import running back up a layer, no test module imported.

Layers, lowest first: core (config, data, model loading, batch geometry, ...) < training (the step, the loop,
checkpoints, the run) < the task rooms, classify and lm (which never import each other) < preference (built on
lm) < plan and report (what a run will need, what it leaves; neither imports the other) < the entry modules at the
top (finetune-eval)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "finetune"
LAYERS = {"core": 0, "training": 1, "classify": 2, "lm": 2, "preference": 3, "plan": 4, "report": 4}
TOP = 5  # modules directly in finetune/ (entry points)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports (at module level or inside functions): absolute names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: -node.level + (path.name == "__init__.py")]
                base = ".".join([*package, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from finetune.core import config`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path, name) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] not in LAYERS:
        return "top", TOP
    room = parts[1]
    return room, LAYERS[room]


def test_no_module_imports_from_a_higher_layer_or_a_sibling_room():
    wrong = []
    for module, imported in graph().items():
        if module == "finetune":
            continue
        room, rank = layer(module)
        for target in imported:
            if target == "finetune" or target.count(".") == 1 and target.split(".")[1] in LAYERS:
                continue  # a package's own __init__ (empty)
            target_room, target_rank = layer(target)
            if target_rank > rank or (target_rank == rank and target_room != room):
                wrong.append(f"{module} ({room}) imports {target} ({target_room})")
    assert not wrong, "imports against the layering:\n  " + "\n  ".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_package_never_imports_tests_and_every_module_is_in_a_room():
    modules = graph()
    assert len(modules) > 30, "the walk found too few modules: is PACKAGE right?"
    for module, path in ((m, p) for m, p in ((module_name(p), p) for p in PACKAGE.rglob("*.py"))):
        imported = imports_of(path, module)
        assert not any(
            name == "tests" or name.startswith(("tests.", "test_", "conftest", "helpers")) for name in imported
        ), module
        if module.count(".") >= 2:
            assert module.split(".")[1] in LAYERS, f"{module} is in no known room: add it to LAYERS with its rank"
