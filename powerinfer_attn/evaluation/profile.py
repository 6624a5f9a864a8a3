"""Where a decode step's time goes, op by op, and the best ratio head sparsity can reach.

The profile times every node of the decode graph through llama.cpp's eval callback: asking
for every node makes the scheduler compute the graph one node at a time, and the time from
one callback to the next is that node's compute plus a fixed cost of running a one-node
graph. That fixed cost is estimated as (sum of node times - plain step time) / nodes and
taken off every node, so the corrected parts add up to the plain step.

Nodes are grouped into parts by their graph name and op (``Qcur`` MUL_MAT is ``wq``,
``attn_out`` MUL_MAT is ``wo``, ...). Head sparsity can skip the parts in ``SKIPPABLE``;
with share ``s`` of the step in them, keeping a fraction ``d`` of the heads can at best
give ``1 / ((1 - s) + s * d)`` times the dense speed (Amdahl).
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time

from ..engine.decode import Engine, TensorHook

SKIPPABLE = ("wq", "kq", "softmax", "kqv", "wo", "flash_attn")

_MATMUL_PARTS = {
    "Qcur": "wq", "Kcur": "wk", "Vcur": "wv", "kq": "kq", "kqv": "kqv", "attn_out": "wo",
    "ffn_gate": "ffn", "ffn_up": "ffn", "ffn_out": "ffn", "ffn_down": "ffn", "result_output": "output",
}


def part_of(name: str, op: str) -> str:
    """The part of the step a graph node belongs to, from its name (``kq-12``) and op."""
    base = re.sub(r" \(.*", "", name)      # "Qcur-3 (view) (permuted)" -> "Qcur-3"
    base = re.sub(r"-\d+$", "", base)       # per-layer suffix
    if op in ("MUL_MAT", "MUL_MAT_SPARSE_ATTN"):
        return _MATMUL_PARTS.get(base, "other")
    if op == "SOFT_MAX":
        return "softmax"
    if op == "FLASH_ATTN_EXT":
        return "flash_attn"
    if op in ("KV_PAGE_BOUNDS", "KV_PAGE_SELECT"):
        return "pages"  # the token budget's page bounds and selection
    return "other"


class NodeTimer(TensorHook):
    """Records (name, op, seconds) for every graph node while ``enabled``."""

    wants_data = False

    def __init__(self):
        self.enabled = False
        self.records: list[tuple[str, str, float]] = []
        self._last = 0.0
        self._op_desc = None

    def wants(self, name: str) -> bool:
        return self.enabled

    def start(self) -> None:
        self.records.clear()
        self._last = time.perf_counter()

    def node(self, lib, t) -> None:
        now = time.perf_counter()
        if self._op_desc is None:
            lib.ggml_op_desc.argtypes, lib.ggml_op_desc.restype = [ctypes.c_void_p], ctypes.c_char_p
            self._op_desc = lib.ggml_op_desc
        self.records.append((lib.ggml_get_name(t).decode(), self._op_desc(t).decode(), now - self._last))
        self._last = time.perf_counter()  # the callback's own time is not charged to the next node


def profile_steps(eng: Engine, timer: NodeTimer, step, reps: int) -> dict:
    """Profile ``step()`` (one decode step, the cache restored after it) ``reps`` times.

    Returns per part the median milliseconds (corrected as the module docstring says), the
    plain step time (median of as many unprofiled steps) and the share of skippable parts.
    """
    if eng._hook is not timer:
        raise ValueError("the engine was not opened with this NodeTimer as its tensor hook")
    step()  # warm-up: the graph is built before anything is timed
    plain = statistics.median(_time(step) for _ in range(reps))
    per_part: dict[str, list[float]] = {}
    totals, nodes = [], 0
    timer.enabled = True
    try:
        for _ in range(reps):
            timer.start()
            step()
            sums: dict[str, float] = {}
            for name, op, dt in timer.records:
                p = part_of(name, op)
                sums[p] = sums.get(p, 0.0) + dt
            for p, v in sums.items():
                per_part.setdefault(p, []).append(v)
            totals.append(sum(dt for _, _, dt in timer.records))
            nodes = len(timer.records)
            counts = {}
            for name, op, _ in timer.records:
                p = part_of(name, op)
                counts[p] = counts.get(p, 0) + 1
    finally:
        timer.enabled = False
    overhead = max(0.0, (statistics.median(totals) - plain) / max(nodes, 1))
    parts_ms = {p: max(0.0, statistics.median(v) - overhead * counts[p]) * 1e3 for p, v in per_part.items()}
    total_ms = sum(parts_ms.values())
    skip_ms = sum(v for p, v in parts_ms.items() if p in SKIPPABLE)
    return {
        "step_ms": plain * 1e3,
        "profiled_step_ms": statistics.median(totals) * 1e3,
        "nodes": nodes,
        "node_overhead_us": overhead * 1e6,
        # corrected parts / plain step: far from 1 when the fixed per-node cost is not the same
        # for every node (many threads, where waking them dominates small ops): then the
        # shares are not to be trusted
        "accounted": total_ms / (plain * 1e3),
        "parts_ms": dict(sorted(parts_ms.items(), key=lambda kv: -kv[1])),
        "skippable_share": skip_ms / total_ms if total_ms > 0 else 0.0,
    }


def trustworthy(prof: dict, tolerance: float = 0.2) -> bool:
    """Whether the corrected parts of a profile add up to the plain step within ``tolerance``."""
    # results saved before "accounted" was recorded: the same ratio from their parts
    accounted = prof.get("accounted", sum(prof["parts_ms"].values()) / max(prof["step_ms"], 1e-9))
    return abs(accounted - 1.0) <= tolerance


def amdahl_limit(share: float, kept: float) -> float:
    """Best speed-up when a fraction ``kept`` of the skippable share ``share`` remains."""
    return 1.0 / ((1.0 - share) + share * kept)


def _time(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0
