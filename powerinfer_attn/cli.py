"""`powerinfer-attn`: a thin command line over the library."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys

import click
import numpy as np

from .native import build as build_mod
from .training.corpus import KINDS
from .native.model import default_model_path, resolve_model
from .native.bindings import KV_PAGE, KV_PAGES
from .engine.text import resolve_text_file

model_option = click.option("--model", "-m", "model", type=click.Path(dir_okay=False), default=None,
                            help="GGUF model path (llama, qwen2 or qwen3 architecture for sparse decode) or a known "
                                 "model's name (`model --list`); default: SmolLM2-135M-Instruct Q4_1.")
threads_option = click.option("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores, at most 16).")
def json_option(f):
    """``--json``, and ``-o md|json`` as llama.cpp's tools spell an output format: the command
    receives ``as_json``."""
    @functools.wraps(f)
    def command(*args, as_json=False, output=None, **kwargs):
        return f(*args, as_json=as_json or output == "json", **kwargs)

    command = click.option("--output", "-o", "output", type=click.Choice(["md", "json"]), default=None,
                           help="Output format: md (tables, the default) or json (as --json).")(command)
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(command)


def _json(kind: str, doc) -> str:
    """A result as JSON, its ``kind`` first so that `show` knows what it is; a list is its ``rows``."""
    body = {"rows": doc} if isinstance(doc, list) else {k: v for k, v in doc.items() if k != "kind"}
    return json.dumps({"kind": kind, **body}, indent=1)


def _renamed(new: str):
    """A callback for an old spelling that is gone: a usage error naming the new one."""
    def refuse(ctx, param, value):
        if value:
            raise click.UsageError(f"{param.opts[0]} is now {new} (llama.cpp's spelling)", ctx)
    return refuse


def engine_options(ctx_default: int | None = None, ctx_min: int = 16):
    """llama.cpp's engine flags, one set for every command that decodes: -c (where the command
    sizes no context itself), -ngl, -fa on|off (a bare --flash-attn is on), -ctk, -ctv, --rpc. The
    command receives n_ctx (if any), n_gpu_layers, flash_attn (bool), cache_k, cache_v; --rpc
    goes into the click context, where ``_engine_kw`` takes it."""
    from .native.bindings import CACHE_TYPES

    def to_bool(ctx, param, value):
        return value == "on"

    def deco(f):
        f = click.option("--no-flash-attn", is_flag=True, hidden=True, expose_value=False,
                         callback=_renamed("-fa off"))(f)
        f = click.option("--cache-type-v", "-ctv", "cache_v", type=click.Choice(list(CACHE_TYPES)), default="f16",
                         show_default=True, help="V cache type (quantized types need -fa on).")(f)
        f = click.option("--cache-type-k", "-ctk", "cache_k", type=click.Choice(list(CACHE_TYPES)), default="f16",
                         show_default=True, help="K cache type.")(f)
        f = click.option("--flash-attn", "-fa", "flash_attn", type=click.Choice(["on", "off"]), default="off",
                         is_flag=False, flag_value="on", show_default=True, callback=to_bool,
                         help="Flash attention (the sparse path on a GPU needs it).")(f)
        f = rpc_option(f)
        f = click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=click.IntRange(0), default=0, show_default=True,
                         help="Layers on the GPU (a `build --cuda` library), or on the --rpc servers.")(f)
        if ctx_default is not None:
            f = click.option("--ctx-size", "-c", "n_ctx", type=click.IntRange(ctx_min), default=ctx_default,
                             show_default=True, help="Context size.")(f)
        return f
    return deco


def sparse_min_ctx_option(default: str):
    return click.option("--sparse-min-ctx", "sparse_min_ctx", default=default, show_default=True, metavar="auto|N",
                        help="Decode on the stock graph before this many tokens of context, on the sparse one from "
                             "there (auto: where `bench` measured sparse to pay on this machine; 0: sparse at every "
                             "length).")


def _min_ctx(spec: str, eng, model_path, pred) -> int:
    """``--sparse-min-ctx`` for this engine and predictor, applied to it."""
    from .engine import crossover

    n = crossover.resolve(spec, model_path, eng.n_threads, eng.n_gpu_layers, bool(pred is not None and pred.in_graph),
                          say=lambda m: click.echo(m, err=True))
    eng.set_sparse_min_ctx(n)
    return n


def with_budget(spec: str, kv_budget: int) -> str:
    from .predictors.specs import with_budget as add_budget

    return add_budget(spec, kv_budget)


def kv_budget_option(f):
    """--kv-budget N: every predictor of the command reads about N cells per KV group
    (``:budget=N`` added to its spec)."""
    return click.option("--kv-budget", "kv_budget", type=click.IntRange(0), default=0, show_default=True,
                        help="Token budget: cells each KV group's kept heads read per step (pages chosen in the graph; "
                             "0: all). Same as :budget=N on --predictor; with flash attention or without.")(f)


def rpc_option(f):
    """--rpc host:port[,...]: the offloaded layers on ggml RPC servers (kept in the context)."""
    def keep(ctx, param, value):
        if value:
            from .native.rpc import RPCError, parse_endpoints
            try:
                ctx.meta["rpc"] = parse_endpoints(value)
            except RPCError as e:
                raise click.BadParameter(str(e), ctx, param)
        return value
    return click.option("--rpc", "rpc", metavar="HOST:PORT[,...]", default=None, expose_value=False, callback=keep,
                        help="RPC servers (`powerinfer-attn rpc-server`) for the last -ngl layers, split over them "
                             "by their memory; the rest run here.")(f)


def _rpc() -> list[str]:
    ctx = click.get_current_context(silent=True)
    return list(ctx.meta.get("rpc", [])) if ctx else []


def _engine_kw(flash_attn: bool, cache_k: str, cache_v: str, n_gpu_layers: int = 0) -> dict:
    kw = dict(flash_attn=flash_attn, cache_type_k=cache_k, cache_type_v=cache_v, n_gpu_layers=n_gpu_layers)
    rpc = _rpc()
    if rpc:
        kw["rpc"] = rpc
    return kw


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from e


@contextlib.contextmanager
def user_errors():
    """What a command's input can cause (a missing file, a bad value, an engine that refuses it)
    becomes a one-line error and exit status 1, not a traceback."""
    from .engine.decode import EngineError

    try:
        yield
    except (EngineError, build_mod.BuildError, FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        _fail(e)


@click.group()
@click.version_option(package_name="powerinfer-attn")
def main() -> None:
    """Decode-time attention-head sparsity for llama.cpp."""


@main.command()
@click.option("--check", is_flag=True, help="Only report whether the installed library is the patched one.")
@click.option("--force", is_flag=True, help="Rebuild even when the installed build is current.")
@click.option("--stock", is_flag=True, help="Build the unpatched tree into vendor/stock/site instead (reference for tests).")
@click.option("--cuda", is_flag=True, help="Also build ggml's CUDA backend, for this machine's GPU (needs nvcc).")
@json_option
def build(check: bool, force: bool, stock: bool, cuda: bool, as_json: bool) -> None:
    """Fetch the pinned llama.cpp tree, apply patches/, build and install it."""
    try:
        if stock:
            site = build_mod.build_stock()
            if as_json:
                click.echo(_json("build", {"stock_site": str(site)}))
            return
        if check:
            info = build_mod.check()
            if as_json:
                click.echo(_json("build-check", info))
            else:
                state = "patched" if info["patched"] else "NOT patched (stock or missing)"
                click.echo(f"library: {info['library']}\nstate: {state}"
                           + (f" ({info['patch_version']})" if info["patched"] else "")
                           + f"\nbuilt from the current patch series: {'yes' if info['current'] else 'no'}"
                           + f"\nbackends: {', '.join(info['backends']) or 'none found'}")
            sys.exit(0 if info["patched"] and info["current"] else 1)
        res = build_mod.build(force=force, cuda=cuda)
        if as_json:
            click.echo(_json("build", {"digest": res.digest, "rebuilt": res.rebuilt, "package_dir": str(res.package_dir)}))
    except build_mod.BuildError as e:
        _fail(e)


@main.command()
@click.argument("name", required=False)
@click.option("--list", "list_models", is_flag=True, help="List the models known by name.")
def model(name, list_models) -> None:
    """Print the path of the default model, or of the known model NAME, fetching it on first use."""
    from .native.model import KNOWN_MODELS, known_model_path

    if list_models:
        from .predictors.specs import prepared_predictor_path

        for m in KNOWN_MODELS.values():
            pred = prepared_predictor_path(m.file)
            click.echo(f"{m.name}: {m.about}" + (f"; predictor: {pred}" if pred.is_file() else "; no predictor (`prepare`)"))
        return
    with user_errors():
        click.echo(str(known_model_path(name) if name else default_model_path()))


@main.command()
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("-n", "n_tokens", type=click.IntRange(1), default=32, show_default=True, help="Tokens to generate.")
@engine_options(ctx_default=2048)
@click.option("--ctx", "old_ctx", type=int, default=None, hidden=True, expose_value=False, callback=_renamed("-c/--ctx-size"))
@click.option("--sparse", is_flag=True, help="Decode with sparse attention heads.")
@click.option("--predictor", default=None,
              help="Head predictor for --sparse: all, random:K[:SEED], static:K[:FILE], oracle:P, oracle-topk:K, mask-file:PATH, "
                   "trained:PRED.gguf[:RULE=VALUE], each with an optional :budget=N.")
@kv_budget_option
@sparse_min_ctx_option("auto")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Temperature; 0 is greedy (for comparisons).")
@click.option("--top-k", type=click.IntRange(0), default=40, show_default=True, help="Top-k when sampling (0: all).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.95, show_default=True,
              help="Top-p (nucleus) when sampling.")
@click.option("--seed", "-s", type=int, default=None, help="Seed of the sampler.")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message in the GGUF's chat template.")
@model_option
@threads_option
@json_option
def generate(prompt, n_tokens, n_ctx, n_gpu_layers, flash_attn, cache_k, cache_v, sparse, predictor, kv_budget,
             sparse_min_ctx, temp, top_k, top_p, seed, chat, model, threads, as_json) -> None:
    """Generation through the patched bindings (greedy by default), streamed, with decode speed."""
    from .engine.decode import open_engine
    from .predictors.specs import get_predictor
    from .engine.sampling import Sampler

    if (predictor or kv_budget) and not sparse:
        _fail(ValueError("--predictor and --kv-budget need --sparse"))
    with user_errors():
        path = resolve_model(model)
        pred = get_predictor(with_budget(predictor or "all", kv_budget), path) if sparse else None
        sampler = Sampler(temp, top_k, top_p, seed)
        with open_engine(path, pred, n_ctx=n_ctx, n_threads=threads,
                         **_engine_kw(flash_attn, cache_k, cache_v, n_gpu_layers)) as eng:
            min_ctx = _min_ctx(sparse_min_ctx, eng, path, pred) if sparse else 0
            text = eng.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
            stream = None
            if not as_json:
                click.echo(text, nl=False)
                pending = []

                def stream(tok):
                    # a token may end inside a UTF-8 character: print what decodes whole
                    pending.append(eng.token_piece(tok))
                    try:
                        piece = b"".join(pending).decode("utf-8")
                    except UnicodeDecodeError:
                        return
                    pending.clear()
                    click.echo(piece, nl=False)
            # the template's control tokens as the tokens they name, not spelled out
            g = eng.generate(eng.tokenize(text, special=chat), n_tokens, predictor=pred, sample=sampler, on_token=stream)
            threads_used = eng.n_threads
            layer_ops = eng.layer_ops() if sparse else None
            graph_steps = dict(eng.graph_steps) if sparse else None
    mode = f"sparse ({pred.name})" if sparse else "dense"
    density = float(np.mean(g.masks)) if g.masks else (1.0 if sparse else None)
    if as_json:
        click.echo(_json("generate", {
            "model": str(path), "prompt": prompt, "chat": chat, "prompt_tokens": len(g.prompt_tokens),
            "sampling": {"temp": temp, "top_k": top_k, "top_p": top_p, "seed": seed},
            "tokens": g.tokens, "text": g.text, "n_generated": len(g.tokens),
            "prefill_s": g.prefill_s, "decode_s": g.decode_s, "decode_tok_s": g.decode_tok_s,
            "threads": threads_used, "flash_attn": flash_attn, "mode": "sparse" if sparse else "dense",
            "predictor": pred.name if sparse else None, "mean_head_density": density,
            "sparse_layer_ops": layer_ops, "sparse_min_ctx": min_ctx,
            # decode steps of the sparse mode by the graph they ran (stock below sparse_min_ctx)
            "graph_steps": graph_steps,
        }))
    else:
        click.echo("")
        click.echo(f"\n[{mode}] {len(g.tokens)} tokens, decode {g.decode_tok_s:.1f} tok/s, "
                   f"prefill {len(g.prompt_tokens)} tokens in {g.prefill_s * 1000:.0f} ms, "
                   f"{threads_used} threads"
                   + (f", mean head density {density:.2f}" if sparse else "")
                   + (f", {graph_steps['dense']} steps on the stock graph (context below {min_ctx})"
                      if sparse and graph_steps["dense"] else ""), err=True)


def _open_predictor(spec: str, path):
    from .predictors.specs import get_predictor

    return get_predictor(spec, path)


@main.command()
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("-n", "n_tokens", type=click.IntRange(1), default=48, show_default=True, help="Tokens to generate.")
@click.option("--predictor", required=True, help="Head predictor (see `generate --help`).")
@engine_options(ctx_default=2048)
@model_option
@threads_option
@json_option
def compare(prompt, n_tokens, predictor, n_ctx, n_gpu_layers, flash_attn, cache_k, cache_v, model, threads,
            as_json) -> None:
    """Generate greedily dense and sparse from one prompt, side by side."""
    from .evaluation import compare as cmp

    with user_errors():
        path = resolve_model(model)
        res = cmp.compare(path, prompt, n_tokens, _open_predictor(predictor, path), threads, n_ctx,
                          engine_kw=_engine_kw(flash_attn, cache_k, cache_v, n_gpu_layers))
    if as_json:
        click.echo(_json("compare", res.to_json()))
        return
    click.echo(f"--- dense ({res.dense_tok_s:.1f} tok/s)\n{prompt}{res.dense_text}")
    click.echo(f"--- sparse, {res.predictor}, mean head density {res.density:.2f} ({res.sparse_tok_s:.1f} tok/s)\n"
               f"{prompt}{res.sparse_text}")
    div = "none" if res.first_divergence is None else f"token {res.first_divergence}"
    click.echo(f"--- token agreement {res.agreement:.2f}, first divergence: {div}")


@main.command()
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Text to score on (default: $POWERINFER_ATTN_TEXT), e.g. WikiText-2's wiki.test.raw.")
@click.option("--prefix", "-c", "prefixes", default="128", show_default=True,
              help="Dense prefill tokens per window; several comma-separated (128,1024,4096,8192) give a table each, "
                   "with one dense prefill per window shared by all predictors.")
@click.option("--steps", type=click.IntRange(1), default=128, show_default=True, help="Sparse decode steps per window.")
@click.option("--windows", type=click.IntRange(1), default=8, show_default=True, help="Windows, spread over the text's second half.")
@click.option("--training-articles", "training", is_flag=True,
              help="Spread the windows over the articles `collect` trains on instead: for tuning a predictor's "
                   "settings without looking at the held-out half.")
@click.option("--predictor", "predictors", multiple=True,
              help="Head predictor (see `generate --help`); repeat it to score several on the same windows.")
@click.option("--mask-file", type=click.Path(dir_okay=False), default=None, help="Masks [steps, n_layer, n_head] (.npy), used in every window.")
@click.option("--dump-logits", type=click.Path(dir_okay=False), default=None,
              help="Write the (first) sparse logits ([steps, n_vocab], or [windows, steps, n_vocab]) as float32 .npy.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a density vs perplexity plot (PNG).")
@kv_budget_option
@engine_options()
@model_option
@threads_option
@json_option
def score(text_file, prefixes, steps, windows, training, predictors, mask_file, dump_logits, plot_path, kv_budget,
          n_gpu_layers, flash_attn, cache_k, cache_v, model, threads, as_json) -> None:
    """Teacher-forced quality of sparse decode against dense: perplexity, KL, top-1 agreement."""
    from pathlib import Path

    from .evaluation import compare as cmp

    if bool(predictors) == bool(mask_file):
        _fail(ValueError("give --predictor (one or more) or --mask-file"))
    specs = [with_budget(sp, kv_budget) for sp in list(predictors) or [f"mask-file:{mask_file}"]]
    with user_errors():
        path = resolve_model(model)
        text = resolve_text_file(text_file)
        prefix = _ints(prefixes)
        if not prefix or min(prefix) < 1:
            raise ValueError(f"--prefix takes lengths >= 1, comma-separated, not {prefixes!r}")
        preds = [_open_predictor(sp, path) for sp in specs]
        with click.progressbar(length=(1 + len(preds)) * steps * windows * len(prefix), label="scoring",
                               file=sys.stderr) as bar:
            results = cmp.score(path, text, preds, prefix, steps, windows, threads,
                                Path(dump_logits) if dump_logits else None, bar.update, training,
                                engine_kw=_engine_kw(flash_attn, cache_k, cache_v, n_gpu_layers))
        if plot_path:
            cmp.plot_pareto([r.to_json() for r in results], plot_path)
    if as_json:
        click.echo(_json("score", [r.to_json() for r in results]))
        return
    r0 = results[0]
    where = " (training articles)" if training else ""
    after = ", ".join(str(p) for p in dict.fromkeys(r.prefix for r in results))
    click.echo(f"{path.name} on {text.name}{where}: {r0.windows} windows x {r0.steps} steps after {after} dense tokens")
    click.echo(cmp.format_scores(results))
    for r in results:
        click.echo(f"density per layer, {r.predictor}, prefix {r.prefix}: "
                   + " ".join(f"{x:.2f}" for x in r.density_per_layer))


@main.command()
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Calibration text (default: $POWERINFER_ATTN_TEXT); its first half is read.")
@click.option("--tokens", type=click.IntRange(64), default=8192, show_default=True, help="Tokens to read.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output JSON (default: where static:K looks).")
@model_option
@threads_option
@json_option
def calibrate(text_file, tokens, out, model, threads, as_json) -> None:
    """Mean importance of each head on a text, for the static:K predictor."""
    from pathlib import Path

    from .evaluation import compare as cmp
    from .predictors.specs import default_calibration_path

    with user_errors():
        path = resolve_model(model)
        text = resolve_text_file(text_file)
        dest = Path(out) if out else default_calibration_path(path)
        with click.progressbar(length=tokens, label="calibrating", file=sys.stderr) as bar:
            res = cmp.calibrate(path, text, dest, tokens, threads=threads, progress=bar.update)
    if as_json:
        click.echo(_json("calibration", {"out": str(dest), **res}))
    else:
        expl = res["mean_explained"]
        near = sum(x > 0.5 for row in expl for x in row)
        click.echo(f"wrote {dest} ({res['tokens']} tokens)\n"
                   f"each head's mean contribution holds {res['mean_explained_overall']:.1%} of the attention "
                   f"outputs' energy; in {near} of {len(expl) * len(expl[0])} heads more than half")


@main.command()
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Text (default: $POWERINFER_ATTN_TEXT); only whole articles in its first 45% are read.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output directory (its old data is replaced).")
@click.option("--tokens", type=click.IntRange(512), default=32768, show_default=True,
              help="Tokens to record, in 512-token chunks spread over the training articles.")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
              help="Also measure each layer's sensitivity to pruning (per-layer budgets; ~2 min on 2 cores).")
@click.option("--seq-len", type=click.IntRange(512), default=512, show_default=True,
              help="Read the text as sequences of this many tokens (a multiple of 512), each from position 0: "
                   "8192 records what heads do deep into the context.")
@click.option("--resume", is_flag=True,
              help="Go on with a stopped run into --out (the same model, text and options): its fills are "
                   "reused and the chunks it wrote are not run again.")
@click.option("--fill-from", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Judge importance against this predictor file's linear fill instead of fitting one "
                   "(data to `diagnose` that file on another text).")
@model_option
@threads_option
@json_option
def collect(text_file, out, tokens, sensitivity, seq_len, resume, fill_from, model, threads, as_json) -> None:
    """Record each layer's attention input and each head's importance, for train-predictor."""
    from pathlib import Path

    from .training import collect as col

    with user_errors():
        path = resolve_model(model)
        text = resolve_text_file(text_file)
        # the fills are fitted first (collect.fill_sequences)
        length = tokens + (0 if fill_from else col.fill_tokens(tokens, seq_len)) + (col.SENSITIVITY_STEPS * resolve_n_layer(path) if sensitivity else 0)
        with click.progressbar(length=length, label="collecting", file=sys.stderr) as bar:
            meta = col.collect(path, text, Path(out), tokens, threads=threads, sensitivity=sensitivity,
                               progress=bar.update, seq_len=seq_len, resume=resume,
                               fill_from=Path(fill_from) if fill_from else None)
    if as_json:
        click.echo(_json("collect", meta))
    else:
        click.echo(f"wrote {meta['chunks']} chunks ({meta['tokens']} tokens) to {out}\nfrom {meta['articles']}")


@main.command()
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="WikiText-2 to mix in beside code, docs and chat (default: $POWERINFER_ATTN_TEXT if set).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the predictor (default: the model cache, where `--predictor trained` finds it).")
@click.option("--conversations", type=click.IntRange(1), default=60, show_default=True,
              help="Conversations the model writes for the chat text.")
@click.option("--tokens", type=click.IntRange(512), default=32768, show_default=True, help="Tokens collect records.")
@click.option("--seq-len", type=click.IntRange(512), default=8192, show_default=True,
              help="Collect's sequence length (a multiple of 512): what heads do that deep into the context.")
@click.option("--density", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.7, show_default=True,
              help="The density the file's rule value gives on held-out data.")
@click.option("--pin", "pin_heads", type=click.IntRange(0), default=6, show_default=True,
              help="Retrieval heads kept always (0: none).")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
              help="Per-layer budgets from each layer's measured sensitivity (~2 min on 2 cores).")
@model_option
@threads_option
@json_option
def prepare(text_file, out, conversations, tokens, seq_len, density, pin_heads, sensitivity, model, threads,
            as_json) -> None:
    """Make the model's head predictor in one command: texts of several kinds mixed, collect,
    train, retrieval heads pinned; stored in the model cache for `--predictor trained`. A stopped
    run goes on where it stopped (about 30 min for SmolLM2 on 2 cores)."""
    import os
    from pathlib import Path

    from .training import prepare as prep
    from .engine.text import TEXT_ENV

    bars: dict = {}
    with user_errors():
        path = resolve_model(model)
        wiki = Path(text_file) if text_file else (Path(os.environ[TEXT_ENV]) if os.environ.get(TEXT_ENV) else None)
        totals = prep.step_totals(resolve_n_layer(path), conversations, tokens, seq_len, sensitivity)

        def progress(step, n):
            if step not in bars:
                for b in bars.values():
                    b.render_finish()
                bars[step] = click.progressbar(length=totals[step], label=step, file=sys.stderr, show_eta=True)
            bars[step].update(n)

        res = prep.prepare(path, wiki, Path(out) if out else None, conversations, tokens, seq_len, density, pin_heads,
                           sensitivity, threads, say=lambda m: click.echo(m, err=True), progress=progress)
        for b in bars.values():
            b.render_finish()
    if as_json:
        click.echo(_json("prepare", res))
    else:
        click.echo(f"wrote {res['predictor']}: trained on " + ", ".join(f"{k} ({v} characters)" for k, v in res["texts"].items())
                   + (f"; pinned heads {res['pinned']}" if res["pinned"] else "")
                   + "\nuse it with --predictor trained (or trained:density=D)")


@main.command("train-predictor")
@click.argument("data_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Predictor file to write (.gguf).")
@click.option("--rule", type=click.Choice(["threshold", "topk", "mass"]), default="threshold", show_default=True,
              help="Selection rule stored in the file (score/bench can override it).")
@click.option("--density", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.7, show_default=True,
              help="Pick the rule's value that gives this mean density on the held-out data.")
@click.option("--value", type=float, default=None, help="The rule's value (k for topk, fraction for mass; a fixed threshold).")
@click.option("--label", type=click.Choice(["level", "share", "residual"]), default="level", show_default=True,
              help="threshold/topk target: log(importance) less the layer's mean log(total importance), "
                   "log(share of the layer's importance) or log(importance / residual norm).")
@click.option("--layer-budget", type=click.FloatRange(0.0), default=1.0, show_default=True,
              help="threshold with the level or share label: offset each layer's logits by this times log(its "
                   "measured sensitivity under the fill), centred; 0 for one budget for all layers.")
@click.option("--no-layer-budget", "no_budget", is_flag=True, help="The same as --layer-budget 0.")
@click.option("--fill", type=click.Choice(["linear", "mean", "zero"]), default=None,
              help="What a skipped head contributes: a linear prediction of its output from the layer's input, "
                   "its mean (either stored in the file; labels are deviations from it) or nothing. "
                   "Default: linear when the data has it.")
@json_option
def train_predictor(data_dir, out, rule, density, value, label, layer_budget, no_budget, fill, as_json) -> None:
    """Fit a per-layer linear head predictor (numpy ridge) and write it as a GGUF sidecar."""
    from pathlib import Path

    from .training import train as tr

    with user_errors():
        summary = tr.train(Path(data_dir), Path(out), rule, density, value, label=label, layer_budget=0.0 if no_budget else layer_budget, fill=fill,
                           progress=None if as_json else (lambda m: click.echo(m, err=True)))
    if as_json:
        click.echo(_json("predictor-training", summary))
    else:
        click.echo(f"wrote {out}: {summary['fill']} fill, rule {summary['rule']} {summary['rule_value']:.4f}, held-out density "
                   f"{summary['heldout_density']:.3f}, held-out R^2 {summary['heldout_r2_mean']:.3f} (mean over layers)")


@main.command()
@click.option("--lengths", default="1024,2048,4096,8192", show_default=True, help="Prompt lengths in tokens, comma-separated.")
@click.option("--trials", type=click.IntRange(1), default=10, show_default=True,
              help="Trials per length (the key's depth spread evenly from start to end).")
@click.option("--haystack", "haystacks", default="filler", show_default=True,
              help="What the key hides in: filler (repeated sentences), text (held-out half of --text-file), or both: filler,text.")
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Text for the text haystack (default: $POWERINFER_ATTN_TEXT).")
@click.option("--predictor", "predictors", multiple=True,
              help="Head predictor for the sparse answers (see `generate --help`); repeat it for several. Dense always runs.")
@click.option("--answer-tokens", type=click.IntRange(2), default=8, show_default=True, help="Tokens of answer decoded.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the keys.")
@kv_budget_option
@engine_options()
@model_option
@threads_option
@json_option
def needle(lengths, trials, haystacks, text_file, predictors, answer_tokens, seed, kv_budget, n_gpu_layers, flash_attn,
           cache_k, cache_v, model, threads, as_json) -> None:
    """Retrieval at long context: exact-match accuracy on a hidden pass key, dense and sparse."""
    from .evaluation import needle as nd

    with user_errors():
        path = resolve_model(model)
        kinds = [h for h in haystacks.split(",") if h]
        text = resolve_text_file(text_file) if "text" in kinds else None
        preds = [_open_predictor(with_budget(sp, kv_budget), path) for sp in predictors]
        lens = _ints(lengths)
        with click.progressbar(length=len(lens) * trials * len(kinds), label="needle trials", file=sys.stderr) as bar:
            results = nd.run(path, lens, trials, preds, kinds, text, answer_tokens, threads, seed, bar.update,
                             engine_kw=_engine_kw(flash_attn, cache_k, cache_v, n_gpu_layers))
    if as_json:
        click.echo(_json("needle", [r.to_json() for r in results]))
        return
    click.echo(f"{path.name}: pass key retrieval, {trials} trials per length; cells: correct/trials")
    click.echo(nd.format_table(results))


@main.command("eval")
@click.option("--tasks", default="niah_single_2,niah_multikey_1,ruler_vt,ruler_cwe", show_default=True,
              help="RULER subtasks, comma-separated (the offline ones: niah_*, ruler_vt, ruler_cwe, ruler_fwe).")
@click.option("--lengths", default="4096", show_default=True, help="RULER lengths in tokens, comma-separated.")
@click.option("--samples", "n_samples", type=click.IntRange(1, 500), default=20, show_default=True,
              help="Samples per task and length (the first N RULER makes for that length).")
@click.option("--predictor", "predictors", multiple=True,
              help="Head predictor (see `generate --help`); repeat it for several. Dense always runs.")
@click.option("--via", type=click.Choice(["engine", "server"]), default="engine", show_default=True,
              help="engine: one dense prefill per sample, every predictor decoding from a copy of its state; "
                   "server: `powerinfer-attn serve` per predictor, queried by lm-eval's local-completions client.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the samples RULER draws.")
@click.option("--samples-out", type=click.Path(dir_okay=False), default=None,
              help="Write the samples (prompts and what scores them) to this file and stop.")
@click.option("--samples-in", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Answer these samples (from --samples-out) instead of building them: needs no lm-eval "
                   "until the scoring, which `eval --rescore` can do elsewhere.")
@click.option("--rescore", type=click.Path(dir_okay=False, exists=True), multiple=True,
              help="Score the answers in this `eval --json` result with lm-eval's RULER scorer, and print it; "
                   "repeated, the results (the same samples, other predictors) are merged first.")
@engine_options()
@model_option
@threads_option
@json_option
def eval_cmd(tasks, lengths, n_samples, predictors, via, seed, samples_out, samples_in, rescore, n_gpu_layers,
             flash_attn, cache_k, cache_v, model, threads, as_json) -> None:
    """RULER (lm-evaluation-harness) at long context, dense and sparse, offline: a score per task,
    length and predictor, 0-100, and the difference from dense."""
    from pathlib import Path

    from .evaluation import ruler

    def emit(doc):
        if as_json:
            click.echo(json.dumps(doc, indent=1))
        else:
            click.echo(ruler.format_result(doc))

    with user_errors():
        if rescore:
            emit(ruler.rescore(ruler.merge([json.loads(Path(r).read_text()) for r in rescore])))
            return
        path = resolve_model(model)
        preds = [_open_predictor(sp, path) for sp in predictors]
        if samples_in:
            if via != "engine":
                raise ValueError("--samples-in answers through the engine (--via engine)")
            samples = ruler.read_samples(Path(samples_in))
        else:
            task_objs = ruler.load_tasks(path, [t for t in tasks.split(",") if t], _ints(lengths), seed)
            samples = ruler.build_samples(task_objs, _ints(lengths), n_samples)
            if samples_out:
                ruler.write_samples(Path(samples_out), samples, path, seed)
                click.echo(f"wrote {samples_out}: {len(samples)} samples", err=True)
                return
        if via == "server" and (n_gpu_layers or flash_attn or (cache_k, cache_v) != ("f16", "f16")):
            raise ValueError("-ngl, -fa, -ctk and -ctv apply to --via engine (the server runs on its defaults here)")
        total = len(samples) * (1 + len(preds) if via == "server" else 1)
        with click.progressbar(length=total, label=f"RULER samples ({via})", file=sys.stderr,
                               show_eta=True) as bar:
            if via == "engine":
                doc = ruler.run_engine(path, samples, preds, seed, threads, n_gpu_layers, flash_attn, bar.update,
                                       (cache_k, cache_v))
            else:
                doc = ruler.run_server(path, task_objs, samples, list(predictors), seed, threads, bar.update,
                                       log=lambda m: click.echo(m, err=True))
    emit(doc)


@main.command("retrieval-heads")
@click.option("--distances", default="2048,6144", show_default=True,
              help="How far back the copied run lies, in tokens, comma-separated.")
@click.option("--steps", type=click.IntRange(1), default=32, show_default=True, help="Decode steps scored per run.")
@click.option("--sequences", type=click.IntRange(1), default=2, show_default=True, help="Random runs per distance.")
@click.option("--pin", "pin_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A trained predictor file to copy with the top heads always kept (needs --top and --out).")
@click.option("--top", type=click.IntRange(1), default=None, help="How many of the highest-scoring heads to pin.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="The pinned predictor file to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random runs.")
@model_option
@threads_option
@json_option
def retrieval_heads(distances, steps, sequences, pin_path, top, out, seed, model, threads, as_json) -> None:
    """Find the heads that copy from far back (induction score on a repeated random run), and
    optionally pin them in a trained predictor."""
    from pathlib import Path

    from .training import retrieval

    if (pin_path is None) != (out is None) or (pin_path is not None and top is None):
        _fail(ValueError("--pin PRED.gguf, --top K and --out FILE go together"))
    with user_errors():
        path = resolve_model(model)
        dists = _ints(distances)
        with click.progressbar(length=len(dists) * sequences, label="copy runs", file=sys.stderr) as bar:
            res = retrieval.measure(path, dists, steps, sequences, threads, seed=seed, progress=bar.update)
        pinned = None
        if pin_path is not None:
            pinned = retrieval.pin(Path(pin_path), Path(out), res.top(top))
    if as_json:
        click.echo(_json("retrieval-heads", res.to_json() | {"model": path.name, "pinned": pinned, "out": out}))
        return
    click.echo(f"{path.name}: " + retrieval.format_top(res))
    if pinned is not None:
        click.echo(f"wrote {out}: {pin_path} with {len(pinned)} heads always kept")


@main.command("stdlib-text")
@click.argument("out", type=click.Path(dir_okay=False))
def stdlib_text(out) -> None:
    """Write a text of another kind than WikiText (Python source of a fixed list of standard-library
    modules of this interpreter) to OUT, for `score --text-file`, `needle` and `bench`."""
    from pathlib import Path

    from .engine.text import stdlib_text as make

    text, found = make()
    Path(out).write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}: {len(text)} characters from {len(found)} modules ({', '.join(found)})")


@main.command()
@click.argument("kind", type=click.Choice(list(KINDS)))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="For wiki: WikiText-2's file (default: $POWERINFER_ATTN_TEXT).")
@click.option("--conversations", type=click.IntRange(1), default=60, show_default=True,
              help="For chat: how many two-turn conversations the model writes.")
@click.option("--seed", type=int, default=0, show_default=True, help="For chat: the requests and the sampling.")
@model_option
@threads_option
def corpus(kind, out, text_file, conversations, seed, model, threads) -> None:
    """Write a text of one KIND to OUT, as articles under `# ---- NAME` headings, for `collect`,
    `score --text-file` and `corpus-mix`: wiki (WikiText-2), code (standard-library source), docs (the
    interpreter's reference topics), chat (conversations the model writes through its chat template),
    essays (Paul Graham's, RULER's haystack: never mixed into training)."""
    from pathlib import Path

    from .training import corpus as cp

    with user_errors():
        path = resolve_model(model) if kind == "chat" else None
        if kind == "chat":
            with click.progressbar(length=conversations, label="conversations", file=sys.stderr) as bar:
                text, names = cp.kind_text(kind, path, n=conversations, seed=seed, threads=threads, progress=bar.update)
        else:
            text, names = cp.kind_text(kind, wiki=text_file)
        cp.write(Path(out), text, names, kind, {"model": path.name, "seed": seed} if path else None)
    click.echo(f"wrote {out}: {kind}, {len(names)} articles, {len(text)} characters")


@main.command("corpus-mix")
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("texts", nargs=-1, required=True)
@click.option("--block-chars", type=click.IntRange(1000), default=32000, show_default=True,
              help="Characters taken from one kind before the next.")
def corpus_mix(out, texts, block_chars) -> None:
    """Interleave the training articles of several texts (KIND=FILE, e.g. wiki=wiki.test.raw
    code=code.txt) into OUT, as much of each as of the smallest, for `collect`: a predictor trained on it
    has seen every kind, and none of their held-out halves."""
    from pathlib import Path

    from .training import corpus as cp

    with user_errors():
        named = {}
        for t in texts:
            kind, sep, file = t.partition("=")
            if not sep or not kind or not file:
                raise ValueError(f"{t!r}: give KIND=FILE")
            if kind in named:
                raise ValueError(f"{kind} given twice")
            named[kind] = Path(file).read_text(encoding="utf-8")
        text, taken = cp.mix(named, block_chars)
        cp.write(Path(out), text, [], "mix", {"kinds": taken, "from": dict(t.partition("=")[::2] for t in texts)})
    click.echo(f"wrote {out}: " + ", ".join(f"{k} {v} characters" for k, v in taken.items()))


@main.command()
@click.argument("predictor_file", type=click.Path(dir_okay=False, exists=True))
@click.argument("data", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--density", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.7, show_default=True,
              help="The file's per-layer target densities for this density.")
@json_option
def diagnose(predictor_file, data, density, as_json) -> None:
    """How PREDICTOR_FILE ranks heads against the oracle, per layer, on each DATA directory
    (`collect --fill-from PREDICTOR_FILE` over a text): regret, density at its threshold, what its fill leaves."""
    from pathlib import Path

    from .training import diagnose as dg

    with user_errors():
        reports = [dg.report(Path(predictor_file), Path(d), density) for d in data]
    click.echo(_json("diagnose", reports) if as_json else dg.format_report(reports))


@main.command()
@model_option
@click.option("--predictor", default="none", show_default=True,
              help="trained:PRED.gguf[:RULE=VALUE], all or static:K; none serves dense.")
@click.option("--density", type=float, default=None, help="With a trained predictor: its density=D (density control).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@kv_budget_option
@sparse_min_ctx_option("auto")
@engine_options(ctx_default=4096, ctx_min=64)
@threads_option
def serve(model, predictor, density, host, port, kv_budget, sparse_min_ctx, n_ctx, n_gpu_layers, flash_attn, cache_k,
          cache_v, threads) -> None:
    """OpenAI-compatible server (llama-cpp-python's) with sparse decode: /v1/completions,
    /v1/chat/completions (SSE streaming), /v1/models, /health; a log line per request."""
    from .serving import serve as serve_mod

    spec = None if predictor == "none" else predictor
    if density is not None:
        if spec is None or not spec.startswith("trained:"):
            _fail(ValueError("--density goes with a trained:PRED.gguf predictor"))
        from .predictors.specs import add_option

        spec = add_option(spec, f"density={density:g}")
    if kv_budget:
        if spec is None:
            _fail(ValueError("--kv-budget needs a sparse --predictor (none serves dense)"))
        spec = with_budget(spec, kv_budget)
    with user_errors():
        serve_mod.serve(resolve_model(model), spec, host, port, n_ctx, threads,
                        _engine_kw(flash_attn, cache_k, cache_v, n_gpu_layers), sparse_min_ctx)


@main.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (the protocol has no authentication: bind others only on a trusted network).")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option("--cache", "cache", is_flag=True,
              help="Keep large tensors the client sends in a local cache (ggml's RPC cache) between runs.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where --cache keeps them (default: the model cache's rpc/ folder).")
@threads_option
def rpc_server(host, port, cache, cache_dir, threads) -> None:
    """ggml's RPC server from the patched build, for `--rpc HOST:PORT` on another machine: it runs
    the layers a client puts on it, sparse ops, predictor and fills included (the CPU device; the
    GPUs in a `build --cuda` library). Runs until killed."""
    from .native import rpc
    from .native.model import cache_dir as model_cache

    with user_errors():
        where = (cache_dir or str(model_cache() / "rpc")) if cache else None
        rpc.serve(host, port, threads, where, say=lambda m: click.echo(m, err=True))


@main.command("bench-serve")
@model_option
@click.option("--predictor", required=True, help="The sparse server's predictor (trained:PRED.gguf[:density=D], ...).")
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Prompts from this file's held-out half (default: $POWERINFER_ATTN_TEXT).")
@click.option("--prompt-tokens", type=click.IntRange(16), default=4096, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(2), default=128, show_default=True)
@click.option("--requests", type=click.IntRange(1), default=3, show_default=True, help="Requests per server (medians).")
@threads_option
@json_option
def bench_serve(model, predictor, text_file, prompt_tokens, gen_tokens, requests, threads, as_json) -> None:
    """End to end through HTTP: dense server against sparse server, long prompts, streamed answers."""
    from .evaluation import bench_serve as bs

    with user_errors():
        result = bs.run(resolve_model(model), predictor, resolve_text_file(text_file), prompt_tokens, gen_tokens,
                        requests, threads)
    if as_json:
        click.echo(_json("bench-serve", result))
    else:
        click.echo(bs.format_table(result))


def resolve_n_layer(model_path) -> int:
    from gguf import GGUFReader

    r = GGUFReader(str(model_path))
    arch = r.fields["general.architecture"].contents()
    return int(r.fields[f"{arch}.block_count"].contents())


def _window(spec: str) -> tuple[int, int]:
    s, plus, w = spec.partition("+")
    if not (plus and s.isdigit() and w.isdigit()) or int(s) + int(w) == 0:
        raise click.BadParameter(f"window fill is S+W (sink and recent KV cells, not both 0), not {spec!r}",
                                 param_hint="--window")
    return int(s), int(w)


def _cache_list(text: str) -> tuple[str, ...]:
    from .native.bindings import CACHE_TYPES

    out = tuple(c for c in text.split(",") if c)
    bad = [c for c in out if c not in CACHE_TYPES]
    if bad or not out:
        raise ValueError(f"-ctk/-ctv: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(CACHE_TYPES)}")
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@main.command()
@model_option
@click.option("--depth", "-d", "ctxs", default="256,1024,4096", show_default=True,
              help="Context depths (tokens in the cache when the step is timed), comma-separated, as llama-bench's -d.")
@click.option("--ctx", "old_ctxs", default=None, hidden=True, help="The old spelling of -d/--depth.")
@click.option("--density", "densities", default="1,0.75,0.5,0.25", show_default=True, help="Head densities, comma-separated.")
@click.option("--reps", type=click.IntRange(3), default=20, show_default=True, help="Timed steps per configuration.")
@click.option("--flash-attn", "-fa", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="auto: measure dense both ways per context and use the faster for all.")
@click.option("--gqa", is_flag=True, help="Drop whole KV groups first (saves K/V reads too).")
@click.option("--profile/--no-profile", default=True, show_default=True,
              help="Per-op profile of the step and the Amdahl limit of each ratio.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a tok/s vs context plot (PNG).")
@click.option("--predictor", "trained", default=None,
              help="Also time sparse decode with this trained:PRED.gguf[:RULE=VALUE] predictor, computed in the graph.")
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Fill the caches with real text from this file's held-out half (default: a repeated sentence).")
@click.option("--cache-type-k", "-ctk", "cache_k", default="f16,q8_0", show_default=True,
              help="K cache types the fastest-dense search tries (quantized ones with flash attention), comma-separated, "
                   "as llama-bench's -ctk; V takes the same type (-ctv).")
@click.option("--cache-type-v", "-ctv", "cache_v", default=None,
              help="V cache types, comma-separated: the same list as -ctk (bench times K and V of one type).")
@click.option("--cache-types", "old_caches", default=None, hidden=True, help="The old spelling of -ctk/-ctv.")
@click.option("--ctx-size", "-c", "n_ctx", type=click.IntRange(0), default=0,
              help="Every engine's context size (default: each depth plus the timed steps).")
@sparse_min_ctx_option("0")
@click.option("--window", default=None, metavar="S+W",
              help="Window fill at the fixed densities: skipped heads attend over the first S and last W KV cells.")
@kv_budget_option
@click.option("--kv-page", "kv_page", type=click.Choice([str(p) for p in KV_PAGES]), default=None,
              help=f"With --kv-budget: cells per page (default {KV_PAGE}). Each page's bounds are 2 x head width values per KV "
                   "head (F16 on the CPU, F32 on a GPU), read every step: larger pages read fewer of them and choose coarser.")
@click.option("-ngl", "--n-gpu-layers", "ngl", type=click.IntRange(0), default=0, show_default=True,
              help="Layers to offload to the GPU (a `build --cuda` library); sparse then runs with flash attention "
                   "and an F16 cache, and each ratio's limit is from bytes. With --rpc: the layers on the servers.")
@rpc_option
@threads_option
@json_option
def bench(model, ctxs, old_ctxs, densities, reps, flash_attn, gqa, profile, plot_path, trained, text_file, cache_k,
          cache_v, old_caches, n_ctx, sparse_min_ctx, window, kv_budget, kv_page, ngl, threads, as_json) -> None:
    """Decode tok/s, dense against sparse at fixed head densities, per context length."""
    import os

    if old_ctxs is not None:
        click.echo("note: --ctx is now -d/--depth (llama-bench's spelling); --ctx will go", err=True)
        ctxs = old_ctxs
    if old_caches is not None:
        click.echo("note: --cache-types is now -ctk/-ctv (llama-bench's spelling); --cache-types will go", err=True)
        cache_k = old_caches
    if cache_v is not None and _cache_list(cache_v) != _cache_list(cache_k):
        raise click.UsageError("bench times K and V caches of one type: -ctv must list the same types as -ctk")
    if kv_page is not None and not kv_budget:
        raise click.UsageError("--kv-page goes with --kv-budget")

    from .engine import crossover
    from .evaluation import bench as bench_mod

    with user_errors():
        threads = threads or min(os.cpu_count() or 1, 16)
        path, rpc = resolve_model(model), _rpc()
        min_ctx = crossover.resolve(sparse_min_ctx, path, threads, ngl, trained is not None,
                                    say=lambda m: click.echo(m, err=True))
        result = bench_mod.run(path, _ints(ctxs), _floats(densities),
                               threads, reps, flash_attn=flash_attn, gqa=gqa,
                               profile=profile, trained=trained,
                               text_file=resolve_text_file(text_file) if text_file else None,
                               caches=_cache_list(cache_k), window=_window(window) if window else None, ngl=ngl,
                               kv_budget=kv_budget, n_ctx=n_ctx, sparse_min_ctx=min_ctx, rpc=rpc,
                               kv_page=int(kv_page or KV_PAGE))
        # a run on the sparse graph at every depth says where it starts to pay: --sparse-min-ctx auto
        # (of the plain sparse graph: not with a window, a budget or whole KV groups)
        recorded = crossover.store(result) if min_ctx == 0 and not (window or kv_budget or gqa or rpc) else None
        if plot_path:
            bench_mod.plot(result, plot_path)
    if as_json:
        click.echo(_json("bench", result))
    else:
        click.echo(f"model {result['model']}, {result['threads']} threads, median of {result['reps']} paired steps, "
                   f"context: {result['context_text']}"
                   + (", GQA-group masks" if gqa else "")
                   + (f", window fill {window}" if window else "")
                   + (f", token budget {kv_budget} cells per KV group (pages of {result['kv_page']})" if kv_budget else "")
                   + (f", {ngl} layers on RPC servers {','.join(result['rpc'])} (loopback: not a network figure)"
                      if result["rpc"] else f", {ngl} layers on the GPU" if ngl else "")
                   + "; cells: sparse tok/s (ratio to dense"
                   + (" of its bytes-based limit)" if ngl else " of its Amdahl limit)" if profile else ")"))
        click.echo(bench_mod.format_table(result))
        partial = {c: s for c, s in result["skipped_byte_share"].items() if s < 0.999}
        if partial:
            click.echo("parts that cannot skip per head run dense (layer ops " + str(sorted(set(result["sparse_layer_ops"])))
                       + "): of the bytes head sparsity could skip, they skip "
                       + ", ".join(f"{s:.0%} at {c}" for c, s in partial.items()))
        if result["profiles"]:
            click.echo("\nms per step by part (profiled node by node, fixed per-node cost removed):")
            click.echo(bench_mod.format_profile(result))
        if plot_path:
            click.echo(f"\nplot: {plot_path}")
        if recorded:
            click.echo("\nrecorded for --sparse-min-ctx auto (the depth from which sparse pays here; none: not "
                       f"measured): trained predictor {recorded['trained']}, fixed masks {recorded['fixed']}")


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def show(results) -> None:
    """Print the tables of a result saved with `score --json`, `bench --json`, `needle --json`, `eval --json` or
    `retrieval-heads --json`. Several `score --json` results (TEXT.NAME.json: the text a run scored
    first in its name) print as one matrix of predictors by texts."""
    from pathlib import Path

    from .evaluation import bench as bench_mod
    from .evaluation import compare as cmp

    def rows(data, kind):
        """A result's rows: {"kind": kind, "rows": [...]}, or the bare list files written before kinds."""
        return data["rows"] if isinstance(data, dict) and data.get("kind") == kind else data

    if len(results) > 1:
        runs = []
        for f in results:
            try:
                data = json.loads(Path(f).read_text())
                runs.append((Path(f).name.split(".")[0], [cmp.ScoreResult(**r) for r in rows(data, "score")]))
            except (OSError, ValueError, TypeError, KeyError) as e:
                _fail(ValueError(f"{f}: not a `score --json` result ({e}); several results make one matrix of scores"))
        click.echo(cmp.format_matrix(runs))
        return
    result = results[0]
    try:
        data = json.loads(Path(result).read_text())
    except (OSError, ValueError) as e:
        _fail(ValueError(f"{result}: not a JSON result ({e})"))
    # the kind a result carries, or for files written before kinds, its shape
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind is None and isinstance(data, list) and data:
        kind = ("score" if "kl_mean" in data[0] else "needle" if "haystack" in data[0] else
                "diagnose" if "layers" in data[0] and "predictor" in data[0] else None)
    elif kind is None and isinstance(data, dict):
        kind = ("retrieval-heads" if "scores" in data and "distances" in data else
                "bench-serve" if "servers" in data else "bench" if "rows" in data else None)
    if kind == "score":
        click.echo(cmp.format_scores([cmp.ScoreResult(**r) for r in rows(data, "score")]))
    elif kind == "needle":
        from .evaluation import needle as nd

        fields = {f.name for f in dataclasses.fields(nd.NeedleResult)}
        click.echo(nd.format_table([nd.NeedleResult(**{k: v for k, v in r.items() if k in fields})
                                    for r in rows(data, "needle")]))
    elif kind == "retrieval-heads":
        from .training import retrieval

        res = retrieval.RetrievalScores(np.array(data["scores"]), data["distances"], data["steps"], data["sequences"])
        click.echo(f"{data.get('model', '')}: " + retrieval.format_top(res)
                   + (f"\npinned in {data['out']}: {data['pinned']}" if data.get("pinned") else ""))
    elif kind == "diagnose":
        from .training import diagnose as dg

        click.echo(dg.format_report(rows(data, "diagnose")))
    elif kind == "ruler":
        from .evaluation import ruler

        click.echo(ruler.format_result(data))
    elif kind == "bench-serve":
        from .evaluation import bench_serve as bs

        click.echo(bs.format_table(data))
    elif kind == "bench":
        click.echo(f"{Path(data['model']).name}, {data['threads']} threads, median of {data['reps']} paired steps"
                   + (", GQA-group masks" if data.get("gqa_masks") else "")
                   + (f", {data['n_gpu_layers']} layers on RPC servers {','.join(data['rpc'])} (loopback: not a network "
                      "figure); cells: tok/s (ratio of its bytes-based limit)" if data.get("rpc") else
                      f", {data['n_gpu_layers']} layers on the GPU (sparse: flash attention, "
                      f"{'/'.join(sorted({r.get('cache', 'f16') for r in data['rows'] if r['mode'] != 'dense'}))} cache); "
                      "cells: tok/s (ratio of its bytes-based limit)" if data.get("n_gpu_layers") else ""))
        click.echo(bench_mod.format_table(data))
        if data.get("profiles"):
            click.echo("")
            click.echo(bench_mod.format_profile(data))
    else:
        _fail(ValueError(f"{result}: " + (f"a {kind} result has no table to show" if kind else
                                          "not a score, needle, eval, bench, bench-serve, diagnose or retrieval-heads result")))


if __name__ == "__main__":
    main()
