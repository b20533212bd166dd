"""``exclude=`` patterns, shared by ``prune``, ``reconstruct`` and ``sparsify``.

Patterns are fnmatch globs matched against a module's qualified name and its ancestors' names, so
``"classifier"`` excludes everything under ``classifier``. A pattern that matches no module at all
is an error, so a typo never silently converts or prunes a layer meant to be kept. A leaf module.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence

from torch import nn


def check_exclude(exclude: object) -> tuple[str, ...]:
    """``exclude`` as a tuple of patterns: None, one string, or a collection of strings."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    if isinstance(exclude, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in exclude):
        return tuple(exclude)
    raise TypeError(f"exclude must be a list of names or glob patterns, got {exclude!r}")


def check_patterns_match(model: nn.Module, patterns: Sequence[str]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"exclude patterns match no module: {unmatched}")


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    ancestors = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatchcase(n, p) for n in ancestors for p in patterns)
