"""`make demo`'s server part: `powerinfer-attn serve` with sparse decode (every head active: the
stock graph's text), one request to /v1/completions, and the line the server logged for it."""

import json

import httpx

from powerinfer_attn.native.model import default_model_path
from powerinfer_attn.serving.serve import ServerProcess

srv = ServerProcess(default_model_path(), "--predictor", "all", n_ctx=512, threads=2)
try:
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    print(f"POST {srv.url}/v1/completions {json.dumps(body)}")
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    print(f"-> {r.status_code}: {r.json()['choices'][0]['text']!r}")
finally:
    log = srv.stop()
print("server log:", *[line for line in log.splitlines() if "tok/s" in line], sep="\n  ")
