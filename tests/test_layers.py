"""The package's layers: each module imports only modules of its own layer or below, and the
imports between modules form no cycle (docs/contributing.md, Layout). A new module gets a layer here."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "powerinfer_attn"

LAYERS = {
    # 0: building the library, pure helpers that import nothing of ours but the build
    "__init__": 0, "build": 0, "kernels": 0, "text": 0, "sampling": 0,
    # 1: the bindings and the C API's constants; the model files
    "bindings": 1, "model": 1,
    # 2: decode with masks and predictor files
    "engine": 2,
    # 3: predictors, fills, importance, the predictor file, the numpy references, retrieval heads
    "importance": 3, "fill": 3, "predictor_file": 3, "predictors": 3, "reference": 3, "retrieval": 3,
    # 4: training and evaluation
    "collect": 4, "train": 4, "compare": 4, "needle": 4, "profile": 4, "bench": 4,
    "sparsify": 4, "serve": 4, "bench_serve": 4, "lm_eval_offline": 4, "ruler": 4,
    "corpus": 4, "diagnose": 4, "prepare": 4,
    # 5: the command line
    "cli": 5,
}


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (top level, in functions,
    under TYPE_CHECKING)."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:  # from . import x, y
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("powerinfer_attn"):
            rest = node.module.split(".")[1:]
            out.update(rest[:1] or [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names
                       if a.name.startswith("powerinfer_attn.") and a.name.count(".") >= 1)
    out.discard(module)
    return out


def _modules() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py"))


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if m not in LAYERS]
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"
    gone = [m for m in LAYERS if not (PKG / f"{m}.py").is_file()]
    assert not gone, f"layers name modules that do not exist: {gone}"


def test_imports_only_lean_downward():
    bad = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
           for m in _modules() for d in sorted(_imports(m)) if LAYERS[d] > LAYERS[m]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: _imports(m) for m in _modules()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_cycle_finder_finds_one(tmp_path, monkeypatch):
    # the check above must be able to fail: a two-module circle is reported
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    assert _imports("a") == {"b"} and _imports("b") == {"a"}
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: ["a", "b"])
    with pytest.raises(pytest.fail.Exception, match="import cycle: a -> b -> a"):
        test_no_import_cycle()


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone(module):
    # each module imports in a fresh interpreter with nothing imported before it
    r = subprocess.run([sys.executable, "-c", f"import powerinfer_attn.{module}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
