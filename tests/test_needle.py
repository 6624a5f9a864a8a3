"""The needle (pass key) scorer: prompt construction, answer parsing, and dense against sparse."""

import pytest

from powerinfer_attn.evaluation import needle
from powerinfer_attn.predictors.specs import get_predictor


def _tok(s):
    # a stand-in tokenizer: one token per character
    return [ord(c) for c in s]


def test_build_prompt_is_exactly_the_length_with_the_key_at_depth():
    hay = _tok("x" * 2000)
    for depth in (0.0, 0.5, 1.0):
        p = needle.build_prompt(_tok, 600, depth, 12345, hay)
        assert len(p) == 600
        text = "".join(map(chr, p))
        assert text.startswith(needle.INSTRUCTION) and text.endswith(needle.QUESTION)
        at = text.index("12345")
        body = len(text) - len(needle.INSTRUCTION) - len(needle.QUESTION)
        assert abs((at - len(needle.INSTRUCTION)) / body - depth) < 0.15
    with pytest.raises(ValueError, match="too short"):
        needle.build_prompt(_tok, 100, 0.5, 12345, hay)
    with pytest.raises(ValueError, match="haystack of 10 tokens"):
        needle.build_prompt(_tok, 600, 0.5, 12345, hay[:10])


def test_answer_key():
    assert needle.answer_key(" 71432. Remember") == 71432
    assert needle.answer_key(" is 7 1 4") == 7
    assert needle.answer_key(" unknown") is None


def test_dense_finds_the_key_and_all_heads_agree(model_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The river flows through the valley and reaches the sea after many miles. " * 200)
    preds = [get_predictor("all", model_path), get_predictor("random:3:1", model_path)]
    res = needle.run(model_path, [512], 3, preds, ["filler", "text"], text, threads=2)
    assert [(r.haystack, r.predictor) for r in res] == [
        ("filler", "dense"), ("filler", "all"), ("filler", "random:3"),
        ("text", "dense"), ("text", "all"), ("text", "random:3")]
    for dense, alls, rand in (res[:3], res[3:]):
        assert dense.correct == 3, dense.answers  # a 135M model finds a key in 512 tokens
        assert alls.answers == dense.answers and alls.density == 1.0
        assert rand.density == pytest.approx(3 / 9)
        assert len(set(dense.keys)) == 3 and all(10000 <= k < 100000 for k in dense.keys)
    table = needle.format_table(res)
    assert "| filler | 512 | 3/3 | 3/3 (density 1.00) |" in table
    with pytest.raises(ValueError, match="text file"):
        needle.run(model_path, [512], 1, [], ["text"], None)
    with pytest.raises(ValueError, match="haystack"):
        needle.run(model_path, [512], 1, [], ["noise"], None)
