"""Decode speed: dense against sparse at fixed head densities, at several context lengths.

For each context length the KV cache is filled once (dense prefill) in two contexts of the
same model: one decodes densely (the stock graph), the other sparsely (one graph for every
density: the mask is an input). Each timed step decodes one token at position ``ctx`` and
is then removed from the cache again, so every step sees the same context. Steps are
interleaved in pairs, dense then sparse at one density, so that drift in the machine's speed
hits both alike. Reported: the median step time of each configuration as tok/s, and as the
ratio the median over pairs of dense step time / sparse step time.

The masks are fixed for the whole run (the same heads every step), so the figures are about
the kernels, not a predictor. ``heads_for_density`` says which heads stay on.

With ``trained`` (a ``trained:PRED.gguf[:RULE=VALUE]`` predictor), a third context decodes
with that predictor computed inside the graph, its cost included, paired with dense steps the
same way; its density is what the predictor chose on the ``DENSITY_STEPS`` tokens that follow
the context, read back in a separate context (reading masks needs an eval callback, which would
slow the timed one). The cache holds a repeated sentence, or with ``text_file`` a run of real
text from the held-out half of that file (what a predictor sees in use).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..native.bindings import KV_PAGE, OP_ON_DEVICE
from ..engine.decode import Engine, open_engine
from .profile import NodeTimer, amdahl_limit, profile_steps, trustworthy


def heads_for_density(density: float, n_layer: int, n_head: int, n_head_kv: int, gqa: bool = False) -> np.ndarray:
    """A fixed mask keeping round(density * n_head) heads per layer.

    Plain: heads are spread evenly over the KV groups (head h belongs to group h // (n_head/n_head_kv)).
    ``gqa``: whole KV groups are kept first, so the K/V of dropped groups are never read.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = max(1, int(round(density * n_head)))
    group = n_head // n_head_kv
    if gqa:
        order = list(range(n_head))  # group 0 first, then group 1, ...
    else:
        # round-robin over groups: h = 0, group, 2*group, ..., 1, group+1, ...
        order = [g * group + i for i in range(group) for g in range(n_head_kv)]
    mask = np.zeros((n_layer, n_head), np.int32)
    mask[:, order[:k]] = 1
    return mask


@dataclasses.dataclass
class BenchRow:
    ctx: int
    mode: str            # "dense" or "sparse"
    density: float       # asked for
    kept: float          # heads actually kept (round(density * n_head) per layer) / n_head
    tok_s: float
    step_ms: float
    ratio: float | None  # median over pairs of dense step time / sparse step time, same run
    limit: float | None  # Amdahl limit of the ratio at this kept fraction (None: not profiled)
    flash_attn: bool
    repack: bool
    cache: str = "f16"   # K and V cache type
    kv_budget: int = 0   # token budget, cells per KV group (0: none)


# weight types the CPU backend may repack into its own layout (ggml-cpu/repack.cpp)
REPACKABLE_TYPES = ("Q4_0", "Q4_K", "IQ4_NL", "Q8_0")


def repackable_types(model_path) -> list[str]:
    """Weight types in the model that the CPU backend may repack; none means the repack
    setting cannot change anything, so the benchmark does not measure both."""
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(str(model_path)).tensors}
    return sorted(types & set(REPACKABLE_TYPES))


# bytes per value of the KV cache types bench tries
_CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def _tensor_bytes(model_path) -> tuple[dict[str, int], dict[str, int]]:
    """Each tensor's size in bytes, and the row width of each K and V projection (the values a
    token adds to that layer's cache), from the GGUF."""
    from gguf import GGUFReader

    r = GGUFReader(str(model_path))
    size = {t.name: int(t.n_bytes) for t in r.tensors}
    kv_width = {t.name: int(t.shape[-1]) for t in r.tensors if t.name.endswith(("attn_k.weight", "attn_v.weight"))}
    return size, kv_width


def skipped_byte_share(model_path, ctx: int, layer_ops: list[int], cache: str = "f16") -> float:
    """Of the bytes a decode step reads that head sparsity can skip (per layer: wq, the K and V
    cache rows of ``ctx`` tokens, wo), the share that the parts running sparse (``layer_ops``
    bits: 1 wq, 2 K*q and softmax*V, 4 wo) do skip when a head is dropped: 1.0 with no
    fallback; less where, say, a K-quant wo runs dense. On a GPU (bit 8) wq and wo are not
    skippable at all (see ``byte_share``)."""
    size, kv_width = _tensor_bytes(model_path)
    skippable = skipped = 0.0
    for il, ops in enumerate(layer_ops):
        wq, wo = size[f"blk.{il}.attn_q.weight"], size[f"blk.{il}.attn_output.weight"]
        if ops >= 0 and ops & OP_ON_DEVICE:
            wq = wo = 0
        kv = ctx * _CACHE_BYTES[cache] * (kv_width[f"blk.{il}.attn_k.weight"] + kv_width[f"blk.{il}.attn_v.weight"])
        skippable += wq + kv + wo
        skipped += wq * bool(ops & 1) + kv * bool(ops & 2) + wo * bool(ops & 4)
    return skipped / skippable


def _weight_and_cell_bytes(model_path, cache: str) -> tuple[dict[str, int], int, float]:
    """Each tensor's size, the bytes of the weights a decode step reads (every one but the token
    embedding, whose one row is negligible), and the bytes of one cached cell's K and V rows in
    every layer."""
    size, kv_width = _tensor_bytes(model_path)
    weights = sum(n for name, n in size.items() if name != "token_embd.weight")
    return size, weights, _CACHE_BYTES[cache] * sum(kv_width.values())


def byte_share(model_path, ctx: int, cache: str = "f16", gpu: bool = False) -> float:
    """Of the bytes one decode step reads (the weights and the K and V cache rows of ``ctx``
    tokens), the share head sparsity can skip: the KV rows and, on the CPU, wq and wo too (on
    the GPU they run dense, masked)."""
    size, weights, kv_cell = _weight_and_cell_bytes(model_path, cache)
    kv = ctx * kv_cell
    wqo = 0 if gpu else sum(n for name, n in size.items() if name.endswith(("attn_q.weight", "attn_output.weight")))
    return (kv + wqo) / (weights + kv)


def _timed_step(eng: Engine, token: int, ctx: int) -> float:
    t0 = time.perf_counter()
    eng.step(token)
    dt = time.perf_counter() - t0
    eng.rollback(ctx)  # every step decodes at the same position
    return dt


# Filled caches of the current context length, as sequence states keyed by what they depend on
# (flash attention, KV cache types, the tokens): each configuration's prefill runs once, and every
# other engine of that configuration gets a copy (Engine.load_state; the same cache, bit for bit).
_prefills: dict = {}


def _fill(eng: Engine, ctx: int, tokens: list[int]) -> None:
    key = (eng.flash_attn, eng.cache_types, ctx, hash(tuple(tokens[:ctx])))
    if key in _prefills:
        eng.load_state(_prefills[key])
        return
    eng.reset()
    eng.prefill(tokens[:ctx])
    for k in [k for k in _prefills if k[2] != ctx]:  # one context length at a time: a state is up to a few hundred MB
        del _prefills[k]
    _prefills[key] = eng.save_state()


FILLER = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "
DENSITY_STEPS = 32  # decode steps over which a trained predictor's density is read


def _context_tokens(eng: Engine, n: int, text_file: Path | None) -> list[int]:
    """``n`` tokens to fill the cache with: a run of real text from the middle of the held-out
    second half of ``text_file``, or without one a repeated sentence."""
    if text_file is None:
        base = eng.tokenize(FILLER, add_bos=False)
        return (base * (n // len(base) + 1))[:n]
    toks = eng.tokenize(text_file.read_text(encoding="utf-8", errors="replace"), add_bos=False, special=True)
    half = toks[len(toks) // 2:]
    if len(half) < n:
        raise ValueError(f"{text_file}: its second half has {len(half)} tokens, {n} are needed")
    start = (len(half) - n) // 2
    return half[start:start + n]


def stack_trained(model_path, spec: str, n_ctx: int, threads: int, fa: bool, rp: bool, cache: str = "f16",
                  ngl: int = 0, rpc: Sequence[str] = ()) -> Engine:
    """A context whose sparse decode takes its masks from the in-graph predictor ``spec``, with
    its fill (no tensor hook: nothing slows the timed steps); ``ngl`` layers on the GPU, with
    their part of the predictor."""
    from ..predictors.trained import TrainedHeads
    from ..predictors.specs import get_predictor

    pred = get_predictor(spec, model_path)
    if not isinstance(getattr(pred, "inner", pred), TrainedHeads):
        raise ValueError(f"bench --predictor takes a trained:PRED.gguf predictor, not {spec!r}")
    eng = Engine(model_path, n_ctx=n_ctx, n_threads=threads, flash_attn=fa, repack=rp,
                 cache_type_k=cache, cache_type_v=cache, n_gpu_layers=ngl, rpc=rpc)
    try:
        # its rule, density control and fill (part of what the predictor costs), without the
        # hook that reads its masks back
        pred.bind(eng)
    except BaseException:
        eng.close()
        raise
    return eng


def _fastest_dense(model_path, ctx: int, threads: int, reps: int, fa_options, repack_options, say,
                   text_file: Path | None = None, caches=("f16",), ngl: int = 0, n_ctx: int = 0,
                   rpc: Sequence[str] = ()) -> tuple[bool, bool, str]:
    """The stock configuration (flash attention, repack, KV cache type) with the fastest decode
    at ``ctx``; a quantized cache is tried with flash attention only (llama.cpp quantizes V only
    with it). Every configuration's cache is filled first, then their steps are timed in turns
    (``max(5, reps // 2)`` rounds, the median of each): a machine whose speed drifts during the
    search moves every configuration alike instead of favouring the one timed at a fast moment."""
    configs = [(fa, rp, cache) for fa in fa_options for rp in repack_options for cache in caches
               if fa or cache in ("f16", "f32", "bf16")]
    engines = []
    toks = None
    try:
        for fa, rp, cache in configs:
            eng = Engine(model_path, n_ctx=max(n_ctx, ctx + 16), n_threads=threads, flash_attn=fa, repack=rp,
                         cache_type_k=cache, cache_type_v=cache, n_gpu_layers=ngl, rpc=rpc)
            engines.append(eng)
            if toks is None:  # the same tokenizer in every configuration: the text is read once
                toks = _context_tokens(eng, ctx + 1, text_file)
            say(f"ctx {ctx}: dense, {_label(fa, rp, cache)}: filling the cache")
            _fill(eng, ctx, toks)
            _timed_step(eng, toks[ctx], ctx)  # warm-up
        times: list[list[float]] = [[] for _ in configs]
        for _ in range(max(5, reps // 2)):
            for k, eng in enumerate(engines):
                times[k].append(_timed_step(eng, toks[ctx], ctx))
    finally:
        for eng in engines:
            eng.close()
    meds = [statistics.median(t) for t in times]
    for (fa, rp, cache), med in zip(configs, meds):
        say(f"ctx {ctx}: dense, {_label(fa, rp, cache)}: {1 / med:.1f} tok/s")
    return configs[int(np.argmin(meds))]


def _label(fa: bool, rp: bool, cache: str) -> str:
    return f"flash attention {'on' if fa else 'off'}, repack {'on' if rp else 'off'}, {cache} cache"


def _profile(model_path, ctx: int, threads: int, fa: bool, rp: bool, masks: dict, reps: int, say,
             text_file: Path | None = None, cache: str = "f16", window: tuple[int, int] | None = None,
             kv_budget: int = 0, n_ctx: int = 0) -> dict:
    """Per-part profile of the dense step and of the sparse step at each density (with window
    fill and the token budget of the sparse rows)."""
    timer = NodeTimer()
    with Engine(model_path, n_ctx=max(n_ctx, ctx + 16), n_threads=threads, flash_attn=fa, repack=rp, tensor_hook=timer,
                cache_type_k=cache, cache_type_v=cache) as eng:
        toks = _context_tokens(eng, ctx + 1, text_file)
        say(f"ctx {ctx}: profiling, filling the cache")
        _fill(eng, ctx, toks)

        def step():
            _timed_step(eng, toks[ctx], ctx)

        out = {"dense": profile_steps(eng, timer, step, reps)}
        say(f"ctx {ctx}: skippable share of the dense step {out['dense']['skippable_share']:.3f}")
        eng.set_sparse(True)
        if window:
            eng.set_head_window(*window)
        if kv_budget:
            eng.set_kv_budget(kv_budget)
        out["sparse"] = {}
        for d, m in masks.items():
            eng.set_mask(m)
            out["sparse"][str(d)] = profile_steps(eng, timer, step, reps)
    return out


def budget_limit(dense_profile: dict, kept: float, budget: int, ctx: int) -> float:
    """The Amdahl limit of a step with head density ``kept`` and a token budget: from the dense
    profile's parts, wq and wo scale with ``kept``, K*q, the softmax and softmax*V with ``kept``
    times the budget's share of the context (the softmax runs over the selected pages only:
    ggml_soft_max_ext_set_pages; the page bounds' reads and the selection are not counted: the
    limit of skipping, as for heads alone)."""
    ms = dense_profile["parts_ms"]
    total = sum(ms.values())
    frac = min(1.0, budget / max(ctx, 1))
    heads_only = sum(ms.get(k, 0.0) for k in ("wq", "wo"))
    kv = sum(ms.get(k, 0.0) for k in ("kq", "softmax", "kqv"))
    after = total - heads_only - kv + kept * heads_only + kept * frac * kv
    return total / after


def budget_byte_limit(model_path, ctx: int, cache: str, kv_kept: float, budget: int, page: int) -> float:
    """The bytes-based limit of a GPU step with a token budget: the dense step reads every weight
    and the K/V rows of ``ctx`` cells; the sparse one the weights, for the KV heads it keeps
    (``kv_kept``) the rows of ``budget`` cells (at most ``ctx``), and every layer's page bounds
    (2 x head width F32 values per page of ``page`` cells and KV head), which the selection reads
    whatever it keeps."""
    _, weights, kv_cell = _weight_and_cell_bytes(model_path, cache)
    k_cell = sum(w for name, w in _tensor_bytes(model_path)[1].items() if name.endswith("attn_k.weight"))
    bounds = -(-ctx // page) * 2 * 4 * k_cell
    dense = weights + ctx * kv_cell
    return dense / (weights + kv_kept * min(budget, ctx) * kv_cell + bounds)


def kv_head_density(masks: np.ndarray, n_head_kv: int) -> float:
    """Mean share of KV heads that keep one of their query heads (whose K/V rows are then read),
    over masks [..., n_head] whose query heads are grouped n_head // n_head_kv per KV head."""
    m = np.asarray(masks)
    return float(m.reshape(*m.shape[:-1], n_head_kv, -1).max(axis=-1).mean())


def _trained_density(model_path, ctx: int, threads: int, fa: bool, rp: bool, spec: str, toks: list[int],
                     cache: str = "f16", ngl: int = 0, n_ctx: int = 0, rpc: Sequence[str] = ()) -> tuple[float, float]:
    """Mean density the in-graph predictor chooses over the ``DENSITY_STEPS`` tokens that follow
    the context (teacher-forced, so the steps see the text go on), of heads and of KV heads (a KV
    head is read when one of its query heads is kept)."""
    from ..predictors.specs import get_predictor

    pred = get_predictor(spec, model_path)
    with open_engine(model_path, pred, n_ctx=max(n_ctx, ctx + DENSITY_STEPS + 16), n_threads=threads, flash_attn=fa,
                     repack=rp, cache_type_k=cache, cache_type_v=cache, n_gpu_layers=ngl, rpc=rpc) as eng:
        _fill(eng, ctx, toks)
        eng.set_sparse(True)
        masks = []
        for i, t in enumerate(toks[ctx:ctx + DENSITY_STEPS]):
            eng.predicted_step(pred, i, t)
            masks.append(pred.observed())
        n_head_kv = eng.n_head_kv
    return float(np.mean(masks)), kv_head_density(np.array(masks), n_head_kv)


def run(model_path, ctxs: list[int], densities: list[float], threads: int, reps: int, *,
        flash_attn: str = "auto", gqa: bool = False, profile: bool = True, trained: str | None = None,
        progress: Callable[[str], None] | None = None, text_file: Path | None = None,
        caches: tuple[str, ...] = ("f16", "q8_0"), window: tuple[int, int] | None = None, ngl: int = 0,
        kv_budget: int = 0, n_ctx: int = 0, sparse_min_ctx: int = 0, rpc: Sequence[str] = (),
        kv_page: int = KV_PAGE) -> dict:
    """Measure; returns a dict ready for JSON (rows, per-context profiles, the set-up). With
    ``text_file`` the caches hold real text (held-out half) instead of a repeated sentence.
    ``caches``: the KV cache types the fastest-stock search tries (quantized ones with flash
    attention); sparse runs in the winner's configuration. ``window`` (S, W): the fixed-density
    rows run with window fill (skipped heads attend over S + W KV cells). ``ngl``: layers on the
    GPU; the sparse contexts then run with flash attention and an F16 cache (the CUDA kernel's
    fastest) whatever the dense winner, there is no profile, and each ratio's limit is the
    bytes-based one (``byte_share``). ``kv_budget``: the fixed-density rows (and a trained spec
    without its own ``:budget=``) read about that many cells per KV group (``Engine.set_kv_budget``);
    their limit counts K*q and softmax*V at the budget's share of the context (``budget_limit``; on a
    GPU the bytes of ``budget_byte_limit``, the page bounds included), pages of ``kv_page`` cells.
    ``n_ctx``: every engine's context size (0: each depth plus what the timed steps need).
    ``sparse_min_ctx``: the sparse engines decode on the stock graph at depths below it
    (``Engine.set_sparse_min_ctx``), as generate and serve do with ``--sparse-min-ctx``.
    ``rpc``: the ``ngl`` offloaded layers on these RPC servers instead of a GPU; their kernels are
    the CPU's, so sparse keeps the dense winner's configuration, there is no profile (the eval
    callback would wait on the network at every node), and the limit is the bytes-based one with
    wq and wo dense on the servers' layers (as on a GPU) and the KV rows of the kept heads."""
    if n_ctx and n_ctx < max(ctxs) + DENSITY_STEPS + 16:
        raise ValueError(f"-c {n_ctx} is smaller than the deepest -d ({max(ctxs)}) plus the {DENSITY_STEPS + 16} cells "
                         "the timed steps need")
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    fa_options = {"on": [True], "off": [False], "auto": [False, True]}[flash_attn]
    gpu = bool(ngl) and not rpc
    repack_types = repackable_types(model_path) if not gpu else []
    repack_options = [True, False] if repack_types else [True]
    if ngl:
        profile = False  # node-by-node timing through the eval callback is not faithful on a GPU (or RPC)
    elif not repack_types:
        say("no weights of a type the CPU backend repacks: repack left on, not measured both ways")
    rows: list[BenchRow] = []
    choices, profiles = {}, {}
    trained_ops = None
    for ctx in ctxs:
        ctx_size = max(n_ctx, ctx + 16)
        # the dense baseline is the fastest stock configuration on this machine
        fa, rp, cache = _fastest_dense(model_path, ctx, threads, reps, fa_options, repack_options, say, text_file,
                                       caches, ngl, n_ctx, rpc)
        choices[ctx] = {"flash_attn": "on" if fa else "off", "repack": "on" if rp else "off", "cache": cache}
        kw = dict(n_ctx=ctx_size, n_threads=threads, flash_attn=fa, repack=rp, cache_type_k=cache, cache_type_v=cache,
                  n_gpu_layers=ngl, rpc=rpc)
        # on a GPU sparse decode runs in flash attention with an F16 cache: the CUDA kernel reads
        # Q8_0 too, but in 2-byte loads, and was slower with it at 32K (Llama-2-7B's shape, H100)
        s_fa, s_cache = (True, "f16") if gpu else (fa, cache)
        skw = dict(kw, flash_attn=s_fa, cache_type_k=s_cache, cache_type_v=s_cache)
        with Engine(model_path, **kw) as dense, Engine(model_path, **skw) as sparse:
            toks = _context_tokens(dense, ctx + 1 + DENSITY_STEPS, text_file)
            say(f"ctx {ctx}: filling two caches (dense, sparse), flash attention {'on' if fa else 'off'}")
            _fill(dense, ctx, toks)
            _fill(sparse, ctx, toks)
            sparse.set_sparse_min_ctx(sparse_min_ctx)
            sparse.set_sparse(True)
            if window:
                sparse.set_head_window(*window)
            if kv_budget:
                sparse.set_kv_budget(kv_budget, page=kv_page)
            masks = {d: heads_for_density(d, sparse.n_layer, sparse.n_head, sparse.n_head_kv, gqa) for d in densities}
            layer_ops = sparse.layer_ops()
            # warm-up: build both graphs
            _timed_step(dense, toks[ctx], ctx)
            sparse.set_mask(masks[densities[0]])
            _timed_step(sparse, toks[ctx], ctx)
            times = {"dense": []} | {d: [] for d in densities}
            ratios = {d: [] for d in densities}
            t_eng = None
            if trained:
                from ..predictors.specs import with_budget

                t_eng = stack_trained(model_path, with_budget(trained, kv_budget), ctx_size, threads, s_fa, rp, s_cache, ngl, rpc)
                trained_ops = t_eng.layer_ops()
                t_budget = t_eng.kv_budget[0] if t_eng.kv_budget else 0
                t_eng_page = t_eng.kv_budget[1] if t_eng.kv_budget else KV_PAGE
                _fill(t_eng, ctx, toks)
                t_eng.set_sparse_min_ctx(sparse_min_ctx)
                t_eng.set_sparse(True)
                _timed_step(t_eng, toks[ctx], ctx)
                times["trained"], ratios["trained"] = [], []
            for r in range(reps):
                # each sparse step is paired with a dense step right before it, so that the
                # ratio of the pair is not moved by drift in the machine's speed
                for d in densities:
                    t_dense = _timed_step(dense, toks[ctx], ctx)
                    sparse.set_mask(masks[d])
                    t_sparse = _timed_step(sparse, toks[ctx], ctx)
                    times["dense"].append(t_dense)
                    times[d].append(t_sparse)
                    ratios[d].append(t_dense / t_sparse)
                if t_eng is not None:
                    t_dense = _timed_step(dense, toks[ctx], ctx)
                    t_sparse = _timed_step(t_eng, toks[ctx], ctx)
                    times["dense"].append(t_dense)
                    times["trained"].append(t_sparse)
                    ratios["trained"].append(t_dense / t_sparse)
            if t_eng is not None:
                t_eng.close()
        share = byte_share(model_path, ctx, s_cache, gpu=True) if ngl else None
        if profile:
            profiles[ctx] = _profile(model_path, ctx, threads, fa, rp, masks, max(3, reps // 4), say, text_file, cache,
                                     window, kv_budget, n_ctx)
            if trustworthy(profiles[ctx]["dense"]):
                share = profiles[ctx]["dense"]["skippable_share"]
            else:
                say(f"ctx {ctx}: the profile accounts for {profiles[ctx]['dense']['accounted']:.2f} of the step: "
                    "no Amdahl limit (node-by-node timing is not faithful at this thread count)")
        dense_med = statistics.median(times["dense"])
        rows.append(BenchRow(ctx, "dense", 1.0, 1.0, 1 / dense_med, dense_med * 1e3, None, None, fa, rp, cache))
        for d in densities:
            med = statistics.median(times[d])
            ratio = statistics.median(ratios[d])
            kept = float(masks[d].mean())
            if gpu and kv_budget:
                limit = budget_byte_limit(model_path, ctx, s_cache, kv_head_density(masks[d], sparse.n_head_kv),
                                          kv_budget, kv_page)
            elif gpu:  # K/V rows are read for every KV head that keeps one of its query heads
                limit = amdahl_limit(share, kv_head_density(masks[d], sparse.n_head_kv))
            elif kv_budget:
                limit = budget_limit(profiles[ctx]["dense"], kept, kv_budget, ctx) if ctx in profiles and share is not None else None
            else:
                limit = amdahl_limit(share, kept) if share is not None else None
            rows.append(BenchRow(ctx, "sparse", d, kept, 1 / med, med * 1e3, ratio, limit, s_fa, rp, s_cache, kv_budget))
            say(f"ctx {ctx}: sparse density {d:g}: {1 / med:.1f} tok/s ({ratio:.3f}x dense {1 / dense_med:.1f}"
                + (f", limit {limit:.3f}x)" if limit else ")"))
        if trained:
            kept, kv_kept = _trained_density(model_path, ctx, threads, s_fa, rp, trained, toks, s_cache, ngl, n_ctx,
                                             rpc)
            med, ratio = statistics.median(times["trained"]), statistics.median(ratios["trained"])
            limit = amdahl_limit(share, kv_kept if gpu else kept) if share is not None else None
            if t_budget and ctx in profiles and share is not None:
                limit = budget_limit(profiles[ctx]["dense"], kept, t_budget, ctx)
            elif t_budget and gpu:
                limit = budget_byte_limit(model_path, ctx, s_cache, kv_kept, t_budget, t_eng_page)
            rows.append(BenchRow(ctx, "trained", kept, kept, 1 / med, med * 1e3, ratio, limit, s_fa, rp, s_cache,
                                 t_budget))
            say(f"ctx {ctx}: {trained} (density {kept:.3f} here, predictor included): {1 / med:.1f} tok/s "
                f"({ratio:.3f}x dense {1 / dense_med:.1f})")
    _prefills.clear()
    return {
        "model": str(model_path),
        "threads": threads,
        "n_gpu_layers": ngl,
        "limit_kind": "bytes" if ngl else "profile",
        "rpc": list(rpc),  # servers on 127.0.0.1: a loopback figure
        "reps": reps,
        "gqa_masks": gqa,
        "trained": trained,
        "window": list(window) if window else None,
        "kv_budget": kv_budget,
        "kv_page": kv_page if kv_budget else None,
        "n_ctx": n_ctx or None,
        "sparse_min_ctx": sparse_min_ctx,
        "context_text": str(text_file) if text_file else "filler",
        "dense_config": {str(c): v for c, v in choices.items()},
        "repackable_types": repack_types,
        "sparse_layer_ops": layer_ops,
        # with a trained predictor, its context's (bit 16: the predictor runs on the GPU)
        "trained_layer_ops": trained_ops,
        # of the bytes head sparsity could skip, the share the sparse parts skip (fallbacks)
        "skipped_byte_share": {str(c): skipped_byte_share(model_path, c, layer_ops, choices[c]["cache"]) for c in ctxs},
        "rows": [dataclasses.asdict(r) for r in rows],
        "profiles": {str(c): p for c, p in profiles.items()},
    }


def format_table(result: dict) -> str:
    """Markdown: per context, dense tok/s and per density sparse tok/s (ratio, Amdahl limit)."""
    rows = result["rows"]
    densities = [r["density"] for r in rows if r["mode"] == "sparse" and r["ctx"] == rows[0]["ctx"]]
    win = result.get("window")
    fill = f" (window {win[0]}+{win[1]})" if win else ""
    head = "| ctx | dense config | dense tok/s | " + " | ".join(f"density {d:g}{fill}" for d in densities)
    if any(r["mode"] == "trained" for r in rows):
        head += f" | {result['trained']} (density chosen)"
    head += " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_ctx: dict[int, list[dict]] = {}
    for r in rows:
        by_ctx.setdefault(r["ctx"], []).append(r)
    for ctx, rs in by_ctx.items():
        dense = next(r for r in rs if r["mode"] == "dense")
        prof = result.get("profiles", {}).get(str(ctx))
        faithful = prof is None or trustworthy(prof["dense"])
        cells = []
        for r in rs:
            if r["mode"] == "sparse":
                limit = f" of {r['limit']:.2f}x" if r["limit"] and faithful else ""
                cells.append(f"{r['tok_s']:.1f} ({r['ratio']:.2f}x{limit})")
            elif r["mode"] == "trained":
                cells.append(f"{r['tok_s']:.1f} ({r['ratio']:.2f}x, density {r['kept']:.2f})")
        cfg = f"FA {'on' if dense['flash_attn'] else 'off'}, repack {'on' if dense['repack'] else 'off'}"
        if dense.get("cache", "f16") != "f16":
            cfg += f", {dense['cache']} cache"
        lines.append(f"| {ctx} | {cfg} | {dense['tok_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_profile(result: dict) -> str:
    """Markdown: per context, ms per step in each skippable part, dense and sparse."""
    parts = ["wq", "kq", "softmax", "kqv", "flash_attn", "wo"]
    head = "| ctx | graph | step ms | skippable share | " + " | ".join(parts) + " | rest |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for ctx, prof in result.get("profiles", {}).items():
        graphs = [("dense", prof["dense"])] + [(f"sparse {d}", p) for d, p in prof["sparse"].items()]
        for label, p in graphs:
            ms = p["parts_ms"]
            rest = sum(v for k, v in ms.items() if k not in parts)
            share = sum(ms.get(k, 0.0) for k in parts) / max(sum(ms.values()), 1e-9)
            if not trustworthy(p):
                accounted = sum(ms.values()) / max(p["step_ms"], 1e-9)
                lines.append(f"| {ctx} | {label} | {p['step_ms']:.2f} | (parts add up to {accounted:.2f}x the step: "
                             "not faithful) |" + " |" * (len(parts) + 1))
                continue
            lines.append(f"| {ctx} | {label} | {p['step_ms']:.2f} | {share:.3f} | "
                         + " | ".join(f"{ms.get(k, 0.0):.2f}" for k in parts) + f" | {rest:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """tok/s against context length: one line per density, dense dashed."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'powerinfer-attn[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ctxs = sorted({r["ctx"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = [next(r["tok_s"] for r in rows if r["ctx"] == c and r["mode"] == "dense") for c in ctxs]
    ax.plot(ctxs, dense, "k--o", label="dense (fastest stock config)")
    for d in sorted({r["density"] for r in rows if r["mode"] == "sparse"}, reverse=True):
        ys = [next(r["tok_s"] for r in rows if r["ctx"] == c and r["mode"] == "sparse" and r["density"] == d) for c in ctxs]
        ax.plot(ctxs, ys, "-o", label=f"sparse, density {d:g}")
    trained = [next((r["tok_s"] for r in rows if r["ctx"] == c and r["mode"] == "trained"), None) for c in ctxs]
    if all(t is not None for t in trained):
        ax.plot(ctxs, trained, "-s", color="tab:purple", label="sparse, trained predictor (in graph)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{Path(result['model']).name}, {result['threads']} threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
