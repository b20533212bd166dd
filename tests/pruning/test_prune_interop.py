"""Masks to and from torch.nn.utils.prune, and the mask store's format version in state_dict."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as tp

from sparsenet.pruning import (
    MASK_FORMAT_VERSION,
    export_to_torch_pruning,
    find_weight_mask,
    import_torch_pruning,
    prune,
)


def torch_pruned(model):
    """Prune every Linear/Conv2d weight with torch: 40% L1 unstructured."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            tp.l1_unstructured(m, "weight", amount=0.4)
    return model


def test_import_keeps_weights_masks_and_output(convnet):
    torch_pruned(convnet)
    x = torch.randn(2, 3, 8, 8)
    before_out = convnet(x)
    pruned = [(n, m) for n, m in convnet.named_modules() if hasattr(m, "weight_mask")]
    before = {n: m.weight_mask.bool().clone() for n, m in pruned}
    origs = {n: m.weight_orig for n, m in pruned}
    masks = import_torch_pruning(convnet)
    assert masks.keys() == before.keys()
    assert not tp.is_pruned(convnet)
    for n, m in convnet.named_modules():
        if n in masks:
            assert torch.equal(masks[n], before[n]) and masks[n].dtype == torch.bool
            assert find_weight_mask(m).mask is masks[n]
            assert m.parametrizations.weight.original is origs[n]  # same Parameter object
            assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
            assert not m._forward_pre_hooks
    assert torch.equal(convnet(x), before_out)
    # prune() now continues from the imported masks: new masks are subsets of the old.
    pruner = prune(convnet, 0.6, progress=False)
    for n, mask in pruner.masks.items():
        assert not (mask & ~before[n]).any()
        assert mask.sum() == mask.numel() - round(0.6 * mask.numel())


def test_prune_on_torch_pruned_points_to_import(mlp):
    tp.random_unstructured(mlp[0], "weight", amount=0.5)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match="import_torch_pruning"):
        prune(mlp, 0.5, progress=False)
    assert tp.is_pruned(mlp) and not parametrize.is_parametrized(mlp[2])
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in state.items())


def test_export_matches_torch_layout_and_round_trips(convnet):
    pruner = prune(convnet, 0.5, progress=False)
    x = torch.randn(2, 3, 8, 8)
    out = convnet(x)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    exported = export_to_torch_pruning(convnet)
    assert tp.is_pruned(convnet)
    assert not any(parametrize.is_parametrized(m) for m in convnet.modules())
    assert exported.keys() == masks.keys()
    for n in masks:
        assert torch.equal(exported[n].bool(), masks[n])
    assert torch.equal(convnet(x), out)
    # The same keys torch.nn.utils.prune produces on an unpruned copy.
    reference = torch_pruned(type(convnet)())
    assert set(convnet.state_dict()) == set(reference.state_dict())
    # And back again: identical masks and output.
    back = import_torch_pruning(convnet)
    for n in masks:
        assert torch.equal(back[n], masks[n])
    assert torch.equal(convnet(x), out)
    # torch's API takes over after an export: prune.remove bakes the zeros.
    export_to_torch_pruning(convnet)
    for n, m in convnet.named_modules():
        if n in masks:
            tp.remove(m, "weight")
            assert isinstance(m.weight, nn.Parameter) and (m.weight[~masks[n]] == 0).all()
    assert torch.equal(convnet(x), out)


def test_model_mixing_both(mlp):
    prune(mlp, 0.5, exclude=["4"], progress=False)  # sparsenet masks on 0 and 2
    tp.l1_unstructured(mlp[4], "weight", amount=0.3)  # torch on 4
    x = torch.randn(3, 12)
    out = mlp(x)
    exported = export_to_torch_pruning(mlp)
    assert set(exported) == {"0", "2"}  # torch's own layer left as it was
    assert all(tp.is_pruned(mlp[i]) for i in (0, 2, 4))
    assert torch.equal(mlp(x), out)
    imported = import_torch_pruning(mlp)
    assert set(imported) == {"0", "2", "4"}
    assert not tp.is_pruned(mlp)
    assert torch.equal(mlp(x), out)


def test_bias_pruning_left_to_torch(mlp):
    tp.l1_unstructured(mlp[0], "weight", amount=0.5)
    tp.l1_unstructured(mlp[0], "bias", amount=0.5)
    x = torch.randn(3, 12)
    out = mlp(x)
    assert set(import_torch_pruning(mlp)) == {"0"}
    assert hasattr(mlp[0], "bias_orig") and tp.is_pruned(mlp[0])
    assert torch.equal(mlp(x), out)


def test_import_refuses_non_binary_mask_and_changes_nothing(mlp):
    tp.l1_unstructured(mlp[0], "weight", amount=0.5)
    tp.l1_unstructured(mlp[2], "weight", amount=0.5)
    mlp[2].weight_mask.mul_(0.5)
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match="other than 0 and 1"):
        import_torch_pruning(mlp)
    assert tp.is_pruned(mlp[0]) and not parametrize.is_parametrized(mlp[0])
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in state.items())


def test_export_refuses_foreign_parametrization_and_changes_nothing(mlp):
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    prune(mlp, 0.5, progress=False)
    parametrize.register_parametrization(mlp[2], "weight", Double())
    with pytest.raises(ValueError, match="other parametrizations"):
        export_to_torch_pruning(mlp)
    assert not tp.is_pruned(mlp)
    assert all(find_weight_mask(mlp[i]) is not None for i in (0, 2, 4))


def test_bad_inputs(mlp, untouched):
    check = untouched(mlp)
    with pytest.raises(ValueError, match="no sparsenet masks"):
        export_to_torch_pruning(mlp)
    assert import_torch_pruning(mlp) == {}
    check()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        import_torch_pruning("model")


def _reload(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_mask_store_save_load_round_trip(mlp):
    pruner = prune(mlp, 0.7, progress=False)
    state = mlp.state_dict()
    assert state._metadata["0.parametrizations.weight.0"]["version"] == MASK_FORMAT_VERSION
    other = copy.deepcopy(mlp)
    for m in other.modules():
        if find_weight_mask(m) is not None:
            find_weight_mask(m).mask.fill_(True)
    other.load_state_dict(_reload(state))
    for n, mask in pruner.masks.items():
        assert torch.equal(find_weight_mask(other[int(n)]).mask, mask)


def test_mask_store_refuses_newer_version(mlp):
    prune(mlp, 0.5, progress=False)
    state = _reload(mlp.state_dict())
    state._metadata["2.parametrizations.weight.0"]["version"] = MASK_FORMAT_VERSION + 1
    mask_before = find_weight_mask(mlp[2]).mask.clone()
    state["2.parametrizations.weight.0.mask"] = ~state["2.parametrizations.weight.0.mask"]
    with pytest.raises(RuntimeError, match="format version 2, newer than this sparsenet reads"):
        mlp.load_state_dict(state)
    assert torch.equal(find_weight_mask(mlp[2]).mask, mask_before)


def test_state_dict_without_metadata_loads_as_current(mlp):
    pruner = prune(mlp, 0.5, progress=False)
    plain = dict(mlp.state_dict())  # no _metadata, as from safetensors
    other = copy.deepcopy(mlp)
    find_weight_mask(other[0]).mask.fill_(True)
    other.load_state_dict(plain)
    assert torch.equal(find_weight_mask(other[0]).mask, pruner.masks["0"])


def test_import_layer_pruned_twice_by_torch(mlp):
    # Iterative torch pruning stacks methods in a PruningContainer; its combined mask imports.
    tp.l1_unstructured(mlp[0], "weight", amount=0.3)
    tp.random_unstructured(mlp[0], "weight", amount=0.3)
    mask = mlp[0].weight_mask.bool().clone()
    x = torch.randn(3, 12)
    out = mlp(x)
    assert torch.equal(import_torch_pruning(mlp)["0"], mask)
    assert not tp.is_pruned(mlp) and torch.equal(mlp(x), out)
