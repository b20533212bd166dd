"""BatchNorm recalibration: exact population statistics, flags and momentum put back, errors."""

import pytest
import torch
from torch import nn

from sparsenet.reconstruction.batchnorm import recalibrate_batchnorm


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """Identity that remembers the training flag it ran with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        Recorder(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    )


def batches(sizes=(5, 7, 3), shift=2.0):
    # Unequal sizes: averaging per-batch means with equal weight would not give the data's mean.
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 6, 6, generator=gen) * 1.5 + shift for n in sizes]


def test_running_stats_equal_the_datas_per_channel_statistics():
    model = conv_bn_net()
    data = batches()
    assert recalibrate_batchnorm(model, data, progress=False) == 2

    with torch.no_grad():
        conv_out = torch.cat([model[0](x) for x in data]).double()  # the first BN's input
    per_channel = conv_out.transpose(0, 1).reshape(4, -1)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean.double(), per_channel.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), per_channel.var(1), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == len(data)
    # The statistics really changed from the defaults (the data is shifted away from 0).
    assert not torch.allclose(bn.running_mean, torch.zeros(4), atol=0.1)


def test_bn1d_on_sequences_pools_batch_and_length():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn)
    data = [torch.randn(4, 3, 5) + 1.0, torch.randn(2, 3, 5) - 0.5]
    recalibrate_batchnorm(model, data, progress=False)
    flat = torch.cat(data).transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(bn.running_mean.double(), flat.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), flat.var(1), rtol=1e-5, atol=1e-6)


def test_only_batchnorm_runs_in_train_mode_and_flags_come_back():
    model = conv_bn_net()
    model.train()
    model[7].eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    recalibrate_batchnorm(model, batches(), progress=False)
    assert model[3].seen == [False, False, False]  # non-BN modules ran in eval mode
    assert [m.training for m in model.modules()] == before
    assert model[1].momentum == 0.3 and model[7].momentum == 0.1
    assert not model[1]._forward_pre_hooks


def test_recalibrated_model_in_eval_normalises_its_data():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)).eval()
    data = batches()
    recalibrate_batchnorm(model, data, progress=False)
    with torch.no_grad():
        out = torch.cat([model(x) for x in data]).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(out.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(1), torch.ones(4), atol=1e-3, rtol=0)


def test_dict_and_pair_batches():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(x)

    model = Keyword()
    x = torch.randn(8, 2) + 3.0
    recalibrate_batchnorm(model, [{"x": x[:4], "labels": torch.zeros(4)}, ({"x": x[4:]}, None)],
                          progress=False)
    torch.testing.assert_close(model.bn.running_mean, x.mean(0))


def test_error_mid_pass_restores_stats_and_flags(untouched):
    model = conv_bn_net().train()
    check = untouched(model)
    bad = batches()[:2] + [torch.randn(2, 5, 6, 6)]  # wrong channel count: the conv raises
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, bad, progress=False)
    check()
    assert all(m.training for m in model.modules())
    assert model[1].momentum == 0.3
    assert not model[1]._forward_pre_hooks and not model[7]._forward_pre_hooks


def test_no_batchnorm_is_an_error():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), [torch.randn(3, 2)])
    untracked = nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(untracked, [torch.randn(3, 2)])


def test_unreached_batchnorm_is_an_error_and_changes_nothing():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Partial()
    with pytest.raises(ValueError, match="unused"):
        recalibrate_batchnorm(model, [torch.randn(4, 2) + 5], progress=False)
    assert torch.equal(model.used.running_mean, torch.zeros(2))


def test_bad_calib_is_rejected():
    model = conv_bn_net()
    with pytest.raises(TypeError, match="calib"):
        recalibrate_batchnorm(model, torch.randn(2, 3, 6, 6))
    with pytest.raises(TypeError, match="model"):
        recalibrate_batchnorm("model", batches())
