"""Where sparse decode starts to pay (engine/crossover.py): from bench rows to the position
``--sparse-min-ctx auto`` switches at, stored per model and machine."""

import pytest

from powerinfer_attn.engine import crossover


def _rows(ratios, mode="sparse", density=0.5):
    return [{"ctx": c, "mode": mode, "density": density, "ratio": r} for c, r in ratios.items()] + \
        [{"ctx": c, "mode": "dense", "density": 1.0, "ratio": None} for c in ratios]


def test_crossover_is_the_first_depth_from_which_every_deeper_row_pays():
    assert crossover.crossover(_rows({256: 0.9, 1024: 1.02, 4096: 1.3}), "fixed") == 1024
    # a dip deeper down moves it past the dip
    assert crossover.crossover(_rows({256: 1.1, 1024: 0.97, 4096: 1.3}), "fixed") == 4096
    assert crossover.crossover(_rows({256: 0.9, 1024: 0.95}), "fixed") == 1025  # never paid
    assert crossover.crossover(_rows({256: 1.2}), "trained") is None  # no trained rows
    # at a depth the worst fixed density decides; densities above 0.75 do not count
    rows = _rows({1024: 1.1}, density=0.5) + _rows({1024: 0.9}, density=0.25) + _rows({1024: 0.5}, density=1.0)
    assert crossover.crossover(rows, "fixed") == 1025


def test_store_lookup_resolve(tmp_path, monkeypatch):
    f = tmp_path / "c.json"
    res = {"model": "/m/x.gguf", "threads": 2, "n_gpu_layers": 0,
           "rows": _rows({256: 0.9, 1024: 1.1}) + _rows({256: 0.8, 1024: 0.9, 4096: 1.2}, mode="trained")}
    entry = crossover.store(res, f)
    assert entry == {"trained": 4096, "fixed": 1024, "depths": [256, 1024, 4096]}
    assert crossover.lookup("/other/x.gguf", 2, path=f) == 1024  # the file's name, not its folder
    assert crossover.lookup("/m/x.gguf", 2, in_graph=True, path=f) == 4096
    assert crossover.lookup("/m/x.gguf", 4, path=f) is None  # other thread count, other machine key
    # a later run with fixed masks only keeps the trained crossover measured before
    crossover.store({**res, "rows": _rows({256: 1.05})}, f)
    assert crossover.lookup("/m/x.gguf", 2, in_graph=True, path=f) == 4096
    assert crossover.lookup("/m/x.gguf", 2, path=f) == 256
    monkeypatch.setenv(crossover.ENV, str(tmp_path / "none.json"))
    said = []
    assert crossover.resolve("auto", "/m/x.gguf", 2, say=said.append) == 0 and "no crossover" in said[0]
    assert crossover.resolve("300", "/m/x.gguf", 2) == 300 and crossover.resolve(7, "/m/x.gguf", 2) == 7
    with pytest.raises(ValueError, match="auto or a number"):
        crossover.resolve("soon", "/m/x.gguf", 2)
