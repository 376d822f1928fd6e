"""Test-wide settings: no network, no writes to the user's cache."""
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: on a small shared CPU, OpenMP threads spinning against each
    other (and against the subprocesses some tests start) make them many times slower."""
    import torch
    from threadpoolctl import threadpool_limits  # BLAS too (numpy/scipy/sklearn)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache():
    """The digits classifier and Inception caches go to a temp dir, not ~/.cache/dits."""
    with tempfile.TemporaryDirectory(prefix="dits-cache-") as d:
        old = os.environ.get("DITS_CACHE")
        os.environ["DITS_CACHE"] = d
        yield d
        if old is None:
            os.environ.pop("DITS_CACHE", None)
        else:
            os.environ["DITS_CACHE"] = old
