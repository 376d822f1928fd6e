"""Where dits keeps files it can rebuild (fitted digits classifier, default weights spot)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DITS_CACHE``, else ``$XDG_CACHE_HOME/dits``, else ``~/.cache/dits`` (not created)."""
    if os.environ.get("DITS_CACHE"):
        return Path(os.environ["DITS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dits"
