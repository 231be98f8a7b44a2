"""Where SmallCoder looks for data it does not ship: one rule, for the library and the commands."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path | None:
    """$SMALLCODER_DATA, else a `shared/data` folder beside the checkout (as CI lays it out)."""
    env = os.environ.get("SMALLCODER_DATA")
    candidates = [Path(env)] if env else [Path.cwd().parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), None)
