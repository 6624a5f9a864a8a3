"""Where the sparse graph starts to pay: the context length from which sparse decode is faster
than the fastest stock configuration, per model and machine, as `bench` measured it. Below it,
``--sparse-min-ctx auto`` keeps decode on the stock graph (``Engine.set_sparse_min_ctx``).

The measurements live in one JSON file in the model cache, keyed by the model file, the CPU,
the thread count and the layers on the GPU; `bench` adds to it after each run."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from ..native.model import cache_dir

FILE = "crossover.json"
ENV = "POWERINFER_ATTN_CROSSOVER"  # another file than the cache's (the tests use one of their own)
# a row pays when it is at least this fast as stock (the bar for "never slower")
PAYS = 1.0


def machine_key(model_path, threads: int, n_gpu_layers: int = 0) -> str:
    """What a crossover depends on: the model file, this CPU, the threads, the layers on a GPU."""
    return f"{Path(model_path).name}|{_cpu_name()}|t{threads}|ngl{n_gpu_layers}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def crossover(rows: list[dict], kind: str) -> int | None:
    """The smallest measured depth from which every deeper measured row of ``kind`` ("trained":
    the in-graph predictor's rows; "fixed": the fixed-mask rows at density <= 0.75, the worst of
    them at each depth) pays; None when none was measured, and the deepest depth plus one when
    even that one does not pay."""
    by_depth: dict[int, float] = {}
    for r in rows:
        if r.get("ratio") is None:
            continue
        trained_row = r["mode"] == "trained"
        fixed_row = r["mode"] == "sparse" and r["density"] <= 0.75
        if (trained_row if kind == "trained" else fixed_row):
            d = int(r["ctx"])
            by_depth[d] = min(by_depth.get(d, float("inf")), float(r["ratio"]))
    if not by_depth:
        return None
    start = None
    for d in sorted(by_depth, reverse=True):
        if by_depth[d] < PAYS:
            break
        start = d
    return start if start is not None else max(by_depth) + 1


def default_path() -> Path:
    return Path(os.environ[ENV]) if os.environ.get(ENV) else cache_dir() / FILE


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def store(result: dict, path: Path | None = None) -> dict | None:
    """Record what a `bench` result says (its rows at each depth, flash attention and cache as
    it chose them); returns the entry, or None when the run had no rows that tell."""
    path = path or default_path()
    entry = {kind: crossover(result["rows"], kind) for kind in ("trained", "fixed")}
    if entry["trained"] is None and entry["fixed"] is None:
        return None
    entry["depths"] = sorted({int(r["ctx"]) for r in result["rows"]})
    key = machine_key(result["model"], result["threads"], result.get("n_gpu_layers", 0))
    data = _load(path)
    old = data.get(key, {})
    # a run that measured only one kind keeps what an earlier run measured of the other
    data[key] = {k: (entry[k] if entry.get(k) is not None else old.get(k)) for k in ("trained", "fixed")} | {
        "depths": entry["depths"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data[key]


def lookup(model_path, threads: int, n_gpu_layers: int = 0, in_graph: bool = False,
           path: Path | None = None) -> int | None:
    """The measured crossover for this model and machine (the trained predictor's for an in-graph
    predictor, when measured; the fixed masks' otherwise); None when `bench` has not measured it."""
    entry = _load(path or default_path()).get(machine_key(model_path, threads, n_gpu_layers))
    if not entry:
        return None
    first = entry.get("trained") if in_graph else None
    return first if first is not None else entry.get("fixed")


def resolve(spec: str | int, model_path, threads: int, n_gpu_layers: int = 0, in_graph: bool = False,
            say=None) -> int:
    """``--sparse-min-ctx``: a number as it is; ``auto`` the measured crossover, or 0 (sparse at
    every length) with a note when there is none."""
    if isinstance(spec, int) or str(spec).isdigit():
        return int(spec)
    if spec != "auto":
        raise ValueError(f"--sparse-min-ctx takes auto or a number of tokens, not {spec!r}")
    found = lookup(model_path, threads, n_gpu_layers, in_graph)
    if found is None:
        if say:
            say(f"note: no crossover measured for {Path(model_path).name} at {threads} threads here: sparse at every "
                f"length (`bench -d 256,1024,4096,8192` measures it)")
        return 0
    return found
