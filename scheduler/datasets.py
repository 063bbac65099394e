"""Where the reference traces live: `../shared/data` beside the checkout, or where GPU_EXTENDER_DATA points."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data() -> Path:
    override = os.environ.get("GPU_EXTENDER_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data"
