"""Where a model or tokenizer comes from: a local folder, or a Hugging Face Hub repo id."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import SmallCoderError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Everything a checkpoint folder may hold that we read; never pickled weights.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "special_tokens_map.json"]


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".json", ".safetensors"))


def resolve(path_or_id: str | Path, allow_patterns: list[str] | None = None,
            revision: str | None = None) -> Path:
    """Return a local path for a folder, a file, or a Hub repo id (downloaded to the HF cache).

    Hub access goes through `huggingface_hub.snapshot_download`, so HF_HOME, HF_TOKEN and
    HF_HUB_OFFLINE behave as users of the Hub expect.
    """
    p = Path(path_or_id).expanduser()
    if not p.exists():
        from .fsutil import recover_folder

        recover_folder(p)  # a folder whose replacement a crash interrupted is put back first
    if p.exists():
        return p
    name = str(path_or_id)
    if not looks_like_repo_id(name):
        raise SmallCoderError(f"{name}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=name, revision=revision,
                                  allow_patterns=allow_patterns or CHECKPOINT_FILES)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end the same way for the user
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SmallCoderError(
            f"{name}: no such local folder, and it could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {detail})") from None
    return Path(local)
