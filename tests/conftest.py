import os

import pytest

from powerinfer_attn.native import build


@pytest.fixture(scope="session", autouse=True)
def _own_crossover_file(tmp_path_factory):
    """`--sparse-min-ctx auto` reads where `bench` measured sparse to pay on this machine; the
    tests (and the servers they start) must not depend on what a user's bench runs recorded."""
    os.environ["POWERINFER_ATTN_CROSSOVER"] = str(tmp_path_factory.mktemp("crossover") / "crossover.json")
    yield


def pytest_collection_modifyitems(config, items):
    """Markers from what a test needs, so ``-m`` selects without a list to keep up to date:
    ``engine`` for any test that uses the built library (the ``engine_lib`` fixture, directly or
    through ``model_path``, ``engine``, ``ggml_lib``), ``gpu`` for tests/test_cuda.py. ``timing``
    is set by hand on the tests whose assertions depend on timings (a loaded machine can fail them)."""
    for item in items:
        if "engine_lib" in getattr(item, "fixturenames", ()) or "ggml_lib" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.engine)
        if item.path.name == "test_cuda.py":
            item.add_marker(pytest.mark.gpu)


def _engine_available() -> str | None:
    inst = build.installed()
    if inst.lib is None:
        return "llama_cpp is not installed (run `powerinfer-attn build`)"
    if not inst.patched:
        return f"{inst.lib} is not the patched library (run `powerinfer-attn build`)"
    return None


@pytest.fixture(scope="session")
def engine_lib():
    """The patched library must be there; `make test` sets POWERINFER_ATTN_REQUIRE_ENGINE so a
    missing library fails the run instead of skipping the engine tests."""
    why = _engine_available()
    if why:
        if os.environ.get("POWERINFER_ATTN_REQUIRE_ENGINE"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="session")
def ggml_lib(request):
    """libggml-base/libggml-cpu for the kernel tests: those of the patched package (as
    ``engine_lib``), or the build ``$POWERINFER_ATTN_GGML_LIB_DIR`` names (``make sanitize``),
    which must then be there."""
    from powerinfer_attn.native import kernels

    if os.environ.get(kernels.LIB_DIR_ENV):
        try:
            kernels.lib_dir()
        except RuntimeError as e:
            pytest.fail(str(e))
        return
    request.getfixturevalue("engine_lib")


@pytest.fixture(scope="session")
def model_path(engine_lib):
    from powerinfer_attn.native.model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def f32_model_path(model_path):
    from powerinfer_attn.native.model import derived_model_path

    return derived_model_path("F32", model_path)


@pytest.fixture(scope="session")
def engine(model_path):
    from powerinfer_attn.engine.decode import Engine

    eng = Engine(model_path, n_ctx=512, n_threads=2)
    yield eng
    eng.close()
