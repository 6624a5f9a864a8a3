"""`powerinfer-attn serve` with real clients: the server runs in a subprocess on a free port and
is talked to with the openai client and with raw HTTP streaming."""

import concurrent.futures
import json
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.serving.serve import ServerProcess

PROMPTS = ["The capital of France is", "Once upon a time, a small", "The river Tiber flows",
           "In 1492, Columbus", "A good recipe for bread", "The first law of motion",
           "Python is a programming language", "The moon orbits"]


class Server(ServerProcess):
    def __init__(self, model_path, *args):
        super().__init__(model_path, *args, n_ctx=512, threads=2)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="none", timeout=120)


@pytest.fixture(scope="module")
def dense_texts(model_path):
    """What stock-graph greedy decoding says for each prompt (llama-cpp-python in this process),
    with the server's default repeat penalty (1.1; the Python API's is 1.0)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=512, n_threads=2, verbose=False)
    out = {p: llm.create_completion(p, max_tokens=12, temperature=0.0, repeat_penalty=1.1)["choices"][0]["text"]
           for p in PROMPTS}
    llm.close()
    return out


def test_all_heads_server_is_dense_and_keeps_serving(model_path, dense_texts):
    srv = Server(model_path, "--predictor", "all")
    try:
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "ok" and health["decode"] == "all"
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [model_path.name]
        r = client.completions.create(model=model_path.name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert r.choices[0].text == dense_texts[PROMPTS[0]]
        chat = client.chat.completions.create(model=model_path.name, max_tokens=8, temperature=0,
                                              messages=[{"role": "user", "content": "Say hello."}])
        assert chat.choices[0].message.content
        # raw HTTP, server-sent events
        text = ""
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=120,
                          json={"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text == dense_texts[PROMPTS[1]]
        # bad requests: 4xx with a message, and the server goes on serving
        too_long = httpx.post(srv.url + "/v1/completions", timeout=120,
                              json={"prompt": "word " * 2000, "max_tokens": 4})
        assert 400 <= too_long.status_code < 500 and "context" in too_long.text.lower()
        bad = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": "many"})
        assert bad.status_code == 422 and "max_tokens" in bad.text
        r = client.completions.create(model=model_path.name, prompt=PROMPTS[2], max_tokens=12, temperature=0)
        assert r.choices[0].text == dense_texts[PROMPTS[2]]
    finally:
        log = srv.stop()
    assert re.search(r"request: 12 tokens generated, \d+ prompt tokens, .* tok/s\), head density 1\.000", log), log


def test_trained_predictor_server_and_concurrent_clients(model_path, dense_texts, tmp_path):
    from powerinfer_attn.engine.decode import Engine

    with Engine(model_path, n_ctx=32, n_threads=1) as e:
        L, H, E = e.n_layer, e.n_head, e.n_embd
    rng = np.random.default_rng(0)
    # random logits: at threshold 0.5 a mix of heads, at -1000 every head
    ws = [(rng.normal(size=(H, E)) * 0.05).astype(np.float32) for _ in range(L)]
    bs = [rng.normal(size=H).astype(np.float32) for _ in range(L)]
    path = tmp_path / "p.gguf"
    predictor_file.write_predictor(path, ws, bs, model_path.name, "threshold", 0.5, {})
    srv = Server(model_path, "--predictor", f"trained:{path}:threshold=-1000")
    try:
        # all heads through the in-graph predictor: each of 8 concurrent clients gets its own dense answer
        client = srv.client()

        def ask(p):
            return p, client.completions.create(model=model_path.name, prompt=p, max_tokens=12, temperature=0).choices[0].text

        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = dict(pool.map(ask, PROMPTS))
        assert time.time() - t0 < 240
        assert answers == dense_texts
    finally:
        srv.stop()
    srv = Server(model_path, "--predictor", f"trained:{path}")
    try:
        r = srv.client().completions.create(model=model_path.name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
        assert r.choices[0].text
    finally:
        log = srv.stop()
    d = [float(x) for x in re.findall(r"head density ([0-9.]+)", log)]
    assert len(d) == 1 and 0.05 < d[0] < 0.95, log


def test_density_needs_a_trained_predictor(model_path):
    r = subprocess.run([sys.executable, "-m", "powerinfer_attn.cli", "serve", "--model", str(model_path),
                        "--predictor", "all", "--density", "0.5"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--density goes with a trained" in r.stderr


def test_bench_serve_end_to_end(model_path, tmp_path):
    """A small run of bench-serve: both servers answer every request, the dense one at density 1,
    the sparse one (all heads) at 1 too, with the table printed."""
    from powerinfer_attn.evaluation import bench_serve

    text = tmp_path / "t.txt"
    text.write_text("The river flows through the valley and reaches the sea after many miles. " * 300)
    res = bench_serve.run(model_path, "all", text, prompt_tokens=200, gen_tokens=8, requests=2, threads=2,
                          say=lambda m: None)
    dense, sparse = res["servers"]
    assert dense["mode"] == "dense" and sparse["mode"] == "sparse"
    for s in (dense, sparse):
        assert len(s["requests"]) == 2 and s["tokens"] >= 2 and s["gen_tok_s"] > 0 and s["ttft_s"] > 0
    assert dense["head_density"] == 1.0 and sparse["head_density"] == 1.0
    assert res["gen_speedup"] > 0
    assert "| sparse, all | 1.000 |" in bench_serve.format_table(res)
