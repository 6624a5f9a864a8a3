"""Per-kernel GPU time of a decode step at CTX tokens, dense and sparse at density 1 and 0.5
(GQA-group masks), on the GPU machine: scripts/gpu/run.sh profile NAME CTX. torch.profiler's
CUPTI tracing sees every kernel of the process, llama.cpp's too. Stock kernels that overlap
their predecessor (programmatic dependent launch on Hopper) are counted with the overlap, so
compare our kernels' times with the step's wall time, not with the stock kernels' sum."""
import sys
import numpy as np
import torch
from torch.profiler import profile, ProfilerActivity
from powerinfer_attn.engine.decode import Engine
from powerinfer_attn.evaluation.bench import _timed_step, heads_for_density

m, ctx = sys.argv[1], int(sys.argv[2])
toks = [int(t) for t in np.random.default_rng(0).integers(100, 30000, ctx + 1)]
with Engine(m, n_ctx=ctx + 16, n_threads=16, flash_attn=True, n_gpu_layers=99) as e:
    e.prefill(toks[:ctx])
    for mode in ("dense", "1", "0.5"):
        if mode != "dense":
            e.set_sparse(True)
            e.set_mask(heads_for_density(float(mode), e.n_layer, e.n_head, e.n_head_kv, True))
        for _ in range(5):
            _timed_step(e, toks[ctx], ctx)
        ts = [_timed_step(e, toks[ctx], ctx) for _ in range(10)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                _timed_step(e, toks[ctx], ctx)
        print(f"== {mode}: {1 / np.median(ts):.1f} tok/s; GPU time per step by kernel (us):")
        rows = sorted(prof.key_averages(), key=lambda r: -r.device_time_total)
        tot = sum(r.device_time_total for r in rows)
        print(f"   total {tot / 5:.0f}")
        for r in rows[:12]:
            print(f"   {r.device_time_total / 5:8.0f} {r.count // 5:5d}x  {r.key[:110]}")
