"""The one calibration-data protocol: what a batch may be and how it calls the model.

A batch is one of

* a tensor ``x``: called as ``model(x)``, no targets;
* a 1- or 2-sequence ``(inputs,)`` / ``(inputs, targets)`` (what a ``TensorDataset`` DataLoader
  yields): ``inputs`` is a tensor (``model(inputs)``) or a dict (``model(**inputs)``);
* a dict of keyword arguments: ``model(**batch)``. A ``"labels"`` entry is taken out as the
  targets and not passed, so plain modules that do not accept ``labels`` still work.

Every floating-point input must be finite; calibration statistics built on NaN/Inf are garbage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor


class Batch(NamedTuple):
    """A batch ready to call the model with: ``model(*args, **kwargs)``; ``targets`` may be None.

    ``raw`` is the batch as the user gave it (moved to the model's device by
    :func:`iter_batches`): user callbacks such as ``loss_fn(output, batch)`` receive that.
    """

    args: tuple
    kwargs: dict
    targets: Any
    raw: Any = None


def check_calib(calib: object) -> None:
    """Reject what cannot be iterated more than once: criteria may need several passes."""
    if calib is None:
        raise ValueError("calib is None; pass a list or DataLoader of calibration batches")
    if isinstance(calib, (Tensor, Mapping, str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError(
            f"calib must be a list or DataLoader of batches, got {type(calib).__name__} "
            "(wrap a single batch in a list)"
        )
    if isinstance(calib, Iterator):
        raise TypeError("calib must be re-iterable (a list or DataLoader), not a one-shot iterator")


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, Tensor) and obj.is_floating_point() and not torch.isfinite(obj).all():
        raise ValueError(f"calibration batch {where} contains NaN or Inf")


def split_batch(batch: object, index: int = 0) -> Batch:
    """Turn one calibration batch into ``(args, kwargs, targets)``; ``index`` is for messages."""
    where = f"#{index}"
    if isinstance(batch, Tensor):
        _check_finite(batch, where)
        return Batch((batch,), {}, None, batch)
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        if not kwargs:
            raise ValueError(f"calibration batch {where} is a dict with no model inputs")
        for v in kwargs.values():
            _check_finite(v, where)
        return Batch((), kwargs, batch.get("labels"), batch)
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs = batch[0]
        targets = batch[1] if len(batch) == 2 else None
        if isinstance(inputs, Mapping):
            return Batch((), split_batch(inputs, index).kwargs, targets, batch)
        if isinstance(inputs, Tensor):
            _check_finite(inputs, where)
            return Batch((inputs,), {}, targets, batch)
    raise TypeError(
        f"unsupported calibration batch {where} of type {type(batch).__name__}: expected a tensor, "
        "an (inputs, targets) pair, or a dict of keyword arguments"
    )


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    return obj


def iter_batches(calib: Iterable, device: Optional[torch.device] = None) -> Iterator[Batch]:
    """Yield every batch of ``calib`` split and moved to ``device``; raise if there are none."""
    check_calib(calib)
    n = 0
    for n, raw in enumerate(calib, start=1):
        if device is not None:
            raw = _to(raw, device)
        yield split_batch(raw, n - 1)
    if n == 0:
        raise ValueError("calib is empty: it yielded no batches")
