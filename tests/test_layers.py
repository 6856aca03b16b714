"""The package reads bottom-up: each layer imports only the layers below it, with no import hidden in a function.

Layers (`RANKS` below): `modeling` (shipped beside the weights: torch, transformers, stdlib only) <- `groups`
<- `optim`, `slim` <- `export`, `distill`, `callbacks`, `resume` <- `config` <- `trainer`, `check` <- the package's
`__init__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_hesso"

# Rank of every top-level part of the package; a module may import only from parts of a lower rank, or from its
# own part.
RANKS = {
    "modeling": 0,
    "groups": 1,
    "optim": 2,
    "slim": 2,
    "export": 3,
    "distill": 3,  # the teacher and the distillation loss, used by HESSOConfig and the Trainer
    "callbacks": 3,  # the Trainer's callbacks (progress, selection diagnostics, console)
    "resume": 3,  # the checkpoint checks of a resumed Trainer run, and its frozen LoRA slices
    "config": 4,
    "trainer": 5,
    "check": 5,
}
TOP = 6  # hf_hesso/__init__.py


def _part(module: str) -> str | None:
    """`hf_hesso.optim.hesso` -> `optim`; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names a `from ... import ...` refers to (the module and, for `from pkg import sub`, the submodule)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """`(imported hf_hesso module, line, at module level)` for every import of the package in `path`."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    top_level = {id(n) for n in tree.body}
    # Imports under `if TYPE_CHECKING:` / `try:` at module level count as module level.
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = _resolve(module, is_package, node)
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name == "hf_hesso" or name.startswith("hf_hesso."):
                out.append((name, node.lineno, id(node) in top_level))
    return out


def _existing(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = [(n, line, top) for n, line, top in _imports(path) if _existing(n)]
    return graph


def layer_violations(graph) -> list[str]:
    problems = []
    for module, imports in graph.items():
        part = _part(module)
        rank = TOP if part is None else RANKS.get(part)
        if rank is None:
            problems.append(f"{module}: part {part!r} has no layer; add it to RANKS in tests/test_layers.py")
            continue
        for name, line, top in imports:
            target = _part(name)
            if not top:
                problems.append(f"{module}:{line} imports {name} inside a function or class")
            if target is None or target == part:
                if target is None and part is not None:
                    problems.append(f"{module}:{line} imports the package root `hf_hesso` (an upward import)")
                continue
            if target not in RANKS:
                problems.append(f"{module}:{line} imports {name}: part {target!r} has no layer in RANKS")
            elif RANKS[target] >= rank:
                problems.append(f"{module}:{line} imports {name}: `{target}` is not below `{part}`")
    return problems


def cycles(graph) -> list[list[str]]:
    edges = {m: {n for n, _, _ in imps if n in graph and n != m} for m, imps in graph.items()}
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])
    return found


def test_ranks_name_the_package_parts():
    """Every part the table ranks is a module or subpackage of hf_hesso, and every part has a rank."""
    parts = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    parts |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert set(RANKS) == parts


def test_layers_point_one_way():
    graph = import_graph()
    assert "hf_hesso.optim.hesso" in graph and "hf_hesso.export.save" in graph  # the scan sees the package
    assert layer_violations(graph) == []


def test_no_import_cycle():
    # Module-level cycles inside one layer would still make import order matter.
    assert cycles(import_graph()) == []


def test_modeling_imports_only_torch_transformers_and_stdlib():
    """The modeling files travel beside the weights: nothing else may be imported there."""
    import sys

    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for path in (PACKAGE / "modeling").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name}:{node.lineno} imports {roots}"


@pytest.mark.parametrize(
    "module, imports, expected",
    [
        ("hf_hesso.groups.rules", [("hf_hesso.slim.core", 3, True)], "`slim` is not below `groups`"),
        ("hf_hesso.optim.hesso", [("hf_hesso.slim.core", 3, True)], "`slim` is not below `optim`"),
        ("hf_hesso.slim.core", [("hf_hesso.groups.rules", 9, False)], "inside a function"),
        ("hf_hesso.modeling.architectures", [("hf_hesso", 1, True)], "package root"),
    ],
)
def test_checker_catches_wrong_arrows(module, imports, expected):
    """The checker itself flags an upward arrow, a sideways one, a hidden import and a root import."""
    problems = layer_violations({module: imports})
    assert len(problems) == 1 and expected in problems[0]


def test_checker_finds_a_cycle():
    graph = {"hf_hesso.a.x": [("hf_hesso.a.y", 1, True)], "hf_hesso.a.y": [("hf_hesso.a.x", 1, True)]}
    assert cycles(graph) and set(cycles(graph)[0]) == {"hf_hesso.a.x", "hf_hesso.a.y"}


PUBLIC = {
    "hf_hesso.export": {"ConcurrentSaveError", "GgufExport", "SavedSlim", "export_gguf", "save_slim"},
    "hf_hesso.modeling": {"register_auto_classes"},
    "hf_hesso.optim": {"CRIC", "CRITERIA", "HESSO", "Schedule"},
    "hf_hesso.slim": {
        "SlimAdapters",
        "SlimSummary",
        "current_layer_shapes",
        "gather_full_model",
        "merge_and_slim",
        "slim_copy",
        "slim_model",
        "slim_with_adapters",
        "to_stock",
    },
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_subpackages_export_only_public_names(package):
    """A subpackage's `__init__` names its public API only; the plumbing is imported from its module."""
    import importlib

    module = importlib.import_module(package)
    assert set(module.__all__) == PUBLIC[package]
    public = {n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, type(module))}
    # Nothing else is importable from the package (the names its own body needs, like `transformers`, aside).
    assert public - PUBLIC[package] <= {"annotations", "transformers", "HESSO_CONFIGS", "HESSO_MODELS"}, public
    for plumbing in ("atomic_save", "recover", "owned_files", "keep_plan", "check_materialized", "saliency_scores"):
        assert not hasattr(module, plumbing), (package, plumbing)
