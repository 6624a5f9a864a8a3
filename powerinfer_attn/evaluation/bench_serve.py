"""End to end through HTTP: a dense server and a sparse server of the same model, one after the
other on this machine, each sent the same long prompts (runs of real text from the held-out half
of a text file, a different run per request so that no request reuses another's cached prefix)
and asked for ``gen_tokens`` tokens, streamed. Per request: time to the first token (mostly the
dense prefill), generation tok/s after it, tokens generated; per server the medians, and the
head density the sparse server logged."""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from ..engine.decode import Engine
from ..serving.serve import ServerProcess
from ..engine.text import window_starts


def prompts(model_path: Path, text_file: Path, n_tokens: int, count: int) -> list[str]:
    """``count`` texts of about ``n_tokens`` tokens from the held-out half of ``text_file``."""
    with Engine(model_path, n_ctx=64, n_threads=1) as eng:
        toks = eng.tokenize(text_file.read_text(encoding="utf-8", errors="replace"), add_bos=False, special=True)
        return [eng.detokenize(toks[s:s + n_tokens]) for s in window_starts(len(toks), n_tokens, count)]


def _request(url: str, prompt: str, gen_tokens: int) -> dict:
    import httpx

    t0 = time.perf_counter()
    first, n = None, 0
    with httpx.stream("POST", url + "/v1/completions", timeout=600,
                      json={"prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": True}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"the server answered {resp.status_code}: {resp.read()[:500]!r}")
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"][0]["text"]:
                n += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    gen_s = end - first if first is not None else 0.0
    return {"ttft_s": (first or end) - t0, "tokens": n, "gen_tok_s": (n - 1) / gen_s if n > 1 and gen_s > 0 else 0.0}


def run(model_path: Path, predictor: str, text_file: Path, prompt_tokens: int = 4096, gen_tokens: int = 128,
        requests: int = 3, threads: int | None = None, say: Callable[[str], None] | None = None) -> dict:
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    texts = prompts(model_path, text_file, prompt_tokens, requests)
    n_ctx = prompt_tokens + gen_tokens + 256
    out = {"model": str(model_path), "predictor": predictor, "prompt_tokens": prompt_tokens,
           "gen_tokens": gen_tokens, "requests": requests, "threads": threads, "servers": []}
    for mode, args in (("dense", ["--predictor", "none"]), ("sparse", ["--predictor", predictor])):
        say(f"{mode} server: starting")
        srv = ServerProcess(model_path, *args, n_ctx=n_ctx, threads=threads)
        try:
            _request(srv.url, "Hello", 4)  # warm-up: graphs built once
            rows = []
            for i, text in enumerate(texts):
                rows.append(_request(srv.url, text, gen_tokens))
                say(f"{mode} server, request {i + 1}/{len(texts)}: first token after {rows[-1]['ttft_s']:.2f} s, "
                    f"{rows[-1]['tokens']} tokens at {rows[-1]['gen_tok_s']:.1f} tok/s")
        finally:
            log = srv.stop()
        dens = [float(x) for x in re.findall(r"head density ([0-9.]+)", log)][1:]  # without the warm-up
        out["servers"].append({
            "mode": mode, "requests": rows,
            "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            "gen_tok_s": statistics.median(r["gen_tok_s"] for r in rows),
            "tokens": statistics.median(r["tokens"] for r in rows),
            "head_density": statistics.mean(dens) if dens else (1.0 if mode == "dense" else None),
        })
    dense, sparse = out["servers"]
    out["gen_speedup"] = sparse["gen_tok_s"] / dense["gen_tok_s"] if dense["gen_tok_s"] else None
    return out


def format_table(result: dict) -> str:
    lines = ["| server | head density | first token (s) | generation tok/s | tokens |", "|---|---|---|---|---|"]
    for s in result["servers"]:
        name = "dense" if s["mode"] == "dense" else f"sparse, {result['predictor']}"
        d = f"{s['head_density']:.3f}" if s["head_density"] is not None else "n/a"
        lines.append(f"| {name} | {d} | {s['ttft_s']:.2f} | {s['gen_tok_s']:.1f} | {s['tokens']:.0f} |")
    if result.get("gen_speedup"):
        lines.append(f"\ngeneration speed-up, sparse / dense: {result['gen_speedup']:.2f}x "
                     f"({result['prompt_tokens']}-token prompts, {result['gen_tokens']} tokens, "
                     f"median of {result['requests']} requests)")
    return "\n".join(lines)
