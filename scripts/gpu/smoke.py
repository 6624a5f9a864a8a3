"""A first check on a GPU machine: load a synthetic model with every layer on the GPU, decode
dense and sparse, and time steps (scripts/gpu/run.sh smoke [NAME])."""
import sys

import numpy as np

from powerinfer_attn.evaluation.bench import _timed_step
from powerinfer_attn.engine.decode import Engine


def timed(e, tok, n_past, n=20):
    """Median ms of n steps at the same position (bench's timed step: step, then roll back)."""
    return 1e3 * float(np.median([_timed_step(e, tok, n_past) for _ in range(n)]))


path = sys.argv[1]
for ngl in (0, 99):
    with Engine(path, n_ctx=2048, n_threads=4, flash_attn=True, n_gpu_layers=ngl) as e:
        toks = e.tokenize("The quick brown fox jumps over the lazy dog. " * 40)[:1500]
        e.prefill(toks)
        n = len(toks)
        d = e.step(65)
        e.rollback(n)
        dense_ms = timed(e, 65, n)
        e.set_sparse(True)
        e.set_mask(np.ones((e.n_layer, e.n_head), np.int32))
        s1 = e.step(65)
        e.rollback(n)
        all_ms = timed(e, 65, n)
        m = np.zeros((e.n_layer, e.n_head), np.int32)
        m[:, ::2] = 1
        e.set_mask(m)
        s2 = e.step(65)
        e.rollback(n)
        half_ms = timed(e, 65, n)
        perf = e.C.llama_perf_context(e.ctx)
        print(f"ngl {ngl}: {n} tokens; all heads vs dense {np.abs(s1 - d).max():.2e}, "
              f"half the heads vs dense {np.abs(s2 - d).max():.2e}; step ms dense {dense_ms:.3f}, "
              f"sparse all heads {all_ms:.3f}, half {half_ms:.3f}; graphs reused {perf.n_reused} "
              f"of {perf.n_eval} evals", flush=True)
