"""The package's layers are its folders (docs/contributing.md, Layout): a module imports only
modules of its own folder or of a lower layer, the imports form no cycle, and the layout table in
docs/contributing.md names exactly the modules each folder holds."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "powerinfer_attn"
CONTRIBUTING = PKG.parent / "docs" / "contributing.md"

LAYERS = {"native": 0, "engine": 1, "predictors": 2, "serving": 3, "evaluation": 4, "training": 5, "": 6}


def _name(path: Path) -> str:
    """``engine/decode.py`` -> ``engine.decode``; ``cli.py`` -> ``cli``; a package's ``__init__`` -> its folder."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def _modules() -> list[str]:
    return sorted(_name(p) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _folder(module: str) -> str:
    head = module.split(".")[0]
    return head if head in LAYERS and head else ""


def _layer(module: str) -> int:
    return LAYERS[_folder(module)]


def _resolve(module: str, level: int, target: str | None) -> str:
    """The absolute module name (without ``powerinfer_attn.``) of a relative import in ``module``."""
    path = (PKG / module.replace(".", "/")).with_suffix(".py")
    is_pkg = not path.is_file()
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if module == "__init__":
        base = []
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *(target.split(".") if target else [])])


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (top level, in functions,
    under TYPE_CHECKING), as names of this file's ``_modules()``."""
    path = (PKG / module.replace(".", "/")).with_suffix(".py")
    if not path.is_file():
        path = PKG / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    known = set(_modules())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(module, node.level, node.module)
            elif (node.module or "").startswith("powerinfer_attn"):
                base = node.module[len("powerinfer_attn."):] if "." in node.module else ""
            else:
                continue
            for a in node.names:
                full = f"{base}.{a.name}" if base else a.name
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("powerinfer_attn."):] for a in node.names if a.name.startswith("powerinfer_attn."))
    out.discard(module)
    out.discard("")
    return out


def test_every_module_is_in_a_layer_folder():
    stray = [m for m in _modules() if _folder(m) == "" and m not in ("cli", "__init__")]
    assert not stray, f"modules outside the layer folders (docs/contributing.md, Layout): {stray}"
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {f for f in LAYERS if f}, f"folders {sorted(folders)} against layers {sorted(LAYERS)}"


def test_imports_only_lean_downward():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m in _modules() for d in sorted(_imports(m)) if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: _imports(m) for m in _modules()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_layout_table_matches_the_tree():
    rows = re.findall(r"^\| (\d) \| (`(\w+)/`|\(top\)) \| ([^|]+) \|", CONTRIBUTING.read_text(), flags=re.M)
    assert len(rows) == len(LAYERS), f"docs/contributing.md's layout table has {len(rows)} rows"
    for layer, _, folder, mods in rows:
        assert LAYERS[folder] == int(layer), f"{folder or 'top'} is layer {LAYERS[folder]}, the table says {layer}"
        named = set(re.findall(r"`(\w+)\.py`", mods))
        here = {m.split(".")[-1] for m in _modules() if _folder(m) == folder and m != folder and m != "__init__"}
        assert named == here, f"{folder or 'top'}/: the table names {sorted(named)}, the folder holds {sorted(here)}"


def test_cycle_finder_finds_one(tmp_path, monkeypatch):
    # the check above must be able to fail: a two-module circle is reported
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "a.py").write_text("from .b import x\n")
    (tmp_path / "engine" / "b.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    assert _imports("engine.a") == {"engine.b"} and _imports("engine.b") == {"engine.a"}
    with pytest.raises(pytest.fail.Exception, match="import cycle: engine.a -> engine.b -> engine.a"):
        test_no_import_cycle()


def test_upward_import_is_found(tmp_path, monkeypatch):
    (tmp_path / "engine").mkdir()
    (tmp_path / "training").mkdir()
    (tmp_path / "engine" / "a.py").write_text("from ..training import b\n")
    (tmp_path / "training" / "b.py").write_text("x = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    with pytest.raises(AssertionError, match=r"engine.a \(layer 1\) imports training.b \(layer 5\)"):
        test_imports_only_lean_downward()


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone(module):
    # each module imports in a fresh interpreter with nothing imported before it
    target = "powerinfer_attn" if module == "__init__" else f"powerinfer_attn.{module}"
    r = subprocess.run([sys.executable, "-c", f"import {target}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
