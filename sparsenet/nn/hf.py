"""Keep Hugging Face's ``save_pretrained`` from writing a sparsified model it cannot read back.

``save_pretrained`` writes a SparseLinear's packed CSR tensors (``crow_indices``, ``col_indices``,
``values``) and ``from_pretrained`` builds the plain model class, whose Linear layers expect a dense
``weight``: it reports the CSR tensors as unexpected keys in a log line and keeps the random
initialisation of every sparse layer. Teaching ``from_pretrained`` to rebuild sparse layers would mean
replacing how transformers builds models, so ``save_pretrained`` refuses instead, and its error names
the path that works: ``sparsenet.save`` / ``sparsenet.load``.

Mechanism, and why: an instance attribute ``save_pretrained`` (a :class:`_SavePretrainedGuard`) shadows
the class's method on each guarded model object only, so

* the class, other instances and un-sparsified models are unaffected, and transformers is never
  imported (a model is recognised by its callable ``save_pretrained`` and its ``config``);
* everything that goes through the attribute is covered: ``push_to_hub`` and ``Trainer`` call
  ``self.save_pretrained`` too;
* the check runs at call time, so a guarded model that no longer holds SparseLinear layers (after
  ``sparsenet.densify(model, inplace=True)``, or a densified deep copy) saves as usual;
* it travels with the object: ``model.to(...)`` / ``.half()`` return the same object, and
  ``copy.deepcopy`` and pickling (``torch.save(model)``) re-point the guard at the copy.

The guard holds its model through a weak reference: a strong one would make every guarded model a
reference cycle, freed only by the cyclic garbage collector rather than when the last name goes.
"""
from __future__ import annotations

import weakref

from torch import nn

from sparsenet.nn.linear import SparseLinear


def _looks_like_pretrained_model(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (or anything shaped like one), recognised without importing
    transformers. The method is looked up on the class: a guarded instance's own attribute is ours."""
    return callable(getattr(type(module), "save_pretrained", None)) and hasattr(module, "config")


def _sparse_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SparseLinear)]


def _refusal(model: nn.Module, sparse: list[str]) -> str:
    cls = type(model).__name__
    shown = ", ".join(sparse[:3]) + (f" and {len(sparse) - 3} more" if len(sparse) > 3 else "")
    return (
        f"{cls}.save_pretrained cannot save this model: it holds {len(sparse)} SparseLinear layer(s) "
        f"({shown}), which {cls}.from_pretrained would not read back (it would leave them randomly "
        f"initialised and only log the unexpected keys). Save it with sparsenet.save(model, "
        f"'model.safetensors') (and model.config.save_pretrained(folder) for the config), and load it "
        f"with sparsenet.load('model.safetensors', {cls}(config)) or sparsenet.load("
        f"'model.safetensors', {cls}.from_pretrained(dense_folder)); or save_pretrained a dense copy, "
        f"sparsenet.densify(model)."
    )


class _SavePretrainedGuard:
    """Stands in for ``model.save_pretrained``: refuses while the model holds SparseLinear layers,
    calls the class's own ``save_pretrained`` otherwise."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    def __call__(self, *args, **kwargs):
        model = self._model()
        if model is None:
            raise ReferenceError("the model this save_pretrained belonged to no longer exists")
        sparse = _sparse_layer_names(model)
        if sparse:
            raise ValueError(_refusal(model, sparse))
        return type(model).save_pretrained(model, *args, **kwargs)

    def __deepcopy__(self, memo):
        # deepcopy registers the model's copy in memo before copying its attributes (this guard
        # among them): the copy's guard watches the copy. A weakref would otherwise be copied as is.
        model = self._model()
        return type(self)(memo.get(id(model), model))

    def __reduce__(self):
        # Pickled with its model (pickle memoises the model before its attributes, so the model's
        # own guard refers back to it), unpickled as a guard on the unpickled model.
        return type(self), (self._model(),)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``save_pretrained`` refuse, with an error naming ``sparsenet.save``, on every Hugging Face
    model in ``model`` (itself, or one nested in it, such as ``BertForSequenceClassification.bert``)
    that holds SparseLinear layers. Other models and modules are left alone. Returns ``model``.

    Safe to call more than once and on any module; see the module docstring for the mechanism.
    """
    for module in model.modules():
        if _looks_like_pretrained_model(module) and _sparse_layer_names(module):
            if not isinstance(vars(module).get("save_pretrained"), _SavePretrainedGuard):
                module.save_pretrained = _SavePretrainedGuard(module)
    return model


__all__ = ["guard_save_pretrained"]
