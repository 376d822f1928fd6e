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


def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture
def refuses(tmp_path, monkeypatch, capsys):
    """``refuses(argv, needle)``: ``dits *argv`` run in an empty workspace exits 2 with one line that
    contains ``needle`` and leaves the workspace as it was."""
    from dits.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("x")

    def check(argv, needle):
        before = _snapshot(tmp_path)
        code = main(list(argv))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
        assert _snapshot(tmp_path) == before
    return check
