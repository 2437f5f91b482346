"""The stack holds: every import of every seechat module points down, no modules import in a cycle,
and only seechat.cli prints or parses argv.

The stack, bottom to top (docs/architecture.md):

    config, atomic      typed config; crash-safe writes (import no other seechat module)
    data                formats, processor, shards, scorer
    model               the stitched model, its builders and checkpoints
    infer  train  eval  (and estimate) peers; eval may import infer (it decodes through it)
    serve  mini         (and selfcheck) peers; applications of the layers below
    cli                 `seechat <verb>`: argparse, printing, exit codes

A module may import its own part (`seechat.model.*` from `seechat.model.*`), any part of a lower
layer, and a peer only along `PEER_ARROWS`. Imports are read with `ast`, at module level and
inside functions alike, `TYPE_CHECKING` blocks included: a lazy or type-only import is still an
arrow, and still a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seechat"

# The part of a module is its first name under seechat (seechat.model.checkpoint -> "model");
# modules directly under seechat are parts of their own (seechat.atomic -> "atomic"), and the
# package's own __init__ is "seechat".
LAYERS = {
    "seechat": 0,
    "config": 0,
    "atomic": 0,
    "data": 1,
    "model": 2,
    "infer": 3,
    "train": 3,
    "eval": 3,
    "estimate": 3,  # arithmetic about a training run: reads config and model sizes, like train
    "serve": 4,
    "mini": 4,
    "selfcheck": 4,  # an application of model + infer, like serve
    "cli": 5,
}
# Peers (same layer) that may import one another, one way only: evaluation decodes through the
# inference layer (generate, engine, image files); inference never scores.
PEER_ARROWS = {("eval", "infer")}

# Known exceptions (importer, imported), each with its reason in a comment; keep it empty.
ALLOWED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported seechat module
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str:
    """The seechat module an import of `name` loads: the longest prefix that is a module."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from seechat.cli import demo` loads the module seechat.cli.demo; `from seechat.model
            # import load` loads seechat.model
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
        for name in names:
            if name == "seechat" or name.startswith("seechat."):
                target = resolve(name)
                if target != module:
                    found.append(Import(module, target, where))
    return list(dict.fromkeys(found))  # `from x import a, b` is one arrow


IMPORTS = [i for m in MODULES for i in imports_of(m)]


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "seechat"


def test_every_module_has_a_layer():
    assert not sorted({part(m) for m in MODULES} - set(LAYERS)), "give the new part a layer in LAYERS"


def test_arrows_point_down():
    bad = []
    for imp in IMPORTS:
        a, b = part(imp.source), part(imp.target)
        if a == b or LAYERS[b] < LAYERS[a] or (a, b) in PEER_ARROWS or (imp.source, imp.target) in ALLOWED:
            continue
        how = "a peer" if LAYERS[a] == LAYERS[b] else "a higher layer"
        bad.append(f"{imp} ({a} -> {b}: {how})")
    assert not bad, "imports that point up the stack or sideways:\n" + "\n".join(bad)


def test_the_allow_list_is_still_needed():
    present = {(i.source, i.target) for i in IMPORTS}
    assert ALLOWED <= present, f"remove from ALLOWED: {sorted(ALLOWED - present)}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components with more than one module, i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        graph[imp.source].add(imp.target)
    cycles = strongly_connected(graph)
    lines = []
    for cycle in cycles:
        members = set(cycle)
        lines.append("cycle: " + ", ".join(cycle))
        lines += [f"  {i}" for i in IMPORTS if i.source in members and i.target in members]
    assert not cycles, "\n".join(lines)


@pytest.mark.parametrize(
    "source, target",
    [
        ("from seechat.infer.generate import generate", "seechat.infer.generate"),
        ("from seechat.model import load", "seechat.model"),
        ("from seechat.cli import demo", "seechat.cli.demo"),
        ("import seechat.data.images", "seechat.data.images"),
        ("from ..data import images", "seechat.data.images"),
        ("def f():\n    from seechat.eval.winrate import run_winrate", "seechat.eval.winrate"),
        ("if TYPE_CHECKING:\n    from seechat.train.loop import train", "seechat.train.loop"),
    ],
)
def test_the_reader_sees_every_kind_of_import(tmp_path, monkeypatch, source, target):
    """The checks above are only as good as the reader: it finds lazy, type-only and relative imports."""
    fake = PACKAGE / "infer" / "caption.py"  # any real module: its name anchors relative imports
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert [i.target for i in imports_of(module_name(fake))] == [target]


def test_the_library_never_prints_or_parses_argv():
    """Only seechat.cli talks to the terminal: the library takes Python values and returns results."""
    bad = []
    for module, path in MODULES.items():
        if part(module) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{where}: print()")
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    bad.append(f"{where}: imports argparse")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in ("argv", "exit")
                and getattr(node.value, "id", "") == "sys"
            ):
                bad.append(f"{where}: sys.{node.attr}")
    assert not bad, "the library must not print or parse argv (move it to seechat/cli):\n" + "\n".join(bad)
