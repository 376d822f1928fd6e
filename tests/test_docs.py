"""The docs site (issue 23 #3): `mkdocs build --strict` passes (a broken link, a missing page
or an API object mkdocstrings cannot render fails it). Runs where the `dits[docs]` extra is
installed (`make docs` installs it), and is skipped with the reason otherwise."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NEEDS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def test_docs_site_builds_strictly(tmp_path):
    missing = [m for m in NEEDS if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed (no {', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for page in ("index.html", "getting-started/index.html", "tracking/index.html", "diffusion/index.html"):
        assert (site / page).is_file(), page
    for module in ("models", "diffusion", "flow", "sample", "evaluate", "checkpoint", "train"):
        html = (site / "api" / module / "index.html").read_text()
        assert f'id="dits.{module}' in html, module  # mkdocstrings rendered the module's docstrings
    assert 'id="dits.models.create_model"' in (site / "api" / "models" / "index.html").read_text()
