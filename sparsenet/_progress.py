"""The one rule for tqdm's ``disable`` from a user's ``progress`` argument."""
from __future__ import annotations

from typing import Optional


def bar_disabled(progress: Optional[bool]) -> Optional[bool]:
    """``progress=None`` lets tqdm hide its bar when stderr is not a terminal (logs, pytest);
    True / False force it on / off."""
    return None if progress is None else not progress
