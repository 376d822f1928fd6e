"""Publishing an export on the Hugging Face Hub (``dits convert --to diffusers --push-to-hub``).

:func:`check_push` runs before anything is exported (offline, no token, a malformed id: one
line each); :func:`push_folder` uploads a finished export directory through ``huggingface_hub``.
"""
from __future__ import annotations

import os
from pathlib import Path

from dits.errors import UserError, first_line


def _offline() -> bool:
    import huggingface_hub

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False))


def check_push(repo_id: str) -> str:
    """The token to push ``repo_id`` with; a UserError when it cannot be pushed from here."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import validate_repo_id
    except ImportError:  # pragma: no cover - diffusers depends on it
        raise UserError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise UserError(f"--push-to-hub {repo_id!r} is not a Hub repository id ({first_line(e, 120)}); "
                        "use NAME or OWNER/NAME") from None
    if _offline():
        raise UserError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; "
                        "unset it, or export without --push-to-hub and upload later")
    token = huggingface_hub.get_token()
    if not token:
        raise UserError(f"--push-to-hub {repo_id} needs a Hugging Face token: run `hf auth login` "
                        "or set HF_TOKEN (a token with write access)")
    return token


def push_folder(folder: str | os.PathLike, repo_id: str, token: str, message: str) -> str:
    """Create ``repo_id`` if needed (a model repository) and upload ``folder``'s files to its
    root in one commit; returns the repository's URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(Path(folder)), repo_type="model", commit_message=message)
    except Exception as e:  # network, authentication, permissions: all reported the same way
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({first_line(e, 160)}); "
                        "nothing was exported") from None
    return str(url)
