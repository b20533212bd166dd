"""What a model's output "is" when it must be compared, matched or passed on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def model_output(output: Any) -> Tensor:
    """The tensor an output stands for: itself, ``.logits``, ``.last_hidden_state`` (attribute
    or key), or the
    first element of a tuple / list / Hugging Face ``ModelOutput`` (what blocks pass on)."""
    if isinstance(output, Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = output.get(attr) if isinstance(output, Mapping) else getattr(output, attr, None)
        if isinstance(value, Tensor):
            return value
    to_tuple = getattr(output, "to_tuple", None)
    if callable(to_tuple):
        output = to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find the output tensor in a {type(output).__name__}: expected a tensor, an "
        "object with .logits or .last_hidden_state, or a tuple starting with a tensor"
    )
