"""Every way a SparseLinear's weight reaches a kernel, so behaviour can be pinned on all of them:
the eager fast path (a prepared handle), autograd, the checked ``sparsenet.ops.csr_linear`` entry,
the registered op through the dispatcher, and a ``torch.compile``d module."""
import torch

import sparsenet


def _eager(layer, x):
    with torch.no_grad():
        return layer(x)


def _autograd(layer, x):
    return layer(x.detach().clone().requires_grad_()).detach()


def _ops(layer, x):
    return sparsenet.ops.csr_linear(x, layer.crow_indices, layer.col_indices, layer.values, layer.bias,
                                    layer.in_features)


def _dispatcher(layer, x):
    with torch.no_grad():
        return torch.ops.sparsenet.csr_linear(x, layer.crow_indices, layer.col_indices, layer.values, layer.bias,
                                              layer.in_features)


_compiled = {}


def _compile(layer, x):
    # backend="eager": dynamo traces the module (the op stays in the graph) without inductor's
    # minutes of code generation; one compiled wrapper per layer, reused like a user's would be.
    fn = _compiled.get(id(layer))
    if fn is None or fn[0] is not layer:
        fn = _compiled[id(layer)] = (layer, torch.compile(layer, backend="eager", fullgraph=True, dynamic=False))
    with torch.no_grad():
        return fn[1](x)


PATHS = {"eager": _eager, "autograd": _autograd, "ops": _ops, "dispatcher": _dispatcher, "compiled": _compile}
