"""A Hugging Face BERT built from a config (no download): dict batches, padding, N:M + Wanda."""

import pytest
import torch

from sparsenet.calibration import capture_input_sq_norms
from sparsenet.pruning import find_prunable_layers, prune

transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16,
    )
    return transformers.BertModel(cfg)


def test_bert_wanda_2_4_ignores_padding_tokens():
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (2, 8))
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    other = ids.clone()
    other[mask == 0] = torch.randint(1, 50, (int((mask == 0).sum()),))
    a, b = tiny_bert(), tiny_bert()
    layers = find_prunable_layers(a)
    na = capture_input_sq_norms(a, layers, [{"input_ids": ids, "attention_mask": mask}])
    calib_b = [{"input_ids": other, "attention_mask": mask}]
    nb = capture_input_sq_norms(b, find_prunable_layers(b), calib_b)
    for name in na:
        torch.testing.assert_close(na[name], nb[name])

    pruner = prune(a, structure="2:4", criterion="wanda", progress=False,
                   calib=[{"input_ids": ids, "attention_mask": mask}])
    for name, m in pruner.masks.items():
        assert (m.reshape(-1, 4).sum(1) == 2).all(), name
    a(input_ids=ids, attention_mask=mask)  # still runs masked
