"""Build logic on a small fake tree: series parsing, hashes, patch application, idempotence."""

import difflib
import hashlib
import subprocess
from pathlib import Path

import pytest

from powerinfer_attn.native import build
from powerinfer_attn.native.build import BuildError, HashMismatch, PatchError


def make_patch(tmp: Path, rel: str, before, after, header: str = "") -> str:
    """A unified diff with git's a/ b/ prefixes turning file rel from before into after (None: absent)."""
    old = before.splitlines(keepends=True) if before is not None else []
    new = after.splitlines(keepends=True) if after is not None else []
    diff = difflib.unified_diff(old, new, f"a/{rel}" if before is not None else "/dev/null",
                                f"b/{rel}" if after is not None else "/dev/null")
    return header + f"diff --git a/{rel} b/{rel}\n" + ("new file mode 100644\n" if before is None else "") + "".join(diff)


@pytest.fixture
def tree(tmp_path):
    pristine = tmp_path / "pristine"
    (pristine / "src").mkdir(parents=True)
    (pristine / "src" / "op.c").write_text("int op(void) {\n    return 1;\n}\n")
    (pristine / "README").write_text("upstream\n")
    target = tmp_path / "src"
    subprocess.run(["cp", "-a", str(pristine), str(target)], check=True)
    patches = tmp_path / "patches"
    patches.mkdir()
    return pristine, target, patches


def write_series(patches: Path, names):
    (patches / "series").write_text("# comment\n\n" + "\n".join(names) + "\n")


def test_read_series_order_and_comments(tree):
    _, _, patches = tree
    (patches / "b.patch").write_text("")
    (patches / "a.patch").write_text("")
    (patches / "series").write_text("# order matters\nb.patch  # first\n\na.patch\n")
    assert [p.name for p in build.read_series(patches)] == ["b.patch", "a.patch"]


def test_read_series_missing_and_duplicate(tree):
    _, _, patches = tree
    (patches / "series").write_text("nope.patch\n")
    with pytest.raises(BuildError, match="nope.patch not found"):
        build.read_series(patches)
    (patches / "a.patch").write_text("")
    (patches / "series").write_text("a.patch\na.patch\n")
    with pytest.raises(BuildError, match="listed twice"):
        build.read_series(patches)
    (patches / "series").unlink()
    with pytest.raises(BuildError, match="no series file"):
        build.read_series(patches)


def test_apply_and_idempotence(tree, tmp_path):
    pristine, target, patches = tree
    (patches / "op.patch").write_text(make_patch(tmp_path, "src/op.c", "int op(void) {\n    return 1;\n}\n",
                                                 "int op(void) {\n    return 2;\n}\n", header="op: return 2\n\n"))
    (patches / "new.patch").write_text(make_patch(tmp_path, "src/new.h", None, "#define NEW 1\n"))
    write_series(patches, ["op.patch", "new.patch"])
    series = build.read_series(patches)
    logs = []
    touched = build.apply_series(series, pristine, target, logs.append)
    assert touched == {"src/op.c", "src/new.h"}
    assert "return 2" in (target / "src/op.c").read_text()
    assert (target / "src/new.h").read_text() == "#define NEW 1\n"
    assert "2 rewritten" in logs[-1]

    # a second application with the same series rewrites nothing (mtimes keep the build incremental)
    mtime = (target / "src/op.c").stat().st_mtime_ns
    logs.clear()
    build.apply_series(series, pristine, target, logs.append)
    assert "0 rewritten" in logs[-1]
    assert (target / "src/op.c").stat().st_mtime_ns == mtime

    # dropping a patch restores pristine content and removes the files it added
    write_series(patches, ["op.patch"])
    build.apply_series(build.read_series(patches), pristine, target, logs.append)
    assert not (target / "src/new.h").exists()
    assert "return 2" in (target / "src/op.c").read_text()
    write_series(patches, [])
    build.apply_series(build.read_series(patches), pristine, target, logs.append)
    assert (target / "src/op.c").read_text() == (pristine / "src/op.c").read_text()


def test_failing_patch_names_patch_and_file_and_leaves_tree(tree, tmp_path):
    pristine, target, patches = tree
    good = make_patch(tmp_path, "src/op.c", "int op(void) {\n    return 1;\n}\n", "int op(void) {\n    return 2;\n}\n")
    (patches / "good.patch").write_text(good)
    (patches / "stale.patch").write_text(make_patch(tmp_path, "README", "something else\n", "changed\n"))
    write_series(patches, ["good.patch", "stale.patch"])
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(PatchError) as ei:
        build.apply_series(build.read_series(patches), pristine, target, lambda m: None)
    assert ei.value.patch == "stale.patch"
    assert ei.value.file == "README"
    msg = str(ei.value)
    assert "stale.patch" in msg and "README" in msg
    # what to do: update the patch against the pinned tree, and how
    assert f"Update the patch against the pinned tree {pristine}" in msg
    assert "redo the rejected hunks by hand" in msg and "git diff" in msg
    after = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before, "a failed series must leave the tree untouched"
    assert not list(target.parent.glob(".stage-*"))


def test_touched_files_and_digest(tree, tmp_path):
    _, _, patches = tree
    p = patches / "x.patch"
    p.write_text(make_patch(tmp_path, "a/b.c", "x\n", "y\n", header="header line\n--- not a diff path\n"))
    assert "a/b.c" in build.touched_files(p)
    d1 = build.series_digest([p], ["-DX=1"])
    assert d1 == build.series_digest([p], ["-DX=1"])
    assert d1 != build.series_digest([p], ["-DX=2"])
    p.write_text(p.read_text() + "\n")
    assert d1 != build.series_digest([p], ["-DX=1"])


def test_sha256_mismatch_names_file_and_expected_hash(tmp_path):
    f = tmp_path / build.SDIST_FILE
    f.write_bytes(b"not the sdist")
    with pytest.raises(HashMismatch) as ei:
        build.verify_sha256(f, build.SDIST_SHA256)
    msg = str(ei.value)
    assert str(f) in msg and build.SDIST_SHA256 in msg and hashlib.sha256(b"not the sdist").hexdigest() in msg
    assert f"delete it (rm {f}) and run again" in msg


def test_fetch_sdist_refuses_corrupt_cached_download(tmp_path):
    (tmp_path / build.SDIST_FILE).write_bytes(b"truncated")
    with pytest.raises(HashMismatch, match=build.SDIST_SHA256):
        build.fetch_sdist(tmp_path, lambda m: None)


def test_repo_series_is_valid():
    series = build.read_series(build.REPO_ROOT / "patches")
    assert series, "the repo must carry at least one patch"
    for p in series:
        text = p.read_text()
        head = text.split("diff --git", 1)[0]
        assert head.strip(), f"{p.name} needs a header saying what it does and why"
        assert build.touched_files(p), f"{p.name} touches no file"


def test_repo_series_applies_in_order_and_never_undoes_an_earlier_patch():
    """The series is cut by layer with its history folded in (patches/README.md): a '-' line of
    any patch removes an upstream line, never one that an earlier patch added."""
    import subprocess
    import sys

    pristine = build.REPO_ROOT / "vendor" / "pristine"
    if not pristine.is_dir():
        pytest.skip("no vendor/pristine (made by the first build)")
    r = subprocess.run([sys.executable, str(build.REPO_ROOT / "scripts" / "check-series.py"), "--pristine", str(pristine)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no-undo: OK" in r.stdout


# --- the toolchain check: before the long pip build ------------------------------------


def fake_tools(monkeypatch, tmp_path, names, env=None):
    """PATH holding only executables called ``names``; no CC/CXX/CMAKE_GENERATOR unless given,
    and no cmake/ninja Python packages."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name in names:
        exe = bindir / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    for var in ("CC", "CXX", "CMAKE_GENERATOR"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (env or {}).items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(build, "_python_tool", lambda module: False)
    return bindir


def test_missing_compiler_stops_build_before_anything_else(monkeypatch, tmp_path):
    fake_tools(monkeypatch, tmp_path, ["cmake", "make"])

    def no_download(*a, **k):
        raise AssertionError("the toolchain must be checked before fetching the sdist")

    monkeypatch.setattr(build, "fetch_sdist", no_download)
    vendor = tmp_path / "vendor"
    for run in (lambda: build.build(vendor_dir=vendor, force=True, log=lambda m: None),
                lambda: build.build_stock(vendor_dir=vendor, log=lambda m: None)):
        with pytest.raises(BuildError) as ei:
            run()
        msg = str(ei.value)
        assert "a C compiler (cc, gcc, clang on PATH, or $CC)" in msg
        assert "a C++ compiler (c++, g++, clang++ on PATH, or $CXX)" in msg
        assert "cmake" not in msg.split("missing:")[1].split(".")[0]
        assert "apt-get install build-essential cmake" in msg and "run `powerinfer-attn build` again" in msg
    assert not vendor.exists()


def test_toolchain_found_on_path_or_from_cc_cxx(monkeypatch, tmp_path):
    bindir = fake_tools(monkeypatch, tmp_path, ["gcc", "g++", "cmake", "ninja"])
    assert build.check_toolchain() == {"cc": str(bindir / "gcc"), "cxx": str(bindir / "g++"),
                                       "cmake": str(bindir / "cmake"), "build_tool": str(bindir / "ninja")}
    # CC/CXX win over PATH, and may carry a launcher and flags ("ccache clang")
    bindir = fake_tools(monkeypatch, tmp_path / "other", ["mycc", "myc++"], env={"CC": "mycc -O2", "CXX": "myc++"})
    monkeypatch.setattr(build, "_python_tool", lambda module: module in ("cmake", "ninja"))
    found = build.check_toolchain()
    assert found["cc"] == str(bindir / "mycc") and found["cxx"] == str(bindir / "myc++")
    assert found["cmake"] == "cmake (Python package)"


def test_cc_naming_a_missing_program_is_reported(monkeypatch, tmp_path):
    fake_tools(monkeypatch, tmp_path, ["cc", "c++", "cmake", "make"], env={"CC": "/opt/nowhere/clang-99"})
    with pytest.raises(BuildError, match=r"CC='/opt/nowhere/clang-99' is not found on PATH \(fix or unset CC\)"):
        build.check_toolchain()


def test_missing_cmake_and_make_are_reported(monkeypatch, tmp_path):
    fake_tools(monkeypatch, tmp_path, ["cc", "c++"])
    with pytest.raises(BuildError) as ei:
        build.check_toolchain()
    msg = str(ei.value)
    assert "cmake (on PATH, or `pip install cmake` in this environment)" in msg and "make or ninja" in msg
    assert "compiler" not in msg.split("missing:")[1].split(". Install")[0]
