"""Where SmallCoder looks for things it does not ship: the shared benchmark data.

A neutral home for path rules that library code and commands both need (library code never
imports a CLI module; the CLI re-exports what its commands use).
"""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path | None:
    """$SMALLCODER_DATA, else a `shared/data` folder beside the checkout (as CI lays it out)."""
    env = os.environ.get("SMALLCODER_DATA")
    candidates = [Path(env)] if env else [Path.cwd().parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), None)
