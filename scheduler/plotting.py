"""Matplotlib is optional (the `plots` extra): a command that draws asks here and goes on without it."""

from __future__ import annotations

import sys
from types import ModuleType

INSTALL_HINT = "pip install 'kube-gpu-extender[plots]'"


def pyplot(what: str = "plots") -> ModuleType | None:
    """`matplotlib.pyplot` on the file-only backend, or None after telling the user how to get it."""
    try:
        import matplotlib
    except ImportError:
        print(f"{what} skipped: matplotlib is not installed ({INSTALL_HINT})", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
