"""Which models' weights sit on this node's disk, read from a Hugging Face hub cache directory.

The hub layout (what `huggingface_hub`, vLLM and most serving images use): `models--{org}--{name}/snapshots/
{revision}/` holds links to the files of each downloaded revision, and `blobs/` their contents, a download in
progress ending in `.incomplete`. A model counts as cached when some revision has its `config.json` and at least
one weight file, each resolving to a complete file: a half-finished download would start as slowly as none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("gpu_extender.agent")

__all__ = ["ModelCache", "cached_models"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def _complete(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0 and not path.resolve().name.endswith(".incomplete")
    except OSError:
        return False


def _revision_complete(revision: Path) -> bool:
    if not _complete(revision / "config.json"):
        return False
    return any(_complete(f) for f in revision.rglob("*") if f.name.endswith(WEIGHT_SUFFIXES))


def cached_models(directory: str | Path) -> list[str]:
    """`org/name` of every model with a complete revision under `directory`, sorted; [] when it does not exist."""
    root = Path(directory)
    found = []
    try:
        entries = sorted(root.glob("models--*"))
    except OSError:
        return []
    for entry in entries:
        name = entry.name.removeprefix("models--").replace("--", "/")
        snapshots = entry / "snapshots"
        try:
            revisions = [r for r in snapshots.iterdir() if r.is_dir()] if snapshots.is_dir() else []
        except OSError:
            continue
        if any(_revision_complete(r) for r in revisions):
            found.append(name)
    return found


class ModelCache:
    """The cached models, scanned again at most every `rescan_s` (a scan walks the directory tree)."""

    def __init__(self, directory: str | Path, rescan_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        self._rescan_s = rescan_s
        self._clock = clock
        self._scanned_at = float("-inf")
        self._models: list[str] = []

    def models(self) -> list[str]:
        now = self._clock()
        if now - self._scanned_at >= self._rescan_s:
            self._scanned_at = now
            models = cached_models(self.directory)
            if models != self._models:
                log.info("model cache changed", extra={"directory": str(self.directory), "models": models})
            self._models = models
        return list(self._models)
