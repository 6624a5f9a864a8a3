"""`powerinfer-attn`: a thin command line over the library."""

from __future__ import annotations

import json
import sys

import click
import numpy as np

from . import build as build_mod
from .model import default_model_path, resolve_model

model_option = click.option("--model", "model", type=click.Path(dir_okay=False), default=None,
                            help="GGUF model (llama architecture); default: SmolLM2-135M-Instruct Q4_1.")
threads_option = click.option("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores, at most 16).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(1)


@click.group()
@click.version_option(package_name="powerinfer-attn")
def main() -> None:
    """Decode-time attention-head sparsity for llama.cpp."""


@main.command()
@click.option("--check", is_flag=True, help="Only report whether the installed library is the patched one.")
@click.option("--force", is_flag=True, help="Rebuild even when the installed build is current.")
@json_option
def build(check: bool, force: bool, as_json: bool) -> None:
    """Fetch the pinned llama.cpp tree, apply patches/, build and install it."""
    try:
        if check:
            info = build_mod.check()
            if as_json:
                click.echo(json.dumps(info, indent=1))
            else:
                state = "patched" if info["patched"] else "NOT patched (stock or missing)"
                click.echo(f"library: {info['library']}\nstate: {state}"
                           + (f" ({info['patch_version']})" if info["patched"] else "")
                           + f"\nbuilt from the current patch series: {'yes' if info['current'] else 'no'}")
            sys.exit(0 if info["patched"] and info["current"] else 1)
        res = build_mod.build(force=force)
        if as_json:
            click.echo(json.dumps({"digest": res.digest, "rebuilt": res.rebuilt,
                                   "package_dir": str(res.package_dir)}, indent=1))
    except build_mod.BuildError as e:
        _fail(e)


@main.command()
def model() -> None:
    """Print the path of the default model, fetching it on first use."""
    try:
        click.echo(str(default_model_path()))
    except build_mod.BuildError as e:
        _fail(e)


@main.command()
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("-n", "n_tokens", type=click.IntRange(1), default=32, show_default=True, help="Tokens to generate.")
@click.option("--ctx", "n_ctx", type=click.IntRange(16), default=2048, show_default=True, help="Context size.")
@click.option("--flash-attn/--no-flash-attn", default=False, show_default=True)
@click.option("--sparse", is_flag=True, help="Decode with sparse attention heads.")
@click.option("--predictor", default=None, help="Head predictor for --sparse: all, mask-file:PATH.")
@model_option
@threads_option
@json_option
def generate(prompt, n_tokens, n_ctx, flash_attn, sparse, predictor, model, threads, as_json) -> None:
    """Greedy generation through the patched bindings, with decode speed."""
    from .engine import Engine, EngineError
    from .predictors import get_predictor

    if predictor and not sparse:
        _fail(ValueError("--predictor needs --sparse"))
    try:
        path = resolve_model(model)
        with Engine(path, n_ctx=n_ctx, n_threads=threads, flash_attn=flash_attn) as eng:
            pred = get_predictor(predictor or "all", eng.n_layer, eng.n_head) if sparse else None
            g = eng.generate(prompt, n_tokens, predictor=pred)
            threads_used = eng.n_threads
            layer_ops = eng.layer_ops() if sparse else None
    except (EngineError, FileNotFoundError, ValueError, build_mod.BuildError) as e:
        _fail(e)
    mode = f"sparse ({pred.name})" if sparse else "dense"
    density = float(np.mean(g.masks)) if g.masks else (1.0 if sparse else None)
    if as_json:
        click.echo(json.dumps({
            "model": str(path), "prompt": prompt, "prompt_tokens": len(g.prompt_tokens),
            "tokens": g.tokens, "text": g.text, "n_generated": len(g.tokens),
            "prefill_s": g.prefill_s, "decode_s": g.decode_s, "decode_tok_s": g.decode_tok_s,
            "threads": threads_used, "flash_attn": flash_attn, "mode": "sparse" if sparse else "dense",
            "predictor": pred.name if sparse else None, "mean_head_density": density,
            "sparse_layer_ops": layer_ops,
        }, indent=1))
    else:
        click.echo(prompt + g.text)
        click.echo(f"\n[{mode}] {len(g.tokens)} tokens, decode {g.decode_tok_s:.1f} tok/s, "
                   f"prefill {len(g.prompt_tokens)} tokens in {g.prefill_s * 1000:.0f} ms, "
                   f"{threads_used} threads"
                   + (f", mean head density {density:.2f}" if sparse else ""), err=True)


if __name__ == "__main__":
    main()
