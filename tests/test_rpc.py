"""Sparse decode with layers on ggml RPC servers (`powerinfer-attn rpc-server`, all on
127.0.0.1): the same oracles as on one machine, a stock server refused, a dead server an error."""

import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

from powerinfer_attn.engine.decode import Engine, EngineError
from powerinfer_attn.native import rpc
from powerinfer_attn.predictors.basic import AllHeads
from test_engine import ORACLE_TEXT, PROMPT, check_masked_matches_zeroed_dense_f32, random_masks, rel_diff, teacher_forced_logits
from test_predictor import _random_predictor
from test_stock import stock_site  # noqa: F401 (fixture)

N_STEPS = 24
NGL = 20  # SmolLM2's output layer and last 19 of its 30 layers on the servers, 11 here


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        p.wait(timeout=30)
        if p.stderr:
            p.stderr.close()
    assert all(p.poll() is not None for p in procs), "an rpc server is left running"


@pytest.fixture(scope="module")
def servers(engine_lib):
    procs, eps = zip(*(rpc.spawn() for _ in range(2)))
    yield list(eps)
    stop(procs)


@pytest.fixture(scope="module")
def rpc_engine(model_path, servers):
    with Engine(model_path, n_ctx=512, n_threads=2, n_gpu_layers=NGL, rpc=servers) as eng:
        yield eng


def test_servers_speak_the_series_protocol(servers):
    for ep in servers:
        assert rpc.hello(ep)[0] == rpc.RPC_PROTO_MAJOR


def test_layers_are_on_the_servers(rpc_engine):
    """wq/wo of the servers' layers run dense there (bit OP_ON_DEVICE, as on a GPU), the local
    ones on the sparse products; the attention of every layer is head-masked."""
    ops = rpc_engine.layer_ops()
    n_local = rpc_engine.n_layer + 1 - NGL  # llama.cpp counts the output layer among -ngl
    assert all(o & 1 and o & 2 and not o & 8 for o in ops[:n_local]), ops
    assert all(o & 2 and o & 8 for o in ops[n_local:]), ops


def test_all_heads_give_the_local_dense_tokens(model_path, engine, rpc_engine):
    dense = engine.generate(PROMPT, N_STEPS, stop_at_eog=False)
    pred = AllHeads()
    pred.bind(rpc_engine)
    sparse = rpc_engine.generate(PROMPT, N_STEPS, predictor=pred, stop_at_eog=False)
    assert sparse.tokens == dense.tokens
    assert rpc_engine.generate(PROMPT, N_STEPS, stop_at_eog=False).tokens == dense.tokens


@pytest.mark.parametrize("seed,density", [(0, 0.5), (1, 0.25)])
def test_random_masks_match_zeroed_dense(f32_model_path, servers, seed, density):
    """On the float model, as on one machine (test_engine): the masked sparse decode with layers
    on the servers is dense attention with the masked heads' outputs zeroed, to float rounding."""
    check_masked_matches_zeroed_dense_f32(f32_model_path, seed, density, n_gpu_layers=NGL, rpc=servers)


@pytest.mark.parametrize("fill", ["linear", "mean"])
def test_trained_predictor_with_its_fill_gives_the_local_tokens(tmp_path, f32_model_path, servers, fill):
    """The in-graph predictor, its selection state and its fill run on the server that holds
    each layer: the same masks, hence the same tokens, as on one machine. On the float model: on
    the Q4_1 one a server layer's dense wq and wo round differently from the sparse products
    here, enough to move a head across the threshold now and then."""
    from powerinfer_attn.engine.decode import open_engine
    from powerinfer_attn.predictors.specs import get_predictor

    path = tmp_path / "p.gguf"
    with Engine(f32_model_path, n_ctx=32, n_threads=1) as probe:
        _random_predictor(path, f32_model_path, probe, value=0.3, fill=fill, head_dim=probe.n_embd // probe.n_head)
    out = []
    for kw in ({}, {"n_gpu_layers": NGL, "rpc": servers}):
        pred = get_predictor(f"trained:{path}", f32_model_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_engine(f32_model_path, pred, n_ctx=512, n_threads=2, **kw) as eng:
                out.append(eng.generate(PROMPT, N_STEPS, predictor=pred, stop_at_eog=False))
                if kw:
                    dense = eng.generate(PROMPT, N_STEPS, stop_at_eog=False).tokens
    assert out[0].tokens == out[1].tokens
    assert np.array_equal(np.array(out[0].masks), np.array(out[1].masks))
    assert 0.1 < float(np.mean(out[0].masks)) < 0.9
    assert out[0].tokens != dense  # the predictor matters


def test_token_budget_on_the_servers_matches_one_machine(f32_model_path, servers):
    """The page bounds (updated in place in the servers' K caches), the page selection and the
    attention over the chosen pages run on the servers: the pages and logits of one machine. A
    server layer's query comes from the dense wq product, a local one's from the sparse one, so
    a near tie between two pages may fall the other way now and then."""
    from test_budget import TEXT, PagesHook

    out, pages = [], []
    for kw in ({}, {"n_gpu_layers": NGL, "rpc": servers}):
        hook = PagesHook()
        with Engine(f32_model_path, n_ctx=1024, n_threads=2, tensor_hook=hook, **kw) as eng:
            toks = eng.tokenize(TEXT)[:260]
            eng.prefill(toks[:200])
            mask = np.ones((eng.n_layer, eng.n_head), np.int32)
            mask[:, 1::2] = 0
            eng.set_sparse(True)
            eng.set_mask(mask)
            eng.set_kv_budget(64, page=16, n_sink=4, n_recent=16)
            logits, sel = [], []
            for t in toks[200:]:
                logits.append(eng.step(t))
                sel.append(np.stack([hook.pages[il].reshape(eng.n_head_kv, -1) for il in range(eng.n_layer)]))
            if not kw:  # the same steps without a budget: how far the budget moves the logits
                eng.set_kv_budget(0)
                eng.rollback(200)
                full = np.array([eng.step(t) for t in toks[200:]])
        out.append(np.array(logits))
        pages.append(sel)  # per step [n_layer, n_head_kv, pages in the cache's view]
    assert all((p.sum(axis=-1) == 64 // 16).all() for p in pages[1])  # every layer reads the budget's pages
    same = np.array([(a == b).all(axis=(-1, -2)) for a, b in zip(*pages)])
    assert same.mean() >= 0.95, np.argwhere(~same)
    assert np.median(rel_diff(out[1], out[0])) < 0.1 * np.median(rel_diff(full, out[0]))
    assert np.mean(out[1].argmax(1) == out[0].argmax(1)) >= 0.9


def test_servers_stay_out_of_the_default_device_list(rpc_engine):
    """An engine names its servers' devices in the model's parameters only: a model made later
    without --rpc (or a llama_cpp.Llama) never sees them, nor a server that died since."""
    ggml, _ = rpc._libs()
    names = [ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)) for i in range(ggml.ggml_backend_dev_count())]
    assert not [n for n in names if n.startswith(b"RPC")], names


LLAMA = """
import sys
import time
from llama_cpp import Llama
from powerinfer_attn.native import rpc
from powerinfer_attn.serving.sparsify import sparsify
out = []
for servers in ([], sys.argv[2].split(",")):
    if servers:
        rpc.add_servers(servers)
    llm = Llama(sys.argv[1], n_ctx=256, n_gpu_layers=20 if servers else 0, verbose=False)
    sparsify(llm, "all")
    out.append(llm.create_completion("The capital of France is", max_tokens=12, temperature=0.0)["choices"][0]["text"])
    del llm
print(repr(out[0]), repr(out[1]))
assert out[0] == out[1], out
"""


def test_llama_cpp_python_models_use_added_servers(model_path, engine_lib):
    """``rpc.add_servers`` then ``Llama(..., n_gpu_layers=N)``: the servers take the layers and
    ``sparsify`` with every head gives the local text. Servers of its own: an rpc-server serves
    one client at a time, and the module's engine holds the others."""
    procs, eps = zip(*(rpc.spawn() for _ in range(2)))
    try:
        r = subprocess.run([sys.executable, "-c", LLAMA, str(model_path), ",".join(eps)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        busy = rpc.hello(eps[0], timeout=5)  # free again once the client is gone
        assert busy[0] == rpc.RPC_PROTO_MAJOR
    finally:
        stop(procs)


def test_a_busy_server_is_named(servers, rpc_engine):
    with pytest.raises(rpc.RPCError, match="one client at a time"):
        rpc.hello(servers[0], timeout=2)  # the module's engine is connected to it


def test_window_fill_matches_one_machine(f32_model_path, servers):
    """Skipped heads attending over sinks and recent cells (the window fill) on the servers'
    layers: one machine's logits, to float rounding."""
    out = []
    for kw in ({}, {"n_gpu_layers": NGL, "rpc": servers}):
        with Engine(f32_model_path, n_ctx=512, n_threads=2, **kw) as eng:
            toks = eng.tokenize(ORACLE_TEXT * 3)
            masks = random_masks(np.random.default_rng(3), len(toks) - 20, eng.n_layer, eng.n_head, 0.5)
            eng.set_head_window(4, 8)
            out.append(teacher_forced_logits(eng, toks, 20, masks))
            eng.set_head_fill("zero")
            zero = teacher_forced_logits(eng, toks, 20, masks) if kw else None
    assert rel_diff(out[1], out[0]).max() < 5e-3
    assert rel_diff(zero, out[0]).min() > 10 * rel_diff(out[1], out[0]).max()  # the window fill matters


def test_bad_endpoints_and_unreachable_servers_are_errors(model_path):
    with pytest.raises(rpc.RPCError, match="host:port"):
        rpc.parse_endpoints("localhost")
    with pytest.raises(rpc.RPCError, match="twice"):
        rpc.parse_endpoints("127.0.0.1:1,127.0.0.1:1")
    with pytest.raises(rpc.RPCError, match="cannot reach"):
        Engine(model_path, n_ctx=256, n_gpu_layers=4, rpc=f"127.0.0.1:{rpc.free_port()}")
    with pytest.raises(EngineError, match="n_gpu_layers"):
        Engine(model_path, n_ctx=256, rpc="127.0.0.1:1")


def test_a_stock_server_is_refused(model_path, stock_site):  # noqa: F811
    env = dict(os.environ, PYTHONPATH=str(stock_site), POWERINFER_ATTN_ALLOW_STOCK="1")
    proc, ep = rpc.spawn(env=env)
    try:
        major = rpc.hello(ep)[0]
        assert major < 100
        with pytest.raises(rpc.RPCError, match="stock"):
            Engine(model_path, n_ctx=256, n_gpu_layers=4, rpc=[ep])
    finally:
        stop([proc])


CLIENT = """
import sys
import time
from powerinfer_attn.engine.decode import Engine, EngineError
from powerinfer_attn.predictors.basic import AllHeads
eng = Engine(sys.argv[1], n_ctx=4096, n_threads=1, n_gpu_layers=20, rpc=sys.argv[2])
pred = AllHeads(); pred.bind(eng)
eng.set_sparse(True)
eng.prefill(eng.tokenize("Once upon a time"))
tok = 1
for i in range(4000):
    tok = int(eng.step(tok).argmax())
    print("step", i, flush=True)
"""


def test_a_server_killed_mid_run_is_an_error_not_a_hang(model_path, engine_lib):
    procs, eps = zip(*(rpc.spawn() for _ in range(2)))
    try:
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(model_path), ",".join(eps)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3):  # decoding through both servers
            assert client.stdout.readline().startswith("step"), client.stderr.read()[-2000:]
        os.kill(procs[1].pid, signal.SIGKILL)
        try:
            _, err = client.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            client.kill()
            pytest.fail("the client hangs after its server died")
        assert client.returncode != 0
        assert "RPC" in err, err[-2000:]
    finally:
        stop(procs)


def test_the_rpc_server_command(engine_lib):
    """`powerinfer-attn rpc-server` serves the series' protocol; bound beyond 127.0.0.1 it warns
    that the protocol has no authentication."""
    for host, warns in (("127.0.0.1", False), ("0.0.0.0", True)):
        proc, ep = rpc.spawn(host=host, cli=True)
        assert rpc.hello(ep)[0] == rpc.RPC_PROTO_MAJOR
        proc.terminate()
        err = proc.communicate(timeout=30)[1].decode()
        assert ("no authentication" in err) == warns, err
