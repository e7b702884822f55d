"""Progress bars: one rule for when to show them, one constructor.

>>> progress_enabled(False), progress_enabled(True)
(False, True)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(progress: bool | None) -> bool:
    """``None`` means: show bars on an interactive terminal, never under CI."""
    if progress is not None:
        return bool(progress)
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_bar(total: int | None, desc: str, progress: bool | None = None, **options: Any) -> tqdm:
    """A tqdm bar that is disabled unless :func:`progress_enabled` says otherwise (and never left behind)."""
    options.setdefault("leave", False)
    return tqdm(total=total, desc=desc, disable=not progress_enabled(progress), **options)


__all__ = ["progress_bar", "progress_enabled"]
