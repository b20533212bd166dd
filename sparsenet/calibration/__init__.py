"""Feed models calibration data and watch them: one data protocol, forward-hook statistics.

``calib`` is any re-iterable (a list, a DataLoader) whose batches are tensors, ``(inputs,
targets)`` pairs, or dicts of keyword arguments (as a Hugging Face tokenizer returns). Pruning
criteria and reconstruction read calibration data only through this package.
"""

from .capture import capture_input_sq_norms, capture_output_abs_means, check_rows_seen, eval_mode
from .data import Batch, check_calib, iter_batches, split_batch
from .gram import Gram, capture_grams
from .outputs import model_output

__all__ = [
    "Batch",
    "Gram",
    "capture_grams",
    "model_output",
    "capture_input_sq_norms",
    "capture_output_abs_means",
    "check_calib",
    "check_rows_seen",
    "eval_mode",
    "iter_batches",
    "split_batch",
]
