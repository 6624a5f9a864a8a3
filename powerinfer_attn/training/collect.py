"""Training data for a head predictor: per layer and token, the attention input and each
head's importance, recorded from dense runs over a text.

The text is split into WikiText articles (top-level `` = Title = `` headings). Only whole
articles that end in the first ``TRAIN_FRACTION`` of the file are used, and ``collect``
checks that they end before the token midpoint of the text, where ``score`` starts its
windows: a predictor is never scored on the articles it was trained on.

Recorded per chunk of ``batch`` tokens (each chunk a fresh dense prefill), as ``.npy`` files
in the output directory so memory stays bounded by one chunk:

- ``x-NNNNN.npy``: float16 ``[n_layer, n_tokens, n_embd]``, each layer's ``attn_norm`` output
  (the input of wq/wk/wv, which is what the in-graph predictor reads);
- ``imp-NNNNN.npy``: float32 ``[n_tokens, n_layer, n_head]``, the norm of each head's
  contribution through ``wo`` (``importance.HeadContributions``);
- ``resid-NNNNN.npy``: float32 ``[n_tokens, n_layer]``, the norm of the residual stream the
  attention output is added to (``ffn_inp - attn_out``), the scale a head's contribution is
  judged against;
- ``dev-mean-NNNNN.npy`` and ``dev-linear-NNNNN.npy``: float32 ``[n_tokens, n_layer, n_head]``,
  the norm of each contribution's deviation from what mean fill and linear fill would put in
  its place (a head's importance under that fill; ``predictors/fill.py``), with both fills in
  ``fill.npz``, fitted first on every ``FILL_EVERY``-th chunk (every sequence when there are few:
  ``fill_sequences``).

``meta.json`` says which model, text and articles, and the shapes, and holds each layer's
sensitivity, with skipped heads zeroed (``layer_sensitivity``) and with them linearly filled
(``layer_sensitivity_linear``, the fill written to ``fill.gguf`` for that run), which
``train`` turns into per-layer budgets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..engine.decode import Engine, TensorHook
from ..predictors.fill import FillFitter, HeadFill
from ..predictors.importance import HeadContributions, mass_mask
from ..predictors.predictor_file import read_fill, write_predictor
from ..engine.text import log_softmax, require_training_articles

_NAMED = re.compile(r"^(attn_norm|attn_out|ffn_inp)-(\d+)$")


class _Recorder(TensorHook):
    """Importance (through ``HeadContributions``) plus attn_norm, attn_out and ffn_inp per layer."""

    def __init__(self, model_path: Path, n_layer: int, n_head: int, fill: HeadFill | None = None):
        self.heads = HeadContributions(model_path, n_layer, n_head, fill=fill)
        self.n_layer = n_layer
        self.x: list[np.ndarray | None] = [None] * n_layer
        self.attn_out: list[np.ndarray | None] = [None] * n_layer
        self.resid = None

    def wants(self, name: str) -> bool:
        return self.heads.wants(name) or _NAMED.match(name) is not None

    def __call__(self, name: str, data: np.ndarray) -> None:
        if self.heads.wants(name):
            self.heads(name, data)
        m = _NAMED.match(name)
        if m is None:
            return
        what, il = m.group(1), int(m.group(2))
        rows = data.reshape(-1, data.shape[-1])
        if what == "attn_norm":
            self.x[il] = rows.astype(np.float16)
        elif what == "attn_out":
            self.attn_out[il] = rows.copy()
        else:  # ffn_inp = residual + attn_out
            if il == 0 or self.resid is None or self.resid.shape[0] != rows.shape[0]:
                self.resid = np.zeros((rows.shape[0], self.n_layer), np.float32)
            self.resid[:, il] = np.linalg.norm(rows - self.attn_out[il], axis=1)


SENSITIVITY_STEPS = 4 * 32  # windows x steps per layer in layer_sensitivity's defaults
FILL_EVERY = 4  # the fills are fitted on every 4th chunk (a quarter of the cost of the data)


def fill_sequences(seqs: list) -> list:
    """The sequences the fills are fitted on: every ``FILL_EVERY``-th when there are enough for
    that to spread over the whole text, else all of them. (Four 8192-token sequences of a mixed
    text gave a fill of one sequence, two kinds of text: it stood in worse on WikiText than a
    WikiText fill, docs/results-cpu.md.)"""
    return seqs[::FILL_EVERY] if len(seqs) >= 4 * FILL_EVERY else list(seqs)


def fill_tokens(tokens: int, seq_len: int) -> int:
    """About how many tokens ``fill_sequences`` fits on, for progress bars."""
    return len(fill_sequences(range(max(1, tokens // seq_len)))) * seq_len


def collect(model_path: Path, text_file: Path, out: Path, tokens: int = 32768, batch: int = 512,
            threads: int | None = None, sensitivity: bool = True,
            progress: Callable[[int], None] | None = None, seq_len: int | None = None,
            resume: bool = False, fill_from: Path | None = None) -> dict:
    """Record training data from the training articles of ``text_file`` into ``out``; returns
    the metadata written to ``out/meta.json``.

    ``resume``: go on with a run into ``out`` that was stopped: its plan (``plan.json``: model,
    text, tokens, sequence and chunk length) must be this one's; its fills are reused and the
    sequences whose chunks were all written are not run again (``pos-NNNNN.npy`` is a chunk's
    last file).

    ``seq_len`` (a multiple of ``batch``; default ``batch``): the text is read as sequences of
    that many consecutive tokens, each prefilled from position 0 in chunks of ``batch`` and
    every chunk recorded, so the data covers positions 0 .. seq_len-1 evenly: with 8192, what
    heads do deep into the trained context (far tokens, sinks). The fills are then fitted on
    long sequences too, and the layer sensitivities measured after a prefix of seq_len/2.

    ``fill_from`` (a predictor file with a linear fill): the importances are deviations from
    that file's fill instead of one fitted here, so that the data judges that file on another
    text (``diagnose``); it then holds no mean fill."""
    seq_len = seq_len or batch
    if seq_len < batch or seq_len % batch:
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of the chunk size {batch}")
    text = text_file.read_text(encoding="utf-8", errors="replace")
    arts = require_training_articles(text, text_file)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"model_name": Path(model_path).name, "text_file": str(text_file), "tokens": tokens,
            "batch": batch, "seq_len": seq_len, "fill_from": str(fill_from) if fill_from else None}
    if fill_from is not None:
        kind, given_fill = read_fill(Path(fill_from))
        if kind != "linear":
            raise ValueError(f"{fill_from} holds no linear fill (train-predictor --fill linear writes one)")
    if resume:
        old_plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else None
        if old_plan != plan:
            raise ValueError(f"cannot resume in {out}: its plan {old_plan} is not this run's {plan}")
        if not (out / "fill.npz").exists():
            raise ValueError(f"cannot resume in {out}: it has no fill.npz (the run stopped before its fills)")
    else:
        for old in out.glob("*-*.npy"):
            old.unlink()
        (out / "fill.npz").unlink(missing_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
    with Engine(model_path, n_ctx=batch + 8, n_threads=threads, n_batch=batch) as probe:
        n_layer, n_head, n_embd = probe.n_layer, probe.n_head, probe.n_embd
        whole = len(probe.tokenize(text, add_bos=False, special=True))
        end_chars = arts[-1][1]
        train_toks = probe.tokenize(text[:end_chars], add_bos=False, special=True)
    # score's windows start at the token midpoint of the whole text
    if len(train_toks) > whole // 2:
        raise ValueError(f"training articles reach token {len(train_toks)}, past the scored half ({whole // 2})")
    # sequences of consecutive tokens spread evenly over the training articles
    n_want = max(1, min(tokens, len(train_toks)) // seq_len)
    step = len(train_toks) // n_want
    seqs = [train_toks[c * step:c * step + seq_len] for c in range(n_want)]
    seqs = [sq for sq in seqs if len(sq) >= 16]
    used = sum(len(sq) for sq in seqs)
    if resume:
        fill = HeadFill.load(out / "fill.npz")
        if progress:
            progress(sum(len(sq) for sq in fill_sequences(seqs)))
    elif fill_from is not None:
        if given_fill.w.shape[0] != n_layer or given_fill.w.shape[2] != n_embd:
            raise ValueError(f"{fill_from} does not fit {Path(model_path).name}")
        fill = given_fill
        fill.save(out / "fill.npz")
    else:
        fill = fit_fill(model_path, fill_sequences(seqs), n_layer, n_head, batch, threads, progress)
        fill.save(out / "fill.npz")
    rec = _Recorder(model_path, n_layer, n_head, fill=fill)
    n_chunks = 0
    with Engine(model_path, n_ctx=seq_len + 8, n_threads=threads, n_batch=batch, tensor_hook=rec) as eng:
        for sq in seqs:
            n_seq_chunks = -(-len(sq) // batch)
            if resume and all((out / f"pos-{n_chunks + c:05d}.npy").exists() for c in range(n_seq_chunks)):
                n_chunks += n_seq_chunks
                if progress:
                    progress(len(sq))
                continue
            eng.reset()
            for s0 in range(0, len(sq), batch):
                chunk = sq[s0:s0 + batch]
                # all logits: otherwise the last layer keeps only the last token after attention
                eng.prefill(chunk, all_logits=True)
                x = np.stack([rec.x[il] for il in range(n_layer)])
                np.save(out / f"x-{n_chunks:05d}.npy", x)
                np.save(out / f"imp-{n_chunks:05d}.npy", rec.heads.per_token.astype(np.float32))
                np.save(out / f"resid-{n_chunks:05d}.npy", rec.resid.astype(np.float32))
                for kind, dev in rec.heads.per_token_dev.items():
                    np.save(out / f"dev-{kind}-{n_chunks:05d}.npy", dev.astype(np.float32))
                np.save(out / f"pos-{n_chunks:05d}.npy", np.arange(s0, s0 + len(chunk), dtype=np.int32))
                n_chunks += 1
                if progress:
                    progress(len(chunk))
    n_art = sum(1 for a in arts if a[1] <= end_chars)
    sens_prefix = max(64, seq_len // 2) if seq_len > batch else 64
    meta = {
        "model_name": Path(model_path).name,
        "text_file": str(text_file),
        "articles": f"the first {n_art} articles of the file ("
                    + (", ".join(repr(a[2]) for a in arts[:n_art]) if n_art <= 40 else f"{arts[0][2]!r} .. {arts[-1][2]!r}")
                    + f"), characters 0..{end_chars} of {len(text)}",
        "train_tokens_available": len(train_toks),
        "tokens": used,
        "chunks": n_chunks,
        "batch": batch,
        "seq_len": seq_len,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "scored_from_token": whole // 2,
        "fill_tokens": 0 if fill_from else sum(len(sq) for sq in fill_sequences(seqs)),
        "fill_from": str(fill_from) if fill_from else None,
        "sensitivity_prefix": sens_prefix,
        "layer_sensitivity": layer_sensitivity(model_path, train_toks, prefix=sens_prefix, threads=threads,
                                               progress=progress)
        if sensitivity else None,
        "layer_sensitivity_linear": layer_sensitivity(model_path, train_toks, prefix=sens_prefix, threads=threads,
                                                      fill_file=_fill_sidecar(out, fill, n_head, model_path),
                                                      progress=progress)
        if sensitivity else None,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _fill_sidecar(out: Path, fill: HeadFill, n_head: int, model_path: Path) -> Path:
    """``out/fill.gguf``: a predictor file that holds only the linear fill (its predictor is all
    zeros), for the engine runs of ``layer_sensitivity``."""
    n_layer, _, n_embd = fill.w.shape
    path = out / "fill.gguf"
    zeros_w = [np.zeros((n_head, n_embd), np.float32)] * n_layer
    zeros_b = [np.zeros(n_head, np.float32)] * n_layer
    write_predictor(path, zeros_w, zeros_b, Path(model_path).name, "threshold", 0.0,
                    {"note": "linear fill only, for collect's layer sensitivities"}, linear=(fill.w, fill.b))
    return path


def fit_fill(model_path: Path, chunks: list[list[int]], n_layer: int, n_head: int, batch: int,
             threads: int | None, progress: Callable[[int], None] | None = None) -> HeadFill:
    """Mean and linear fill (``predictors/fill.py``), fitted on dense runs over the chunks (each prefilled
    from position 0 in pieces of ``batch``)."""
    hook = FillFitter(n_layer)
    with Engine(model_path, n_ctx=max(len(c) for c in chunks) + 8, n_threads=threads, n_batch=batch,
                tensor_hook=hook) as eng:
        for chunk in chunks:
            eng.reset()
            for s0 in range(0, len(chunk), batch):
                eng.prefill(chunk[s0:s0 + batch], all_logits=True)
            if progress:
                progress(len(chunk))
    return hook.fit(model_path, n_head)


def layer_sensitivity(model_path: Path, tokens: list[int], windows: int = 4, prefix: int = 64, steps: int = 32,
                      fraction: float = 0.7, threads: int | None = None, fill_file: Path | None = None,
                      progress: Callable[[int], None] | None = None) -> list[float]:
    """Per layer, how much the output moves per unit of importance share dropped there.

    In each window of ``tokens``: a dense teacher-forced pass records every step's logits and
    head importance; then, for one layer at a time, the same steps run sparse with only that
    layer pruned (the fewest heads covering ``fraction`` of its importance, from the dense
    pass). Sensitivity = mean KL(dense || sparse) / mean share of importance dropped. Layers
    where the same dropped share costs more deserve more heads.

    With ``fill_file`` (a predictor file holding linear fill) the sparse runs fill the skipped
    heads with it, and importance is each head's deviation from its fill: how much a layer
    costs then depends on how well the fill stands in for its heads there.
    """
    length = prefix + steps
    span = len(tokens) - length
    if span < 0:
        raise ValueError(f"sensitivity needs {length} tokens, the training text has {len(tokens)}")
    starts = [round(i * span / max(windows - 1, 1)) for i in range(windows)]
    with Engine(model_path, n_ctx=length + 8, n_threads=threads) as probe:
        n_layer, n_head = probe.n_layer, probe.n_head
    fill = None
    if fill_file is not None:
        kind, fill = read_fill(fill_file)
        if kind != "linear":
            raise ValueError(f"{fill_file} holds {kind} fill; layer_sensitivity takes a linear one")
    hook = HeadContributions(model_path, n_layer, n_head, fill=fill)
    kl = np.zeros(n_layer)
    dropped = np.zeros(n_layer)
    with Engine(model_path, n_ctx=length + 8, n_threads=threads, tensor_hook=hook) as dense, \
            Engine(model_path, n_ctx=length + 8, n_threads=threads) as sparse:
        if fill is not None:
            sparse.load_head_predictor(fill_file)
            sparse.set_head_fill("linear")
        for s0 in starts:
            win = tokens[s0:s0 + length]
            dense.reset()
            hook.active = False  # the prefix's importance is not needed
            dense.prefill(win[:prefix])
            hook.active = True
            state = dense.save_state()
            d_logits, imps = [], []
            for t in win[prefix:]:
                d_logits.append(dense.step(t))
                imps.append((hook.per_token_dev["linear"] if fill is not None else hook.per_token)[-1].copy())
            ld = log_softmax(np.array(d_logits))
            for il in range(n_layer):
                sparse.load_state(state)
                sparse.set_sparse(True)
                s_logits = []
                for i, t in enumerate(win[prefix:]):
                    mask = np.ones((n_layer, n_head), np.int32)
                    mask[il] = mass_mask(imps[i][il:il + 1], fraction)[0]
                    dropped[il] += float((imps[i][il] * (1 - mask[il])).sum() / imps[i][il].sum())
                    sparse.set_mask(mask)
                    s_logits.append(sparse.step(t))
                sparse.set_sparse(False)
                ls = log_softmax(np.array(s_logits))
                kl[il] += float((np.exp(ld) * (ld - ls)).sum(axis=1).sum())
                if progress:
                    progress(steps)
    return [float(k / max(d, 1e-9)) for k, d in zip(kl, dropped)]


def load_layer(data_dir: Path, il: int, fill: str = "zero") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [N, n_embd] float32, importance [N, n_head], residual norm [N])`` of layer ``il``
    over all chunks (one layer at a time keeps memory at N * n_embd floats). With ``fill``
    ``mean`` or ``linear`` the importance is the deviation from that fill (``dev-FILL-*.npy``)."""
    meta = json.loads((data_dir / "meta.json").read_text())
    if not has_fill(data_dir, fill):
        raise FileNotFoundError(f"{data_dir} holds no data for {fill} fill (collected by an older version): collect again")
    prefix = "imp" if fill == "zero" else f"dev-{fill}"
    xs, imps, res = [], [], []
    for c in range(meta["chunks"]):
        xs.append(np.load(data_dir / f"x-{c:05d}.npy", mmap_mode="r")[il].astype(np.float32))
        imps.append(np.load(data_dir / f"{prefix}-{c:05d}.npy")[:, il])
        res.append(np.load(data_dir / f"resid-{c:05d}.npy")[:, il])
    return np.concatenate(xs), np.concatenate(imps), np.concatenate(res)


def has_fill(data_dir: Path, fill: str) -> bool:
    """Does the collected data hold importance under this fill (and the fill itself)?"""
    if fill == "zero":
        return (data_dir / "imp-00000.npy").is_file()
    return (data_dir / "fill.npz").is_file() and (data_dir / f"dev-{fill}-00000.npy").is_file()
