"""Child process for test_stock.py: dense teacher-forced logits from whatever llama_cpp is
first on sys.path (the stock build there), written to an .npy file.

usage: stock_logits.py MODEL OUT.npy PROMPT_LEN TOKEN...
"""

import os
import sys

import numpy as np

os.environ["POWERINFER_ATTN_ALLOW_STOCK"] = "1"
sys.path.insert(1, os.path.join(os.path.dirname(__file__), ".."))

from powerinfer_attn.native.build import PATCH_SYMBOL  # noqa: E402
from powerinfer_attn.engine.decode import Engine  # noqa: E402


def main():
    model, out, prompt_len, *tokens = sys.argv[1:]
    prompt_len, tokens = int(prompt_len), [int(t) for t in tokens]
    with Engine(model, n_ctx=512, n_threads=2) as eng:
        assert not hasattr(eng.C, PATCH_SYMBOL), f"{eng.C.__file__} is not the stock build"
        eng.prefill(tokens[:prompt_len])
        logits = [eng.step(t) for t in tokens[prompt_len:]]
    np.save(out, np.array(logits))


if __name__ == "__main__":
    main()
