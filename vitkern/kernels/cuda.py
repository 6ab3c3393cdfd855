"""Finds the compiled CUDA extension `vitkern._C` (built by setup.py from csrc/).

`load_error()` says why the extension cannot be used here (None when it can); it never raises,
so a missing or broken build never breaks `import vitkern`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """None if `vitkern._C` imports and registers its ops, else the reason it does not."""
    try:
        importlib.import_module("vitkern._C")
    except ImportError as exc:
        return (
            "the CUDA extension vitkern._C is not built "
            f"({exc}); build it with `pip install -e .` on a machine with nvcc and a CUDA build of torch"
        )
    except Exception as exc:  # pragma: no cover - a broken build
        return f"importing the CUDA extension vitkern._C failed: {type(exc).__name__}: {exc}"
    return None
