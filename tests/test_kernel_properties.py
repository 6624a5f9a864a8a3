"""Property-based tests (hypothesis) of GGML_OP_MUL_MAT_SPARSE_ATTN: random shapes (head widths
the weight type allows, GQA ratios, token counts), weight types, head masks (all-off and all-on
drawn often) and thread counts 1-3, against the numpy reference of test_kernels.py. `make
sanitize` runs this file against an AddressSanitizer/UBSan build of ggml as well."""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels import WEIGHT_TYPES, tolerance

from powerinfer_attn.native import kernels

pytestmark = pytest.mark.usefixtures("ggml_lib")

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values per block along ne0 (checked against ggml in test_block_sizes)
BLOCK = {"F32": 1, "F16": 1, "Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q6_K": 256}

seeds = st.integers(0, 2**32 - 1)
threads = st.integers(1, 3)


def tol(type_name, ref, k, x, w):
    """test_kernels' tolerance, scaled by the larger of the largest result and the typical size of
    a k-term dot product of x and w: a result that is small by chance still carries the rounding
    (for quants: the activation quantization) of all k terms."""
    typical = np.sqrt(k) * np.sqrt(np.mean(np.square(x, dtype=np.float64))) * np.sqrt(np.mean(np.square(w)))
    return tolerance(type_name, np.array([np.abs(ref).max(initial=0.0), typical]))


def head_masks(n_head):
    """All heads, none, or any pattern (a single head, runs, alternations...)."""
    return st.one_of(
        st.just(np.ones(n_head, np.int32)),
        st.just(np.zeros(n_head, np.int32)),
        st.lists(st.integers(0, 1), min_size=n_head, max_size=n_head).map(lambda v: np.array(v, np.int32)),
    )


def multiple_of(block, upto):
    """A positive multiple of block no larger than max(upto, block)."""
    return st.integers(1, max(1, upto // block)).map(lambda k: k * block)


def width(type_name, upto):
    """A row width the type can hold: whole blocks, or any width for F32/F16."""
    blk = BLOCK[type_name]
    return st.integers(1, upto) if blk == 1 else multiple_of(blk, upto)


@st.composite
def v1_cases(draw):
    type_name = draw(st.sampled_from(WEIGHT_TYPES))
    n_head = draw(st.integers(1, 8))
    return dict(type_name=type_name, n_embd=draw(width(type_name, 512)), n_head=n_head,
                hd=draw(st.integers(1, 80)), n_tok=draw(st.integers(1, 3)), heads=draw(head_masks(n_head)),
                n_threads=draw(threads), seed=draw(seeds))


@given(v1_cases())
@PROPERTY
def test_v1_rows_property(case):
    """wq rows: active heads' rows are the dense product, inactive heads' rows exactly zero."""
    t, n_embd, n_head, hd, heads = case["type_name"], case["n_embd"], case["n_head"], case["hd"], case["heads"]
    rng = np.random.default_rng(case["seed"])
    w = rng.standard_normal((n_head * hd, n_embd)).astype(np.float32)
    a = kernels.quantize(w, t)
    wf = kernels.dequantize(a, t, w.shape).astype(np.float64)
    x = rng.standard_normal((case["n_tok"], n_embd)).astype(np.float32)

    out = kernels.mul_mat("v1", a, t, (n_embd, n_head * hd), x, heads, case["n_threads"])
    dense = kernels.mul_mat(None, a, t, (n_embd, n_head * hd), x, None, case["n_threads"])

    keep = np.repeat(heads, hd).astype(bool)
    ref = x.astype(np.float64) @ wf.T
    ref[:, ~keep] = 0
    assert out.shape == ref.shape
    assert np.all(out[:, ~keep] == 0)
    np.testing.assert_allclose(out, ref, atol=tol(t, ref, n_embd, x, wf), rtol=0)
    np.testing.assert_allclose(out[:, keep], dense[:, keep], atol=1e-4 * max(1.0, np.abs(dense).max()), rtol=0)


@st.composite
def v2_cases(draw):
    kq_type = draw(st.sampled_from(["F32", "F16", "Q8_0", "Q4_0"]))
    n_head_kv = draw(st.integers(1, 4))
    n_head = n_head_kv * draw(st.integers(1, 4))
    return dict(kq_type=kq_type, kqv_type=draw(st.sampled_from(["F32", "F16"])), d=draw(width(kq_type, 128)),
                n_kv=draw(st.integers(1, 160)), n_head=n_head, n_head_kv=n_head_kv,
                n_tok=draw(st.integers(1, 3)), permute_k=draw(st.booleans()), heads=draw(head_masks(n_head)),
                n_threads=draw(threads), seed=draw(seeds))


@given(v2_cases())
@PROPERTY
def test_v2_heads_property(case):
    """K*q and softmax*V per head with the GQA broadcast: active heads as numpy computes them from
    their KV group, inactive heads exactly zero; k also as the permuted KV cache view."""
    d, n_kv, n_head, n_head_kv, n_tok = case["d"], case["n_kv"], case["n_head"], case["n_head_kv"], case["n_tok"]
    heads, nt, r = case["heads"], case["n_threads"], case["n_head"] // case["n_head_kv"]
    kq_type, kqv_type = case["kq_type"], case["kqv_type"]
    rng = np.random.default_rng(case["seed"])
    q = rng.standard_normal((n_tok, n_head, d)).astype(np.float32)          # ggml [d, n_head, n_tok], permuted in graph
    p = rng.random((n_head, n_tok, n_kv)).astype(np.float32)                # ggml [n_kv, n_tok, n_head]
    v = rng.standard_normal((n_head_kv, d, n_kv)).astype(np.float32)        # ggml [n_kv, d, n_head_kv]
    if case["permute_k"]:
        k = rng.standard_normal((n_kv, n_head_kv, d)).astype(np.float32)    # the cache layout, permuted in graph
    else:
        k = rng.standard_normal((n_head_kv, n_kv, d)).astype(np.float32)    # ggml [d, n_kv, n_head_kv]
    ka, va = kernels.quantize(k, kq_type), kernels.quantize(v, kqv_type)
    kf = kernels.dequantize(ka, kq_type, k.shape).astype(np.float64)
    if case["permute_k"]:
        kf = kf.transpose(1, 0, 2)
    vf = kernels.dequantize(va, kqv_type, v.shape).astype(np.float64)

    kq = kernels.mul_mat("v2", ka, kq_type, (d, n_kv, n_head_kv), q, heads, nt, permute_b=True,
                         permute_a=case["permute_k"])
    kqv = kernels.mul_mat("v2", va, kqv_type, (n_kv, d, n_head_kv), p, heads, nt)

    kq_ref = np.zeros((n_head, n_tok, n_kv))
    kqv_ref = np.zeros((n_head, n_tok, d))
    for h in np.flatnonzero(heads):
        kq_ref[h] = q[:, h, :].astype(np.float64) @ kf[h // r].T
        kqv_ref[h] = p[h].astype(np.float64) @ vf[h // r].T
    assert np.all(kq[heads == 0] == 0) and np.all(kqv[heads == 0] == 0)
    np.testing.assert_allclose(kq, kq_ref, atol=tol(kq_type, kq_ref, d, q, kf), rtol=0)
    np.testing.assert_allclose(kqv, kqv_ref, atol=tol(kqv_type, kqv_ref, n_kv, p, vf), rtol=0)


@st.composite
def v3_cases(draw):
    type_name = draw(st.sampled_from(WEIGHT_TYPES))
    blk = BLOCK[type_name]
    n_head = draw(st.integers(1, 4 if blk == 256 else 8))
    hd = draw(st.integers(1, 80) if blk == 1 else multiple_of(blk, 128 if blk == 32 else 512))
    return dict(type_name=type_name, n_head=n_head, hd=hd, n_embd=draw(st.integers(1, 100)),
                n_tok=draw(st.integers(1, 3)), heads=draw(head_masks(n_head)), n_threads=draw(threads),
                seed=draw(seeds))


@given(v3_cases())
@PROPERTY
def test_v3_cols_property(case):
    """wo columns: the sum over active heads only, which is the dense op on an input whose
    inactive heads are zero (what the engine relies on when wo falls back to the dense op)."""
    t, n_head, hd, n_embd, heads = case["type_name"], case["n_head"], case["hd"], case["n_embd"], case["heads"]
    rng = np.random.default_rng(case["seed"])
    w = rng.standard_normal((n_embd, n_head * hd)).astype(np.float32)      # ggml [n_head*hd, n_embd]
    a = kernels.quantize(w, t)
    wf = kernels.dequantize(a, t, w.shape).astype(np.float64)
    x = rng.standard_normal((case["n_tok"], n_head * hd)).astype(np.float32)
    keep = np.repeat(heads, hd).astype(bool)

    out = kernels.mul_mat("v3", a, t, (n_head * hd, n_embd), x, heads, case["n_threads"])
    dense_zeroed = kernels.mul_mat(None, a, t, (n_head * hd, n_embd), np.where(keep, x, 0), None, case["n_threads"])

    ref = x[:, keep].astype(np.float64) @ wf[:, keep].T
    assert out.shape == ref.shape
    if not heads.any():
        assert np.all(out == 0)
    np.testing.assert_allclose(out, ref, atol=tol(t, ref, n_head * hd, x, wf), rtol=0)
    np.testing.assert_allclose(out, dense_zeroed, atol=1e-4 * max(1.0, np.abs(dense_zeroed).max()), rtol=0)


def test_block_sizes():
    for t, blk in BLOCK.items():
        assert kernels.block_size(t) == blk, t


@pytest.mark.parametrize("call,match", [
    # v3 at a head width that is not whole blocks: ggml would abort the process
    (lambda: kernels.mul_mat("v3", kernels.quantize(np.ones((8, 512), np.float32), "Q4_K"), "Q4_K", (512, 8),
                             np.ones((1, 512), np.float32), np.ones(8, np.int32)), "not whole Q4_K blocks"),
    (lambda: kernels.mul_mat("v1", kernels.quantize(np.ones((10, 32), np.float32), "F32"), "F32", (32, 10),
                             np.ones((1, 32), np.float32), np.ones(3, np.int32)), "heads of equal width"),
    (lambda: kernels.mul_mat("v1", kernels.quantize(np.ones((8, 32), np.float32), "F32"), "F32", (32, 8),
                             np.ones((1, 32), np.float32), np.array([1, 2], np.int32)), "0 or 1"),
    (lambda: kernels.mul_mat("v2", kernels.quantize(np.ones((2, 5, 16), np.float32), "F16"), "F16", (16, 5, 2),
                             np.ones((4, 1, 16), np.float32), np.ones(3, np.int32)), "ne2 must be n_head"),
    (lambda: kernels.mul_mat(None, kernels.quantize(np.ones((8, 32), np.float32), "F32"), "F32", (32, 8),
                             np.ones((1, 33), np.float32), None), "ne0 must agree"),
    (lambda: kernels.mul_mat(None, kernels.quantize(np.ones((8, 32), np.float32), "F32"), "F32", (32, 8),
                             np.ones((1, 32), np.float32), None, n_threads=0), "n_threads"),
    (lambda: kernels.quantize(np.ones((4, 48), np.float32), "Q4_0"), "whole blocks of 32"),
    (lambda: kernels.quantize(np.ones((4, 32), np.float32), "Q5_0"), "unsupported weight type"),
], ids=["v3-unaligned-heads", "v1-uneven-heads", "mask-value", "v2-n_head", "ne0", "threads",
        "quantize-partial-block", "unknown-type"])
def test_bad_kernel_arguments_are_value_errors(call, match):
    """What ggml would assert on (and abort the process for) is refused before it gets there."""
    with pytest.raises(ValueError, match=match):
        call()


def test_kernel_library_in_use():
    """The kernels run from $POWERINFER_ATTN_GGML_LIB_DIR when it is set (`make sanitize`: the
    ASan build), else from the installed patched package."""
    kernels.libs()
    want_dir = Path(os.environ[kernels.LIB_DIR_ENV]) if os.environ.get(kernels.LIB_DIR_ENV) else kernels.package_lib_dir()
    assert kernels.lib_dir() == want_dir.resolve()
    maps = Path("/proc/self/maps").read_text().split()
    loaded = {Path(p).resolve() for p in maps if "libggml-cpu.so" in p or "libggml-base.so" in p}
    want = {(want_dir / n).resolve() for n in ("libggml-base.so", "libggml-cpu.so")}
    assert want <= loaded, f"{want} not among the loaded {loaded}"
