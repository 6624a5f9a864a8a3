"""Does pairing slow the dense step? Times dense decode steps alone, alternated with a sparse
engine (fixed mask, density 0.7) and alternated with a second dense engine, in one process, at
CTX tokens of held-out WikiText (default 8192; flash attention off, repack on, 2 threads).
Usage: .venv/bin/python scripts/bench-pairing.py [CTX] (TEXT=... for another text file). Run it on
an idle machine: it measures speed."""
import contextlib
import os
import statistics
import sys
from pathlib import Path

from powerinfer_attn.evaluation import bench
from powerinfer_attn.engine.decode import Engine
from powerinfer_attn.native.model import default_model_path

STEPS = 12  # timed steps per measurement


def tok_s(times: list[float]) -> str:
    return f"{1 / statistics.median(times):6.1f} tok/s"


def main() -> None:
    ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    text = Path(os.environ.get("TEXT", "../shared/data/wikitext-2-raw/wiki.test.raw"))
    kw = dict(n_ctx=ctx + 16, n_threads=2, flash_attn=False, repack=True)
    with contextlib.ExitStack() as stack:
        dense, sparse, dense2 = (stack.enter_context(Engine(default_model_path(), **kw)) for _ in range(3))
        toks = bench._context_tokens(dense, ctx + 1, text)
        for eng in (dense, sparse, dense2):  # one prefill, copied to the others
            bench._fill(eng, ctx, toks)
        sparse.set_sparse(True)
        sparse.set_mask(bench.heads_for_density(0.7, sparse.n_layer, sparse.n_head, sparse.n_head_kv))

        def step(eng: Engine) -> float:
            return bench._timed_step(eng, toks[ctx], ctx)

        for eng in (dense, sparse, dense2):  # warm-up: build each graph
            step(eng)
        for rnd in range(2):
            alone = [step(dense) for _ in range(STEPS)]
            print(f"[{rnd}] dense alone                {tok_s(alone)}", flush=True)
            pairs = [(step(dense), step(sparse)) for _ in range(STEPS)]
            print(f"[{rnd}] dense, paired with sparse  {tok_s([d for d, _ in pairs])}   "
                  f"sparse {tok_s([s for _, s in pairs])}", flush=True)
            pairs = [(step(dense), step(dense2)) for _ in range(STEPS)]
            print(f"[{rnd}] dense, paired with dense2  {tok_s([d for d, _ in pairs])}   "
                  f"dense2 {tok_s([s for _, s in pairs])}", flush=True)
            print(f"[{rnd}] sparse alone               {tok_s([step(sparse) for _ in range(STEPS)])}", flush=True)


if __name__ == "__main__":
    main()
