"""The package's import graph: no cycle, and every module imports only from its own package or
from layers below it (docs/internals.md, "How the code is laid out", lists the same layers).

Imports are read from the source (module level and inside functions alike), so a cycle hidden
in a function-level import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

QAT = Path(__file__).resolve().parents[1] / "qat"

# bottom to top; a module may import its own package and anything in a lower layer
LAYERS = [
    ["qat.quant", "qat.deps", "qat.dist"],  # pure grid math, fake-quant Linear, wrapping, freeze; optional-dependency hints; rank helpers
    ["qat.recipe"],  # the schema
    ["qat.io"],  # models (one loader), run directory, final/ artifact, checkpoints
    ["qat.policy"],  # the recipe's quant / freeze / schedule / init_from applied to a model
    ["qat.data"],  # sources -> token blocks, batch and calibration plans, teacher-generated data
    ["qat.distill"],  # losses, teacher top-k cache
    ["qat.evaluate"],  # perplexity, per-layer error, lm-eval
    ["qat.train", "qat.ptq"],  # the consumers that write a run directory
    ["qat.export", "qat.analyze", "qat.compare"],  # consumers of runs
    ["qat.cli"],  # argparse and printing
    ["qat.__main__"],  # python -m qat
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(QAT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(mod: str, path: Path) -> str:
    return mod if path.name == "__init__.py" else mod.rpartition(".")[0]


def imports(path: Path) -> set[str]:
    """qat modules that ``path`` imports (``from .x import y`` resolves to ``x.y`` when that is a
    module, else ``x``)."""
    mod = module_name(path)
    pkg = package_of(mod, path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qat")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("qat"):
                target = node.module
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if (QAT.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (QAT.parent / sub.replace(".", "/") / "__init__.py").exists() else target)
    return found - {mod}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in QAT.rglob("*.py")}


def layer_of(mod: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(mod == g or mod.startswith(g + ".") for g in group):
            return i
    if mod == "qat":
        return -1
    raise AssertionError(f"{mod} is in no layer of tests/test_layers.py (add it, and to docs/internals.md)")


def test_every_module_has_a_layer():
    for mod in graph():
        layer_of(mod)


def test_no_import_cycle():
    g = graph()
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_imports_go_down_the_layers():
    def package(m: str) -> str:
        return ".".join(m.split(".")[:2])

    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if package(dep) != package(mod) and layer_of(dep) >= layer_of(mod):
                bad.append(f"{mod} -> {dep}")
    assert bad == [], "imports that go up or across a layer:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The checker itself: a planted two-module cycle is reported."""
    pkg = tmp_path / "qat"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from .y import g\n")
    (pkg / "a" / "y.py").write_text("from .x import f\n")
    monkeypatch.setattr(__import__(__name__), "QAT", pkg)
    g = graph()
    assert "qat.a.y" in g["qat.a.x"] and "qat.a.x" in g["qat.a.y"]
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "qat.a.x" in str(e)
    else:
        raise AssertionError("the planted cycle was not found")
