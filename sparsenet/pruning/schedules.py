"""Gradual pruning schedules: the target sparsity at each training step.

A schedule is passed to ``sparsenet.prune(model, sparsity=s_f, schedule=...)``; the pruner's
final sparsity ``s_f`` is prune's ``sparsity``, the schedule says how to get there.

How steps count: the pruner starts at step 0 (``prune`` applies ``sparsity_at(0)``) and each
``pruner.step()`` call advances one step, so call it once per optimizer step, after
``optimizer.step()``. Masks change only at *update steps*: ``start``, ``start + frequency``,
``start + 2*frequency``, ... and ``end`` itself (also when ``end - start`` is not a multiple of
``frequency``). Between update steps the target stays at the last update step's value; before
``start`` it is the value at ``start``; from ``end`` on it is the final sparsity. So after
``end`` calls to ``step()`` the model is at the final sparsity.

``soft=True``: until ``end``, each update step multiplies the weights it would prune by
``shrink`` (in place, on the stored weights) instead of masking them; they keep training and may
grow back, and a weight picked at k update steps has been scaled by ``shrink**k``. At ``end``
the final mask is applied and the pruned weights read exactly zero from then on. (``finalize``
before ``end`` leaves the shrunk weights as they are: nothing is zero yet.)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable


def _check_step(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_fraction(value: object, name: str) -> float:
    """A sparsity in [0, 1) as a float, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


class Schedule:
    """Base: update steps from ``start`` to ``end`` every ``frequency`` steps.

    Subclasses give ``_curve(step, final)``, the target at an update step in ``[start, end)``.
    """

    def __init__(
        self, start: int, end: int, frequency: int = 1, *, soft: bool = False, shrink: float = 0.5
    ) -> None:
        self.start = _check_step(start, "start", 0)
        self.end = _check_step(end, "end", 1)
        if self.end <= self.start:
            raise ValueError(f"schedule end ({end}) must be after start ({start})")
        self.frequency = _check_step(frequency, "frequency", 1)
        if not isinstance(soft, bool):
            raise TypeError(f"soft must be True or False, got {soft!r}")
        if isinstance(shrink, bool) or not isinstance(shrink, numbers.Real) or not (
            0.0 < float(shrink) < 1.0
        ):
            raise ValueError(f"shrink must be a float in (0, 1), got {shrink!r}")
        self.soft, self.shrink = soft, float(shrink)

    def is_update(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``."""
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.frequency == 0

    def last_update(self, step: int) -> int:
        """The update step whose target holds at ``step`` (``start`` before it)."""
        if step >= self.end:
            return self.end
        if step <= self.start:
            return self.start
        return self.start + (step - self.start) // self.frequency * self.frequency

    def sparsity_at(self, step: int, final: float) -> float:
        """Target sparsity at ``step`` for a run ending at ``final``."""
        u = self.last_update(step)
        if u >= self.end:
            return final
        value = check_fraction(self._curve(u, final), f"{type(self).__name__} sparsity")
        if value > final + 1e-12:
            raise ValueError(
                f"{type(self).__name__} gives sparsity {value:g} at step {u}, above the final "
                f"sparsity {final:g}"
            )
        return value

    def check_final(self, final: float) -> None:
        """Raise before anything is pruned if the schedule cannot end at ``final``."""
        self.sparsity_at(0, final)

    def _progress(self, step: int) -> float:
        return (step - self.start) / (self.end - self.start)

    def _curve(self, step: int, final: float) -> float:
        raise NotImplementedError

    def config(self) -> dict:
        """Settings that define the schedule (compared when a pruner's state is loaded)."""
        return {
            "type": type(self).__name__,
            "start": self.start,
            "end": self.end,
            "frequency": self.frequency,
            "soft": self.soft,
            "shrink": self.shrink,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class _FromInitial(Schedule):
    def __init__(
        self,
        start: int,
        end: int,
        frequency: int = 1,
        initial: float = 0.0,
        *,
        soft: bool = False,
        shrink: float = 0.5,
    ) -> None:
        super().__init__(start, end, frequency, soft=soft, shrink=shrink)
        self.initial = check_fraction(initial, "initial")

    def sparsity_at(self, step: int, final: float) -> float:
        # Exactly ``initial`` up to ``start`` (the curves' float arithmetic is off by an ulp).
        return self.initial if step <= self.start else super().sparsity_at(step, final)

    def check_final(self, final: float) -> None:
        if self.initial > final:
            raise ValueError(
                f"schedule initial sparsity {self.initial:g} is above the final sparsity {final:g}"
            )

    def config(self) -> dict:
        return {**super().config(), "initial": self.initial}


class CubicSchedule(_FromInitial):
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))**3``.

    Prunes fast while many redundant weights remain and slowly near the end.
    """

    def _curve(self, step: int, final: float) -> float:
        return final + (self.initial - final) * (1.0 - self._progress(step)) ** 3


class LinearSchedule(_FromInitial):
    """``s_t = s_i + (s_f - s_i) * (t - start) / (end - start)``."""

    def _curve(self, step: int, final: float) -> float:
        return self.initial + (final - self.initial) * self._progress(step)


class CustomSchedule(Schedule):
    """``fn(step) -> sparsity`` at each update step before ``end``; the final sparsity from ``end``.

    ``fn`` must return a float in [0, 1) no larger than the final sparsity; a lower value than
    before keeps the current masks (pruned weights are never regrown).
    """

    def __init__(
        self,
        fn: Callable[[int], float],
        end: int,
        frequency: int = 1,
        start: int = 0,
        *,
        soft: bool = False,
        shrink: float = 0.5,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable step -> sparsity, got {fn!r}")
        super().__init__(start, end, frequency, soft=soft, shrink=shrink)
        self.fn = fn

    def _curve(self, step: int, final: float) -> float:
        return self.fn(step)

    def config(self) -> dict:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return {**super().config(), "fn": name}


@dataclass(frozen=True)
class PruningStep:
    """What one ``Pruner.step()`` did.

    ``newly_pruned``: weights masked to zero at this step, per layer; ``shrunk``: weights
    multiplied by the schedule's ``shrink`` (soft schedules, before ``end``). Both are empty when
    the step was not an update step.
    """

    step: int
    sparsity: float  # target sparsity in force after this step
    updated: bool  # an update step: masks (or soft shrinking) were recomputed
    final: bool  # the schedule has reached its end
    newly_pruned: dict[str, int] = field(default_factory=dict)
    shrunk: dict[str, int] = field(default_factory=dict)

    @property
    def total_newly_pruned(self) -> int:
        return sum(self.newly_pruned.values())
