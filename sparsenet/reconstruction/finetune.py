"""Masked fine-tuning: train the pruned model's kept weights to win back what pruning cost.

The masks stay as pruning left them: sparsenet's parametrization reads ``where(mask, original, 0)``,
so pruned weights get no gradient and read exactly 0 whatever the optimizer (weight decay
included) does to the stored original. Optionally the dense model teaches: its
outputs (KL on logits, MSE or cosine) and chosen intermediate features are matched, which
recovers more from a small data set than the task loss alone; RigL regrowth may move the kept
weights (:mod:`.regrowth`).
"""

from __future__ import annotations

import numbers
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._progress import bar_disabled
from .._validate import integer, real
from ..calibration import Batch, check_calib, iter_batches
from ..calibration.capture import _token_rows, eval_mode, model_device
from ..calibration.data import _to
from ..calibration.outputs import model_output
from ..pruning.gradients import default_loss
from .regrowth import RegrowthUpdate, RigL

LossFn = Callable[[Any, Any], Tensor]
DISTILL_OUTPUTS = ("kl", "mse", "cosine")


@dataclass
class FinetuneResult:
    """Mean total loss of each epoch run (the last may be cut short by ``max_steps``), the
    number of optimisation steps taken, and the RigL mask updates, if any."""

    epoch_losses: list[float]
    steps: int
    regrowth: list[RegrowthUpdate] = field(default_factory=list)


def _output_distill(kind: str, student: Tensor, teacher: Tensor, temperature: float, attention_mask) -> Tensor:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ"
        )
    s, t = _token_rows(student, attention_mask), _token_rows(teacher, attention_mask).to(student.dtype)
    if kind == "kl":
        # KL(teacher || student) on softened distributions; T^2 keeps gradients comparable
        # across temperatures (Hinton et al., 2015).
        log_s = F.log_softmax(s.float() / temperature, dim=-1)
        log_t = F.log_softmax(t.float() / temperature, dim=-1)
        return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2
    if kind == "mse":
        return F.mse_loss(s, t)
    return 1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1).mean()


def _feature_distill(student: dict, teacher: dict) -> Tensor:
    """Sum over layers of MSE(student, teacher) / mean(teacher**2): scale-free per layer."""
    total = None
    for name, outs in student.items():
        touts = teacher.get(name, [])
        if not outs or len(outs) != len(touts):
            raise ValueError(
                f"feature layer {name!r} ran {len(outs)} time(s) in the model and "
                f"{len(touts)} in the teacher"
            )
        for s, t in zip(outs, touts):
            if s.shape != t.shape:
                raise ValueError(
                    f"feature layer {name!r}: model output {tuple(s.shape)}, teacher {tuple(t.shape)}"
                )
            t = t.to(s.device, s.dtype)
            term = F.mse_loss(s, t) / t.float().pow(2).mean().clamp_min(1e-8)
            total = term if total is None else total + term
    return total


class _Distiller:
    """The teacher's side of the loss: runs the frozen teacher on a batch and scores the model's
    output and features against it. Use as a context manager: hooks and flags live only inside."""

    def __init__(self, model, teacher, kind, temperature, feature_layers, feature_weight) -> None:
        self.teacher, self.kind, self.temperature = teacher, kind, temperature
        self.feature_weight = feature_weight
        self.ours, self.theirs = {}, {}
        if feature_layers is not None:
            self.ours, self.theirs = _feature_modules(model, teacher, feature_layers)
        self.student_out: dict[str, list] = {n: [] for n in self.ours}
        self.teacher_out: dict[str, list] = {n: [] for n in self.theirs}
        self.device = model_device(teacher)
        self._stack = ExitStack()

    def __enter__(self) -> "_Distiller":
        grads = [(p, p.requires_grad) for p in self.teacher.parameters()]
        handles = self._hook(self.ours, self.student_out, detach=False)
        handles += self._hook(self.theirs, self.teacher_out, detach=True)

        def restore() -> None:
            for h in handles:
                h.remove()
            for p, flag in grads:
                p.requires_grad_(flag)

        self._stack.callback(restore)
        self._stack.enter_context(eval_mode(self.teacher))
        for p, _ in grads:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @staticmethod
    def _hook(modules: dict[str, nn.Module], store: dict[str, list], detach: bool) -> list:
        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                out = model_output(output)
                store[name].append(out.detach() if detach else out)

            return hook

        return [m.register_forward_hook(make_hook(name)) for name, m in modules.items()]

    def clear(self) -> None:
        """Forget the features of the previous step (call before the model's forward)."""
        for store in (self.student_out, self.teacher_out):
            for outs in store.values():
                outs.clear()

    def loss(self, output: Any, batch: Batch) -> Tensor:
        with torch.no_grad():
            args, kwargs = batch.args, batch.kwargs
            if self.device is not None:
                args, kwargs = _to(args, self.device), _to(kwargs, self.device)
            t_out = self.teacher(*args, **kwargs)
        total = None
        if self.kind is not None:
            student = model_output(output)
            teacher = model_output(t_out).to(student.device)
            total = _output_distill(self.kind, student, teacher, self.temperature,
                                    batch.kwargs.get("attention_mask"))
        if self.ours:
            feat = self.feature_weight * _feature_distill(self.student_out, self.teacher_out)
            total = feat if total is None else total + feat
        return total


def _feature_modules(model: nn.Module, teacher: nn.Module, names: Sequence[str]):
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"feature_layers must be a list of module names, got {names!r}")
    ours, theirs = dict(model.named_modules()), dict(teacher.named_modules())
    missing = [n for n in names if n not in ours]
    if missing:
        raise ValueError(f"feature_layers not in the model: {missing}")
    missing = [n for n in names if n not in theirs]
    if missing:
        raise ValueError(f"feature_layers not in the teacher: {missing}")
    return {n: ours[n] for n in names}, {n: theirs[n] for n in names}


def finetune(
    model: nn.Module,
    data: Iterable,
    *,
    epochs: int = 1,
    max_steps: Optional[int] = None,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    loss_fn: Optional[LossFn] = None,
    teacher: Optional[nn.Module] = None,
    distill_output: Optional[str] = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    feature_layers: Optional[Sequence[str]] = None,
    feature_weight: float = 1.0,
    regrow: Optional[RigL] = None,
    progress: Optional[bool] = None,
    seed: Optional[int] = None,
) -> FinetuneResult:
    """Fine-tune every trainable parameter of a pruned ``model`` in place, masks fixed.

    Args:
        model: the pruned model (sparsenet or torch.nn.utils.prune masks); trained in train
            mode, then each module's training flag is put back.
        data: a re-iterable of batches in the calibration protocol (tensors, ``(inputs,
            targets)`` pairs, dicts of keyword arguments with an optional ``"labels"``).
        epochs: passes over ``data``. max_steps: stop after this many steps in all.
        lr, weight_decay: AdamW's (decoupled decay; ``0`` is plain Adam).
        loss_fn: ``loss_fn(output, batch) -> scalar`` with the batch as given; default
            cross-entropy against the batch's targets.
        teacher: the dense model (a copy taken before pruning), run frozen in eval mode; its
            flags and ``requires_grad`` are restored afterwards.
        distill_output: ``"kl"`` (softened logits, scaled by ``temperature**2``), ``"mse"`` or
            ``"cosine"`` between the model's and the teacher's outputs (padding positions of an
            ``attention_mask`` left out). Defaults to ``"kl"`` with a teacher and no
            ``feature_layers``.
        alpha: the loss is ``(1 - alpha) * task + alpha * distill``; 1 when a batch has no
            targets and there is no ``loss_fn``.
        feature_layers: names of modules in both models whose outputs are matched by MSE,
            normalised by the teacher feature's mean square; ``feature_weight`` scales that sum
            inside ``distill``.
        regrow: a :class:`~sparsenet.reconstruction.regrowth.RigL` to move kept weights while
            training (sparsenet masks only); its ``end`` defaults to the run's step count.
        progress: a tqdm bar over steps; ``None`` shows it only on a terminal.
        seed: seed torch's RNG for the run (dropout, a shuffling DataLoader) in a forked RNG
            state, so the caller's global RNG is untouched.

    A non-finite loss stops training with a ValueError naming the step, before that step's
    update. Returns a :class:`FinetuneResult`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_calib(data)
    epochs = integer(epochs, "epochs", 1)
    max_steps = integer(max_steps, "max_steps", 1, allow_none=True)
    lr = real(lr, "lr", 0.0, low_open=True)
    weight_decay = real(weight_decay, "weight_decay", 0.0)
    temperature = real(temperature, "temperature", 0.0, low_open=True)
    alpha = real(alpha, "alpha", 0.0, 1.0)
    feature_weight = real(feature_weight, "feature_weight", 0.0)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(output, batch), got {loss_fn!r}")
    if regrow is not None and not isinstance(regrow, RigL):
        raise TypeError(f"regrow must be a RigL(...), got {regrow!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if distill_output is not None and distill_output not in DISTILL_OUTPUTS:
        raise ValueError(f"distill_output must be one of {DISTILL_OUTPUTS} or None, got {distill_output!r}")

    if teacher is None:
        if distill_output is not None or feature_layers is not None:
            raise ValueError("distill_output and feature_layers need a teacher (the dense model)")
        distiller = None
    else:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise ValueError("teacher is the model itself; pass a dense copy taken before pruning")
        ours = {id(p) for p in model.parameters()}
        if any(id(p) in ours for p in teacher.parameters()):
            raise ValueError(
                "teacher shares parameters with the model; pass copy.deepcopy(model) taken before pruning"
            )
        if distill_output is None and not feature_layers:
            distill_output = "kl"
        distiller = _Distiller(model, teacher, distill_output, temperature, feature_layers, feature_weight)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (every requires_grad is False)")

    total = max_steps
    if hasattr(data, "__len__"):
        total = epochs * len(data) if max_steps is None else min(max_steps, epochs * len(data))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    updater = regrow.attach(model, optimizer, total) if regrow is not None else None

    def step_loss(batch: Batch, step: int) -> Tensor:
        """This step's loss: task and distillation combined by ``alpha``."""
        if distiller is not None:
            distiller.clear()
        output = model(*batch.args, **batch.kwargs)
        task = None
        if loss_fn is not None:
            task = loss_fn(output, batch.raw)
            if not isinstance(task, Tensor) or task.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {task!r:.80}")
            task = task.reshape(())
        elif batch.targets is not None:
            task = default_loss(output, batch)
        elif distiller is None:
            raise ValueError(
                f"batch at step {step} has no targets and there is neither a loss_fn nor a "
                "teacher to learn from; pass (inputs, targets) batches, loss_fn=... or teacher=..."
            )
        if distiller is None:
            return task
        distill = distiller.loss(output, batch)
        return distill if task is None else (1.0 - alpha) * task + alpha * distill

    device = model_device(model)
    cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
    epoch_losses: list[float] = []
    step = 0
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda, enabled=seed is not None))
        if seed is not None:
            torch.manual_seed(seed)
        stack.enter_context(eval_mode(model))  # puts each module's training flag back afterwards
        if distiller is not None:
            stack.enter_context(distiller)
        model.train()
        bar = stack.enter_context(
            tqdm(total=total, desc="fine-tuning", unit="step", leave=False,
                 disable=bar_disabled(progress))
        )
        for epoch in range(epochs):
            losses: list[float] = []
            for batch in iter_batches(data, device):
                if max_steps is not None and step >= max_steps:
                    break
                step += 1
                with updater.watch(step) if updater is not None else nullcontext():
                    loss = step_loss(batch, step)
                    if not torch.isfinite(loss.detach()).all():
                        raise ValueError(
                            f"loss is {loss.item()} at step {step} (epoch {epoch}); training stopped "
                            "before that step's update (try a lower lr, or check the data)"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                if updater is not None and updater.is_update(step):
                    updater.update(step)
                else:
                    optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            if losses:
                epoch_losses.append(sum(losses) / len(losses))
            if max_steps is not None and step >= max_steps:
                break
        optimizer.zero_grad(set_to_none=True)
    return FinetuneResult(epoch_losses, step, list(updater.history) if updater is not None else [])
