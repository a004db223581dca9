import gc
import logging

import pytest
import torch

from helpers import BUILDERS, CALL_KWARGS, MATRIX

logging.getLogger("diffusers").setLevel(logging.ERROR)

# Every recovery runs a full gc.collect() (an OOM's frames can hold tensors in cycles), and a
# full collection walks every object alive: ~0.17 s with torch, transformers and diffusers
# imported, which was most of the fault matrix's time. The imported libraries are frozen out of
# the collector; everything a test creates, the failed attempts' garbage included, is still
# collected as in production.
BUILDERS["sdxl"](), BUILDERS["flux"]()  # import the model and pipeline classes the tests build
gc.collect()
gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_earlier_modules_left():
    """The same for what earlier test modules left alive (imports, module-level caches): the
    suite's later modules would otherwise collect ever more objects on every recovery."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on tiny tensors a second thread only waits at
    OpenMP's barrier, and on a busy machine it spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["sdxl", "flux"])
def kind(request):
    return request.param


@pytest.fixture
def pipe(kind):
    return BUILDERS[kind]()


@pytest.fixture
def call_kwargs(kind):
    return dict(CALL_KWARGS[kind])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def backoff_waits(monkeypatch):
    """Recovery's backoff waits are recorded, not slept (the side effect as a parameter)."""
    import autofit.engine.recovery

    waits: list[float] = []
    monkeypatch.setattr(autofit.engine.recovery, "sleep", waits.append)
    return waits


@pytest.fixture(autouse=True)
def _isolated_plan_cache(tmp_path, monkeypatch):
    """Each test gets its own plan cache folder: no test sees another's plans."""
    monkeypatch.setenv("AUTOFIT_CACHE_DIR", str(tmp_path / "autofit-cache"))


def pytest_report_header(config):
    return f"autofit fault matrix: {len(MATRIX)} cases"
