"""GGML_OP_MUL_MAT_SPARSE_ATTN against a plain numpy reference, for every mode, weight type,
mask kind and thread count. The reference dequantizes the weights with gguf-py, multiplies in
float64 and zeroes what inactive heads produce."""

import numpy as np
import pytest

from powerinfer_attn.native import kernels

pytestmark = pytest.mark.usefixtures("ggml_lib")

WEIGHT_TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"]
THREADS = [1, 2, 3]


def masks(n_head, rng):
    single = np.zeros(n_head, np.int32)
    single[rng.integers(n_head)] = 1
    rand = (rng.random(n_head) < 0.5).astype(np.int32)
    return {"all": np.ones(n_head, np.int32), "single": single, "none": np.zeros(n_head, np.int32), "random": rand}


def tolerance(type_name, ref):
    # src1 is packed to the weight's vec_dot type (Q8_x for quants, F16 for F16) before the dot
    rel = {"F32": 1e-5, "F16": 2e-3}.get(type_name, 2.5e-2)
    return rel * max(1.0, float(np.abs(ref).max()))


def _rows_and_input(rng, type_name, n_rows, n_embd, n_tok):
    """A random [n_rows, n_embd] matrix of that type (its bytes, and its values back in float64) and
    an input of n_tok rows."""
    w = rng.standard_normal((n_rows, n_embd)).astype(np.float32)
    a = kernels.quantize(w, type_name)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    return a, kernels.dequantize(a, type_name, w.shape).astype(np.float64), x


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("type_name", WEIGHT_TYPES)
@pytest.mark.parametrize("n_tok", [1, 3])
def test_v1_wq_rows(type_name, n_threads, n_tok):
    rng = np.random.default_rng(1)
    n_embd, n_head, hd = 256, 4, 64
    a, wf, x = _rows_and_input(rng, type_name, n_head * hd, n_embd, n_tok)
    dense = kernels.mul_mat(None, a, type_name, (n_embd, n_head * hd), x, None, n_threads)
    for kind, heads in masks(n_head, rng).items():
        out = kernels.mul_mat("v1", a, type_name, (n_embd, n_head * hd), x, heads, n_threads)
        ref = x.astype(np.float64) @ wf.T
        keep = np.repeat(heads, hd).astype(bool)
        ref[:, ~keep] = 0
        assert out.shape == ref.shape
        assert np.all(out[:, ~keep] == 0), kind
        np.testing.assert_allclose(out, ref, atol=tolerance(type_name, ref), rtol=0, err_msg=kind)
        # the active rows are the dense op's rows
        np.testing.assert_allclose(out[:, keep], dense[:, keep], atol=1e-4 * max(1.0, np.abs(dense).max()), rtol=0)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("type_name", ["F32", "F16", "Q8_0"])
@pytest.mark.parametrize("n_tok", [1, 3])
def test_v1_fill_rows_of_skipped_heads(type_name, n_threads, n_tok):
    """Linear fill's product: the rows of the heads marked 0, plus the bias, and exact zeros for the
    heads marked 1 (none skipped: all zero; all skipped: the dense product plus the bias)."""
    rng = np.random.default_rng(2)
    n_embd, n_head, hd = 256, 4, 32
    a, wf, x = _rows_and_input(rng, type_name, n_head * hd, n_embd, n_tok)
    bias = rng.standard_normal(n_head * hd).astype(np.float32)
    for kind, heads in masks(n_head, rng).items():
        out = kernels.mul_mat_v1_fill(a, type_name, (n_embd, n_head * hd), x, heads, bias, n_threads)
        skipped = np.repeat(heads == 0, hd)
        ref = x.astype(np.float64) @ wf.T + bias
        ref[:, ~skipped] = 0
        assert np.all(out[:, ~skipped] == 0), kind
        np.testing.assert_allclose(out, ref, atol=tolerance(type_name, ref), rtol=0, err_msg=kind)
        # the same rows as v1 with the complement mask, plus the bias
        v1 = kernels.mul_mat("v1", a, type_name, (n_embd, n_head * hd), x, (heads == 0).astype(np.int32), n_threads)
        np.testing.assert_array_equal(out[:, skipped], (v1 + bias)[:, skipped])


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("kv_type", ["F16", "F32"])
@pytest.mark.parametrize("n_tok", [1, 2])
@pytest.mark.parametrize("n_head,n_head_kv", [(6, 2), (4, 4), (3, 1)])
def test_v2_kq_and_kqv_gqa(kv_type, n_threads, n_tok, n_head, n_head_kv):
    rng = np.random.default_rng(2)
    d, n_kv = 64, 77
    r = n_head // n_head_kv
    k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)      # ggml [d, n_kv, n_head_kv]
    v = rng.standard_normal((n_head_kv, d, n_kv)).astype(np.float32)      # ggml [n_kv, d, n_head_kv]
    q = rng.standard_normal((n_tok, n_head, d)).astype(np.float32)        # ggml [d, n_head, n_tok], permuted in graph
    p = rng.random((n_head, n_tok, n_kv)).astype(np.float32)              # ggml [n_kv, n_tok, n_head]
    ka, va = kernels.quantize(k, kv_type), kernels.quantize(v, kv_type)
    kf = kernels.dequantize(ka, kv_type, k.shape).astype(np.float64)
    vf = kernels.dequantize(va, kv_type, v.shape).astype(np.float64)
    for kind, heads in masks(n_head, rng).items():
        kq = kernels.mul_mat("v2", ka, kv_type, (d, n_kv, n_head_kv), q, heads, n_threads, permute_b=True)
        kqv = kernels.mul_mat("v2", va, kv_type, (n_kv, d, n_head_kv), p, heads, n_threads)
        kq_ref = np.zeros((n_head, n_tok, n_kv))
        kqv_ref = np.zeros((n_head, n_tok, d))
        for h in range(n_head):
            if heads[h]:
                kq_ref[h] = q[:, h, :].astype(np.float64) @ kf[h // r].T
                kqv_ref[h] = p[h].astype(np.float64) @ vf[h // r].T
        np.testing.assert_allclose(kq, kq_ref, atol=tolerance(kv_type, kq_ref), rtol=0, err_msg=kind)
        np.testing.assert_allclose(kqv, kqv_ref, atol=tolerance(kv_type, kqv_ref), rtol=0, err_msg=kind)
        assert np.all(kq[heads == 0] == 0) and np.all(kqv[heads == 0] == 0)


def _f16(x):
    return kernels.dequantize(kernels.quantize(x, "F16"), "F16", x.shape)


@pytest.mark.parametrize("d", [16, 80, 128, 256, 264])
@pytest.mark.parametrize("n_head,n_head_kv", [(7, 1), (8, 2), (2, 2)])
def test_v2_kq_f16_widths(d, n_head, n_head_kv):
    """Decode's K*q on an F16 cache: widths the per-group kernel takes (multiples of vec_dot's
    step, up to 256; past 256 its long-row pass) and ones it leaves to vec_dot (16, 80), every
    group size: bit for bit what ggml_mul_mat gives for the active heads."""
    rng = np.random.default_rng(5)
    n_kv, r = 45, n_head // n_head_kv
    k = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)  # the cache's layout
    q = rng.standard_normal((1, n_head, d)).astype(np.float32)
    ka = kernels.quantize(k, "F16")
    kf = _f16(k).astype(np.float64)
    qf = _f16(q).astype(np.float64)  # q is packed to F16, as for the dense op
    dense = kernels.mul_mat(None, ka, "F16", (d, n_kv, n_head_kv), q, None, 1, permute_b=True, permute_a=True)
    for kind, heads in masks(n_head, rng).items():
        for n_threads in (1, 3):
            out = kernels.mul_mat("v2", ka, "F16", (d, n_kv, n_head_kv), q, heads, n_threads, permute_b=True, permute_a=True)
            for h in range(n_head):
                ref = kf[:, h // r, :] @ qf[0, h] if heads[h] else np.zeros(n_kv)
                np.testing.assert_allclose(out[h, 0], ref, atol=1e-5 * max(1, np.abs(ref).max()), rtol=0,
                                           err_msg=f"{kind} head {h} threads {n_threads}")
                if heads[h]:
                    np.testing.assert_array_equal(out[h, 0], dense[h, 0], err_msg=f"{kind} head {h} threads {n_threads}")


@pytest.mark.parametrize("n_kv", [272, 1040, 1030])
@pytest.mark.parametrize("n_head,n_head_kv", [(7, 1), (9, 3), (2, 2), (18, 1)])
def test_v2_kqv_f16_long_rows(n_kv, n_head, n_head_kv):
    """Decode's softmax*V on an F16 cache (V transposed: rows n_kv long, pieces of 64 cells and
    a rest), groups of up to 18 heads over its 4 heads per pass: bit for bit ggml_mul_mat's
    results for the active heads."""
    rng = np.random.default_rng(6)
    d, r = 64, n_head // n_head_kv
    v = rng.standard_normal((n_head_kv, d, n_kv)).astype(np.float32)  # ggml [n_kv, d, n_head_kv]
    p = rng.random((n_head, 1, n_kv)).astype(np.float32)
    va = kernels.quantize(v, "F16")
    vf, pf = _f16(v).astype(np.float64), _f16(p).astype(np.float64)
    dense = kernels.mul_mat(None, va, "F16", (n_kv, d, n_head_kv), p, None, 1)
    for kind, heads in masks(n_head, rng).items():
        for n_threads in (1, 3):
            out = kernels.mul_mat("v2", va, "F16", (n_kv, d, n_head_kv), p, heads, n_threads)
            for h in range(n_head):
                ref = pf[h, 0] @ vf[h // r].T if heads[h] else np.zeros(d)
                np.testing.assert_allclose(out[h, 0], ref, atol=1e-5 * max(1, np.abs(ref).max()), rtol=0,
                                           err_msg=f"{kind} head {h} threads {n_threads}")
                if heads[h]:
                    np.testing.assert_array_equal(out[h, 0], dense[h, 0], err_msg=f"{kind} head {h} threads {n_threads}")


def test_v2_permuted_kv_cache_view():
    """k as llama reads it from the cache: [d, n_head_kv, n_kv] permuted to [d, n_kv, n_head_kv]."""
    rng = np.random.default_rng(3)
    d, n_kv, n_head, n_head_kv = 64, 50, 6, 3
    k = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)
    q = rng.standard_normal((1, n_head, d)).astype(np.float32)
    ka = kernels.quantize(k, "F16")
    kf = kernels.dequantize(ka, "F16", k.shape).astype(np.float64)
    heads = np.array([1, 0, 0, 1, 1, 0], np.int32)
    out = kernels.mul_mat("v2", ka, "F16", (d, n_kv, n_head_kv), q, heads, 2, permute_b=True, permute_a=True)
    for h in range(n_head):
        ref = kf[:, h // 2, :] @ q[0, h] if heads[h] else np.zeros(n_kv)
        np.testing.assert_allclose(out[h, 0], ref, atol=2e-3 * max(1, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("type_name", WEIGHT_TYPES)
@pytest.mark.parametrize("n_tok", [1, 2])
def test_v3_wo_cols(type_name, n_threads, n_tok):
    rng = np.random.default_rng(4)
    n_embd = 96
    # K-quants have 256-wide blocks: only heads of width 256 can be skipped column-wise
    hd = 256 if type_name in ("Q4_K", "Q6_K") else 64
    n_head = 5 if hd == 64 else 2
    w = rng.standard_normal((n_embd, n_head * hd)).astype(np.float32)   # ggml [n_head*hd, n_embd]
    a = kernels.quantize(w, type_name)
    wf = kernels.dequantize(a, type_name, w.shape).astype(np.float64)
    x = rng.standard_normal((n_tok, n_head * hd)).astype(np.float32)
    cases = masks(n_head, rng)
    cases["alternate"] = (np.arange(n_head) % 2).astype(np.int32)
    for kind, heads in cases.items():
        out = kernels.mul_mat("v3", a, type_name, (n_head * hd, n_embd), x, heads, n_threads)
        keep = np.repeat(heads, hd).astype(bool)
        ref = x[:, keep].astype(np.float64) @ wf[:, keep].T
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=tolerance(type_name, ref) * np.sqrt(n_head), rtol=0, err_msg=kind)
        if not heads.any():
            assert np.all(out == 0)


@pytest.mark.parametrize("type_name,hd,ok", [
    ("F32", 64, True), ("F16", 64, True), ("Q4_0", 64, True), ("Q4_1", 64, True), ("Q8_0", 64, True),
    ("Q4_K", 64, False), ("Q6_K", 64, False), ("Q4_K", 256, True), ("Q4_0", 48, False),
])
def test_cols_alignment_rule(type_name, hd, ok):
    g, _ = kernels.libs()
    assert g.ggml_sparse_attn_v3_ok(kernels.GGML_TYPE[type_name], hd) is ok


# --- ggml_head_select: the in-graph predictor's selection (ggml-ops.patch, ggml-cpu.patch) ---


@pytest.mark.parametrize("rule,value", [("threshold", 0.2), ("topk", 3), ("mass", 0.6)])
def test_head_select_rules_match_numpy(rule, value):
    """Each rule against train.select, with ties (the lower index ranks first), all-negative
    logits (mass keeps only the top head), and the counters carried over 2**32."""
    from powerinfer_attn.training.train import select

    rng = np.random.default_rng(3)
    cases = [rng.normal(size=n).astype(np.float32) for n in (1, 7, 32, 40)]
    cases += [np.array([0.5, 0.5, -1.0, 0.5, 0.1], np.float32), -np.abs(rng.normal(size=9)).astype(np.float32)]
    start = 2**32 - 3  # the low halves wrap during this step
    for il, logits in enumerate(cases):
        state = kernels.head_select_state(rule, value, targets=[0.5] * 6, kept=start, chosen=start)
        mask, after = kernels.head_select(logits, state, il)
        np.testing.assert_array_equal(mask, select(rule, logits[None], min(value, logits.size))[0])
        assert kernels.head_select_counts(after) == (start + int(mask.sum()), start + logits.size)
        np.testing.assert_array_equal(np.delete(after, range(4, 8)), np.delete(state, range(4, 8)))


def test_head_select_density_controller():
    """Threshold with a gain: the mask at value + offset, then offset += gain * (kept/n - target[il])
    in float32, layer after layer."""
    from powerinfer_attn.training.train import select

    rng = np.random.default_rng(5)
    targets = np.array([0.25, 0.75, 0.5], np.float32)
    state = kernels.head_select_state("threshold", 0.1, targets=targets, gain=0.3, offset=-0.2)
    offset = np.float32(-0.2)
    for il in range(3):
        logits = rng.normal(size=16).astype(np.float32)
        mask, state = kernels.head_select(logits, state, il)
        np.testing.assert_array_equal(mask, select("threshold", logits[None], float(np.float32(0.1) + offset))[0])
        offset = np.float32(offset + np.float32(0.3) * (np.float32(mask.sum()) / np.float32(16) - targets[il]))
        assert state.view(np.float32)[kernels.SLOT_OFFSET] == pytest.approx(offset, abs=1e-6)
    # no gain: the offset stays
    state[kernels.SLOT_GAIN] = 0
    _, after = kernels.head_select(rng.normal(size=16).astype(np.float32), state, 0)
    assert after[kernels.SLOT_OFFSET] == state[kernels.SLOT_OFFSET]
