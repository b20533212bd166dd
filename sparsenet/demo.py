"""The ``sparsenet demo`` job, as functions that return plain dicts (``cli.py`` prints them).

1. ``run_digits``: train a small MLP on scikit-learn's digits, prune it, fine-tune with the masks in
   place, convert it with ``sparsify``, and compare accuracy, non-zeros and bytes on disk.
2. ``run_bench``: prune a deployment-sized MLP (weights far larger than the last-level cache) and time
   dense torch, sparsenet and torch.sparse CSR on the same pruned weights.
"""
from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsenet._progress import bar_disabled
from sparsenet.io import load, save
from sparsenet.nn import SparseLinear, sparsify
from sparsenet.pruning import prune

DIGITS_SIZES = (64, 256, 256, 10)
IMPLS = ("dense", "sparsenet", "torch.sparse")


def make_mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers ``fc1 .. fcN`` with ReLU between them (named, so reports read well)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    n = len(sizes) - 1
    for i in range(n):
        layers[f"fc{i + 1}"] = nn.Linear(sizes[i], sizes[i + 1])
        if i < n - 1:
            layers[f"relu{i + 1}"] = nn.ReLU()
    return nn.Sequential(layers)


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits standardised with the training set's statistics; the split is fixed (not seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = X_tr.mean(0), X_tr.std(0)
    std[std == 0] = 1.0  # border pixels are always 0 in the training set
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(X_tr), torch.tensor(y_tr), as_x(X_te), torch.tensor(y_te)


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
          desc: str = "training", progress: Optional[bool] = None, batch_size: int = 64) -> float:
    """Adam on cross-entropy; returns the last batch's loss. A fresh optimizer each call, so after
    ``prune`` it only ever sees zero gradients at the masked weights."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=bar_disabled(progress)):
        for idx in torch.randperm(len(X), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            batch_loss = F.cross_entropy(model(X[idx]), y[idx])
            batch_loss.backward()
            opt.step()
            loss = batch_loss.detach()
    model.eval()
    return loss.item()


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return (model(X).argmax(1) == y).float().mean().item()


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / scale if scale else (out - ref).abs().max().item()


def _nonzeros(model: nn.Module) -> int:
    """Stored non-zero parameters: a SparseLinear's kept weights plus the non-zeros elsewhere."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            total += p.numel() if (isinstance(module, SparseLinear) and name == "values") \
                else int(torch.count_nonzero(p))
    return total


def _sparse_skeleton(sizes: Sequence[int], converted: Sequence[str]) -> nn.Sequential:
    """What a user rebuilds before ``load``: the architecture with the converted layers as empty
    SparseLinear (load resizes them to the file's non-zeros)."""
    model = make_mlp(sizes)
    for name in converted:
        dense = getattr(model, name)
        setattr(model, name, SparseLinear(dense.in_features, dense.out_features, bias=dense.bias is not None))
    return model


def run_digits(sparsity: float = 0.9, seed: int = 0, epochs: int = 20, finetune_epochs: int = 5,
               lr: float = 1e-3, progress: Optional[bool] = None) -> dict:
    """Train, prune, fine-tune, sparsify, save and reload the digits MLP; every number in a dict."""
    X_tr, y_tr, X_te, y_te = load_digits_split()
    torch.manual_seed(seed)
    model = make_mlp(DIGITS_SIZES)
    t0 = time.perf_counter()
    train(model, X_tr, y_tr, epochs, lr, seed, "training", progress)
    train_s = time.perf_counter() - t0
    dense_acc = accuracy(model, X_te, y_te)
    dense_params = sum(p.numel() for p in model.parameters())

    # Global scope lets the 64-wide first layer keep more of its few weights; the 10-way head is
    # tiny and decides every prediction, so it stays dense (measured: best accuracy of the options).
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    pruner = prune(model, sparsity, criterion="magnitude", scope="global", exclude=[head], progress=False)
    pruned_acc = accuracy(model, X_te, y_te)
    t0 = time.perf_counter()
    train(model, X_tr, y_tr, finetune_epochs, lr, seed + 1, "fine-tune", progress)
    finetune_s = time.perf_counter() - t0
    finetuned_acc = accuracy(model, X_te, y_te)
    prune_report = pruner.report()
    pruner.finalize()

    # CSR throughout (not the timed automatic choice): the demo shows what the CSR kernels do.
    model_sparse, sparsify_report = sparsify(model, min_sparsity=0.5, format="csr")
    sparse_acc = accuracy(model_sparse, X_te, y_te)
    with torch.inference_mode():
        logits_err = _max_rel_err(model_sparse(X_te), model(X_te))

    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits.safetensors")
        save(model_sparse, path)
        file_bytes = os.path.getsize(path)
        reloaded = load(path, _sparse_skeleton(DIGITS_SIZES, [r.name for r in sparsify_report.converted]))
    reloaded_acc = accuracy(reloaded, X_te, y_te)

    return {
        "sizes": list(DIGITS_SIZES),
        "sparsity": sparsity,
        "seed": seed,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "train_seconds": train_s,
        "finetune_seconds": finetune_s,
        "excluded": [head],
        "dense_acc": dense_acc,
        "pruned_acc": pruned_acc,          # right after pruning, before the fine-tune
        "finetuned_acc": finetuned_acc,    # masked model after the fine-tune
        "sparse_acc": sparse_acc,          # the sparsified model (native kernels)
        "reloaded_acc": reloaded_acc,      # the same after save -> load
        "logits_max_rel_err": logits_err,  # sparse vs finalized dense logits
        "achieved_sparsity": prune_report.total_sparsity,
        "prune_report": prune_report,
        "sparsify_report": sparsify_report,
        "dense_params": dense_params,
        "sparse_nonzeros": _nonzeros(model_sparse),
        "dense_bytes": dense_bytes,
        "file_bytes": file_bytes,
        "bytes_ratio": file_bytes / dense_bytes,
    }


class TorchCSRLinear(nn.Module):
    """A pruned Linear run by torch's own CSR kernels: y = (W_csr @ x.T).T + b.

    Of the forms torch offers, ``addmm(b, W_csr, x.T)`` with int32 indices measured fastest here
    (``x @ W.T_csr`` is ~100x slower), so the comparison is against torch at its best.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            w = linear.weight.detach().to_sparse_csr()
            self.weight = torch.sparse_csr_tensor(w.crow_indices().to(torch.int32), w.col_indices().to(torch.int32),
                                                  w.values(), w.shape)
        self.bias = linear.bias.detach()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, self.weight, x.T).T

    def nbytes(self) -> int:
        w = self.weight
        return sum(t.numel() * t.element_size() for t in (w.crow_indices(), w.col_indices(), w.values(), self.bias))


def _to_torch_csr(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        (name, TorchCSRLinear(m) if isinstance(m, nn.Linear) else copy.deepcopy(m)) for name, m in model.named_children()))


def _weight_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, TorchCSRLinear):
            total += m.nbytes()
        elif isinstance(m, (nn.Linear, SparseLinear)):
            total += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return total


def run_bench(sparsity: float = 0.9, hidden: int = 4096, layers: int = 3, batches: Sequence[int] = (1, 64),
              rounds: int = 20, seed: int = 0, progress: Optional[bool] = None) -> dict:
    """Median seconds per forward of the same pruned MLP run three ways, rounds interleaved."""
    torch.manual_seed(seed)
    sizes = (hidden,) * (layers + 1)
    with tqdm(total=3, desc="prune + convert", unit="step", leave=False, disable=bar_disabled(progress)) as bar:
        dense = make_mlp(sizes).eval()
        # Layer scope: every layer of this random-init model has the same distribution, so global
        # would give the same masks, only slower (one k-th value over all weights at once).
        pruner = prune(dense, sparsity, criterion="magnitude", scope="layer", progress=False)
        pruner.finalize()
        bar.update()
        sparse, report = sparsify(dense, min_sparsity=0.5, format="csr")
        bar.update()
        models = {"dense": dense, "sparsenet": sparse, "torch.sparse": _to_torch_csr(dense)}
        bar.update()
    weight_bytes = {k: _weight_bytes(m) for k, m in models.items()}

    rows, errors = [], {}
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, hidden, generator=gen)
            ref = models["dense"](x)
            for name in IMPLS[1:]:  # the first call also warms each path up
                errors[(name, batch)] = _max_rel_err(models[name](x), ref)
            times: dict[str, list[float]] = {k: [] for k in IMPLS}
            # Interleave: noise from other work on a shared machine hits all three alike.
            for _ in tqdm(range(rounds), desc=f"timing batch {batch}", unit="round", leave=False,
                          disable=bar_disabled(progress)):
                for name in IMPLS:
                    t0 = time.perf_counter()
                    models[name](x)
                    times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["dense"])
            for name in IMPLS:
                med = statistics.median(times[name])
                rows.append({"batch": batch, "impl": name, "median_s": med, "speedup": base / med,
                             "max_rel_err": errors.get((name, batch), 0.0)})
    return {
        "sparsity": sparsity,
        "hidden": hidden,
        "layers": layers,
        "batches": list(batches),
        "rounds": rounds,
        "achieved_sparsity": pruner.report().total_sparsity,
        "sparsify_report": report,
        "weight_bytes": weight_bytes,
        # At small batch a layer is memory-bound: the speedup if both read at the same bandwidth
        # (dense torch often reads below it, so the measured speedup can exceed this).
        "byte_ratio": weight_bytes["dense"] / weight_bytes["sparsenet"],
        "rows": rows,
        "max_rel_err": max(errors.values()) if errors else 0.0,
    }
