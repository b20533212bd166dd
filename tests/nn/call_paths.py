"""Every way a SparseLinear's weight reaches a kernel, so behaviour can be pinned on all of them:
the eager fast path (a prepared handle), autograd, the checked ``sparsenet.ops.csr_linear`` entry,
the registered op through the dispatcher, and a ``torch.compile``d module; and the check that a sparse
layer's op survives ``torch.compile`` and ``torch.export``."""
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


def assert_compiled_and_exported_keep(module, x, op: str) -> None:
    """``torch.compile(fullgraph=True)`` and ``torch.export`` of ``module`` give its eager result on
    ``x``, and the exported graph calls ``torch.ops.sparsenet.<op>`` (no dense fallback)."""
    module.eval()
    torch._dynamo.reset()  # a sparse layer's forward has one limit of compiled variants per process
    try:
        with torch.no_grad():
            want = module(x)
            got = torch.compile(module, backend="eager", fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    program = torch.export.export(module, (x,))
    assert f"sparsenet.{op}" in str(program.graph)
    torch.testing.assert_close(program.module()(x), want)


def assert_gradients_match_dense(sparse, dense, x):
    """The same input and bias gradients through ``sparse`` as through its dense twin ``dense``, for
    the loss sum(layer(x)^2)."""
    x = x.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    sparse(x).square().sum().backward()
    dense(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)
