"""The dependency graph: which parameters shrink together, found by tracing, and what it refuses."""
import copy

import pytest
import torch
from torch import nn

from sparsenet.structure import build_graph
from sparsenet.structure.removal import remove_channels

from models import MLP, ConvFlatten, DenseBlock, Depthwise, Grouped, Residual, Split, inputs


def groups_by_producer(model):
    graph = build_graph(model.eval(), (inputs(model),))
    return {tuple(sorted(g.producers)): g for g in graph.groups}


def members(group):
    return {(m.name, m.dim, m.offset, m.first, m.length, m.repeat) for m in group.members}


def test_linear_chain_producer_rows_and_consumer_columns():
    groups = groups_by_producer(MLP())
    fc1 = groups[("fc1",)]
    assert not fc1.unsafe and fc1.size == 24
    assert {(n, d) for n, d, *_ in members(fc1)} == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}
    assert groups[("fc3",)].unsafe == ["its channels reach the model's output"]


def test_batchnorm_and_flatten_into_a_linear():
    group = groups_by_producer(ConvFlatten())[("conv",)]
    assert not group.unsafe
    got = members(group)
    for name in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert (name, 0, 0, 0, 8, 1) in got
    assert ("fc.weight", 1, 0, 0, 8, 16) in got  # channel c owns inputs [16c, 16c + 16) of the Linear


def test_residual_adds_merge_every_member_of_the_stream():
    groups = groups_by_producer(Residual())
    stream = groups[("a2", "b2", "stem")]
    assert not stream.unsafe and stream.size == 8
    names = {n for n, *_ in members(stream)}
    assert {"stem.weight", "a2.weight", "b2.weight", "a1.weight", "b1.weight", "head.weight"} <= names
    assert not groups[("a1",)].unsafe and not groups[("b1",)].unsafe


def test_concat_gives_each_input_its_offset():
    groups = groups_by_producer(DenseBlock())
    stem, c1, c2 = groups[("stem",)], groups[("c1",)], groups[("c2",)]
    assert not (stem.unsafe or c1.unsafe or c2.unsafe)
    assert ("c2.weight", 1, 0, 0, 6, 1) in members(stem) and ("c2.weight", 1, 6, 0, 4, 1) in members(c1)
    assert ("bn.weight", 0, 6, 0, 4, 1) in members(c1) and ("bn.weight", 0, 10, 0, 5, 1) in members(c2)
    assert ("head.weight", 1, 10, 0, 5, 1) in members(c2)


def test_depthwise_filters_belong_to_their_input_channels():
    groups = groups_by_producer(Depthwise())
    expand = groups[("expand",)]
    names = {(n, d) for n, d, *_ in members(expand)}
    assert not expand.unsafe and {("dw.weight", 0), ("dw.bias", 0), ("bn2.weight", 0), ("project.weight", 1)} <= names


def test_grouped_convolution_is_refused():
    groups = groups_by_producer(Grouped())
    assert any("grouped convolution" in r for r in groups[("a",)].unsafe)


def test_chunk_halves_that_meet_fold_into_one_group():
    group = groups_by_producer(Split())[("fc1",)]
    # a * sigmoid(b) (GLU): channel i of a meets channel i of b, so fc1's rows i and 8 + i go together.
    assert not group.unsafe and group.size == 8
    assert {("fc1.weight", 0, 0, 0, 8, 1), ("fc1.weight", 0, 8, 0, 8, 1), ("fc2.weight", 1, 0, 0, 8, 1)} <= members(group)


def test_unknown_op_and_heads_are_refused_with_the_reason():
    class TopK(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(torch.topk(self.fc1(x), 3, dim=-1).values)

    group = groups_by_producer_of(TopK(), torch.randn(2, 4))[("fc1",)]
    assert any("topk" in r for r in group.unsafe)

    class TokensIntoChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.out = nn.Linear(8, 8), nn.Linear(6, 2)

        def forward(self, x):  # (b, 3 tokens, 8) viewed as (b, 4, 6): channels cut across tokens
            return self.out(self.q(x).view(x.shape[0], 4, 6))

    group = groups_by_producer_of(TokensIntoChannels(), torch.randn(2, 3, 8))[("q",)]
    assert any("view" in r for r in group.unsafe)


def test_channels_viewed_in_several_dims_and_moved_are_followed_exactly():
    class ThreeWaySplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.q(x).view(x.shape[0], x.shape[1], 2, 2, 2).transpose(2, 4)
            return self.out(h.reshape(x.shape[0], x.shape[1], 8))

    torch.manual_seed(0)
    model, x = ThreeWaySplit().eval(), torch.randn(2, 3, 8)
    graph = build_graph(model, (x,))
    group = next(g for g in graph.groups if g.producers == ["q"])
    # Channel 4a + 2b + c lands at input 4c + 2b + a of out: units of 4 channels (a), whose
    # columns in out are every other one.
    assert not group.unsafe and group.size == 2
    assert {("out.weight", 1, o, 0, 2, 1) for o in (0, 2, 4, 6)} <= members(group)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.q.weight[4:] = 0
        reference.q.bias[4:] = 0
    remove_channels(model, graph, {group.id: torch.tensor([1])}, check=lambda: None)
    assert model.q.out_features == 4 and model.out.in_features == 4
    # (the model's forward hard-codes the view; the same computation with one unit left)
    shrunk = model.out(model.q(x).view(2, 3, 1, 2, 2).transpose(2, 4).reshape(2, 3, 4))
    torch.testing.assert_close(shrunk, reference(x))


def test_channels_viewed_as_heads_are_removed_in_whole_heads():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
            h = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(h.transpose(1, 2).reshape(b, t, 8))

    group = groups_by_producer_of(Heads(), torch.randn(2, 3, 8))[("k", "q", "v")]
    assert not group.unsafe and group.size == 2  # two heads of four channels
    assert ("q.weight", 0, 0, 0, 2, 4) in members(group) and ("out.weight", 1, 0, 0, 2, 4) in members(group)


def groups_by_producer_of(model, x):
    return {tuple(sorted(g.producers)): g for g in build_graph(model.eval(), (x,)).groups}


def test_tied_parameter_joins_its_groups():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mid, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.mid(self.embed(ids)))

    graph = build_graph(Tied().eval(), (torch.randint(0, 20, (2, 5)),))
    tied = [g for g in graph.groups if "embed" in g.producers]
    assert len(tied) == 1 and "mid" in tied[0].producers  # embed dims and head's inputs: one group


def test_untraceable_example_input_is_a_clear_error():
    with pytest.raises(ValueError, match="could not trace the model"):
        build_graph(MLP(), (torch.randn(2, 7),))


def test_attention_with_an_untracked_query_is_refused():
    class Cross(nn.Module):
        """Keys and values from layers, queries from a tensor the graph does not track."""

        def __init__(self):
            super().__init__()
            self.k, self.v, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, q):
            b, t, _ = x.shape
            k, v = (p(x).view(b, t, -1, 4).transpose(1, 2) for p in (self.k, self.v))
            h = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(h.transpose(1, 2).reshape(b, t, 8))

    graph = build_graph(Cross().eval(), (torch.randn(2, 3, 8), torch.randn(2, 2, 3, 4)))
    groups = {tuple(sorted(g.producers)): g for g in graph.groups}
    assert groups[("k",)].unsafe and groups[("v",)].unsafe
