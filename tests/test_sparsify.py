"""Sparse decode through llama-cpp-python's own ``Llama``: sparsify turns it on for an existing
object, completions (plain, chat, streaming) then decode sparsely, unsparsify turns it off."""

import warnings

import numpy as np
import pytest

from powerinfer_attn.predictors import predictor_file
from powerinfer_attn.serving import sparsify

PROMPT = "The history of the Roman Empire begins with"


@pytest.fixture(scope="module")
def llm(model_path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


def _text(llm, **kw):
    return llm.create_completion(PROMPT, max_tokens=16, temperature=0.0, **kw)["choices"][0]["text"]


def _random_file(path, llm, value):
    rng = np.random.default_rng(0)
    import llama_cpp

    L, H, E = (llama_cpp.llama_model_n_layer(llm.model), llama_cpp.llama_model_n_head(llm.model),
               llama_cpp.llama_model_n_embd(llm.model))
    ws = [(rng.normal(size=(H, E)) * 0.05).astype(np.float32) for _ in range(L)]
    bs = [rng.normal(size=H).astype(np.float32) for _ in range(L)]
    predictor_file.write_predictor(path, ws, bs, llm.model_path.rsplit("/", 1)[-1], "threshold", value, {})
    return path


def test_all_heads_gives_dense_text_and_off_again(llm):
    dense = _text(llm)
    assert sparsify.predictor_name(llm) is None and sparsify.head_density(llm) is None
    assert sparsify.sparsify(llm, "all") == "all"
    assert _text(llm) == dense and sparsify.head_density(llm) == 1.0
    chunks = [c["choices"][0]["text"] for c in llm.create_completion(PROMPT, max_tokens=16, temperature=0.0, stream=True)]
    assert "".join(chunks) == dense
    sparsify.unsparsify(llm)
    sparsify.unsparsify(llm)  # a no-op on a dense Llama
    assert sparsify.predictor_name(llm) is None and _text(llm) == dense


def test_trained_predictor_decodes_sparsely(llm, tmp_path):
    dense = _text(llm)
    path = _random_file(tmp_path / "p.gguf", llm, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = sparsify.sparsify(llm, f"trained:{path}")
    assert name == "trained:p.gguf"
    sparse = _text(llm)
    density = sparsify.head_density(llm)
    assert 0.1 < density < 0.9, density
    assert sparse != dense  # a random half of the heads changes the text
    assert sparsify.head_density(llm) is None  # nothing decoded since the last read
    chat = llm.create_chat_completion([{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0)
    assert chat["choices"][0]["message"]["content"] is not None and 0 < sparsify.head_density(llm) < 1
    # all heads through the same file: the dense text
    sparsify.sparsify(llm, f"trained:{path}:threshold=-1000")
    assert _text(llm) == dense and sparsify.head_density(llm) == 1.0
    sparsify.unsparsify(llm)
    assert _text(llm) == dense


def test_the_stock_graph_below_sparse_min_ctx_inside_llamas_own_loop(llm, tmp_path):
    """The switch is in the library, so llama-cpp-python's decode loop obeys it: far past the
    completion the trained predictor never runs and the text is dense; at 0 it is sparse again."""
    dense = _text(llm)
    path = _random_file(tmp_path / "p.gguf", llm, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparsify.sparsify(llm, f"trained:{path}", sparse_min_ctx=400)
        assert sparsify.sparse_min_ctx(llm) == 400
        assert _text(llm) == dense and sparsify.head_density(llm) is None  # no sparse step ran
        sparsify.sparsify(llm, f"trained:{path}", sparse_min_ctx=0)
        assert _text(llm) != dense and 0.1 < sparsify.head_density(llm) < 0.9
    sparsify.unsparsify(llm)
    assert sparsify.sparse_min_ctx(llm) == 0


def test_window_fill_through_llama(llm, tmp_path):
    """A trained predictor with window fill: its own text, neither zero fill's nor dense; a
    window that covers the whole context gives dense's text; unsparsify clears the window."""
    dense = _text(llm)
    path = _random_file(tmp_path / "w.gguf", llm, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zero = (sparsify.sparsify(llm, f"trained:{path}"), _text(llm))[1]
        name = sparsify.sparsify(llm, f"trained:{path}:fill=window:1+3")
        windowed = _text(llm)
        assert name == "trained:w.gguf+window:1+3" and 0.1 < sparsify.head_density(llm) < 0.9
        sparsify.sparsify(llm, f"trained:{path}:fill=window:256+256")
        assert _text(llm) == dense
    assert windowed not in (dense, zero)
    sparsify.unsparsify(llm)
    sparsify.sparsify(llm, "all")
    assert _text(llm) == dense
    sparsify.unsparsify(llm)


def test_refuses_per_step_python_predictors(llm):
    with pytest.raises(ValueError, match="needs powerinfer_attn.engine.decode.Engine"):
        sparsify.sparsify(llm, "random:3")
    assert sparsify.predictor_name(llm) is None


def test_refuses_calibration_it_cannot_run(tmp_path, llm):
    """llama-cpp-python decodes the prompt itself: a calibrate=N predictor would run uncalibrated."""
    import llama_cpp

    L, H, E = (llama_cpp.llama_model_n_layer(llm.model), llama_cpp.llama_model_n_head(llm.model),
               llama_cpp.llama_model_n_embd(llm.model))
    d = E // H
    path = tmp_path / "lin.gguf"
    predictor_file.write_predictor(path, [np.zeros((H, E), np.float32)] * L, [np.zeros(H, np.float32)] * L,
                                   llm.model_path.rsplit("/", 1)[-1], "topk", 3.0, {},
                                   linear=(np.zeros((L, H * d, E), np.float32), np.zeros((L, H * d), np.float32)))
    with pytest.raises(ValueError, match="sparsify and the server do not calibrate"):
        sparsify.sparsify(llm, f"trained:{path}:calibrate=64")
    assert sparsify.predictor_name(llm) is None
