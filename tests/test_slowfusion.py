"""Karpathy 2014 slow fusion CNN and its fusion variants."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from vtransfer.utils.errors import ConfigError
from vtransfer.models import registry
from vtransfer.models.base import check_groups_partition
from vtransfer.models.slowfusion import FULL_SLOW_FUSION_PARAMS, FUSIONS, PRESETS, SlowFusion

GROUPS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "head"]
TEMPORAL_GROUPS = {"slow": ["conv1", "conv2", "conv3"], "early": ["conv1"], "single": [], "late": ["fc6"]}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> SlowFusion:
    torch.manual_seed(0)
    return SlowFusion(**{**PRESETS["tiny"], **overrides})


def clip(model: SlowFusion, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, model.frames, model.input_size, model.input_size)


def test_full_slow_fusion_parameter_count():
    with torch.device("meta"):  # shapes only: no 250 MB of weights
        m = registry.build_backbone("slowfusion", "full")
    assert m.num_classes == 487
    expected = (
        (96 * 3 * 4 * 11 * 11 + 96)
        + (256 * 96 * 2 * 5 * 5 + 256)
        + (384 * 256 * 2 * 3 * 3 + 384)
        + (384 * 384 * 3 * 3 + 384)
        + (256 * 384 * 3 * 3 + 256)
        + (256 * 6 * 6 * 4096 + 4096)
        + (4096 * 4096 + 4096)
        + (4096 * 487 + 487)
    )
    assert sum(p.numel() for p in m.parameters()) == expected == FULL_SLOW_FUSION_PARAMS == 61_880_263
    assert m.fc6.in_features == 9216
    assert tuple(m.conv1.conv.weight.shape) == (96, 3, 4, 11, 11)
    assert m.conv1.conv.stride == (2, 3, 3)
    assert tuple(m.conv2.conv.weight.shape) == (256, 96, 2, 5, 5) and m.conv2.conv.stride == (2, 1, 1)
    assert tuple(m.conv3.conv.weight.shape) == (384, 256, 2, 3, 3) and m.conv3.conv.stride == (2, 1, 1)
    assert m.conv4.conv.kernel_size == (1, 3, 3) and m.conv5.conv.kernel_size == (1, 3, 3)


@pytest.mark.parametrize(
    "fusion, multires, fc6_in",
    [
        ("single", False, 9216),
        ("early", False, 9216),
        ("late", False, 2 * 9216),
        ("slow", True, 2 * 256 * 3 * 3),  # two 89x89 streams, 3x3 at conv5
    ],
)
def test_full_variant_fc6_widths(fusion, multires, fc6_in):
    with torch.device("meta"):
        m = SlowFusion(fusion=fusion, multires=multires)
    assert m.fc6.in_features == fc6_in
    assert m.input_size == (178 if multires else 170)
    assert m.preprocessing.resize_short == 200


def test_lrn_is_the_papers_formula():
    m = tiny()
    torch.manual_seed(0)
    a = torch.randn(2, 12, 3, 5, 5) * 30
    sq = F.pad(a.pow(2), (0, 0, 0, 0, 0, 0, 2, 2))  # channel window of 5, zero beyond the ends
    window = sum(sq[:, i : i + 12] for i in range(5))
    expected = a / (2.0 + 1e-4 * window).pow(0.5)
    assert torch.allclose(m.conv1.norm(a), expected, rtol=1e-5, atol=1e-5)
    assert m.conv3.norm is None


def test_pooling_is_2x2_stride_2():
    m = tiny()
    for name in ("conv1", "conv2", "conv5"):
        pool = getattr(m, name).pool
        assert pool.kernel_size == (1, 2, 2) and pool.stride == (1, 2, 2)
    assert m.conv3.pool is None and m.conv4.pool is None


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("multires", [False, True])
def test_tiny_forward_backward_every_variant(fusion, multires):
    m = tiny(fusion=fusion, multires=multires).train()
    x = clip(m)
    loss = F.cross_entropy(m(x), torch.tensor([0, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    check_groups_partition(m)
    groups = m.layer_groups()
    assert [g.name for g in groups] == GROUPS
    assert [g.name for g in groups if g.tag == "temporal"] == TEMPORAL_GROUPS[fusion]
    assert all(g.temporal_params == (g.params if g.tag == "temporal" else []) for g in groups[:-1])
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (2, 10)
        assert m.features(x).shape == (2, 64)
    assert m.preprocessing.frames == {"slow": 10, "early": 10, "single": 1, "late": 16}[fusion]


def test_tiny_is_small_enough_for_the_test_suite():
    # counted, not timed: a training step of the tiny preset is about 0.12 GFLOP (the full net: hundreds)
    from torch.utils.flop_counter import FlopCounterMode

    m = tiny().train()
    with FlopCounterMode(display=False) as flops:
        m(clip(m, batch=1)).sum().backward()
    assert 0 < flops.get_total_flops() < 0.25e9


def test_slow_fusion_sees_all_ten_frames_conv3_onwards():
    m = tiny().eval()
    x = clip(m, batch=1)
    with torch.no_grad():
        base = m.forward_groups(x, 0, 3)
        assert base.shape[2] == 1  # one temporal column after conv3
        assert m.forward_groups(x, 0, 1).shape[2] == 4 and m.forward_groups(x, 0, 2).shape[2] == 2
        for t in (0, 9):
            y = x.clone()
            y[:, :, t] += 1.0
            assert not torch.allclose(m.forward_groups(y, 0, 3), base)


def test_late_fusion_uses_frames_0_and_15_with_shared_weights():
    m = tiny(fusion="late").eval()
    x = clip(m, batch=1)
    with torch.no_grad():
        base = m(x)
        middle = x.clone()
        middle[:, :, 1:15] = torch.randn_like(middle[:, :, 1:15])
        assert torch.equal(m(middle), base)
        last = x.clone()
        last[:, :, 15] += 1.0
        assert not torch.allclose(m(last), base)
        # one tower applied to each frame: conv5 output of the pair == tower on each frame alone
        pair = m.forward_groups(x, 0, 5)
        single = tiny(fusion="single")
        single.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("conv")}, strict=False)
        for col, t in enumerate((0, 15)):
            alone = single.eval().forward_groups(x[:, :, t : t + 1], 0, 5)
            assert torch.allclose(pair[:, :, col : col + 1], alone, atol=1e-6)


def test_early_fusion_conv1_spans_all_frames():
    m = tiny(fusion="early")
    assert m.conv1.conv.kernel_size[0] == 10
    assert m.forward_groups(clip(m, 1), 0, 1).shape[2] == 1


def test_multires_streams():
    m = tiny(multires=True)
    x = clip(m, batch=1)
    fovea, context = m.split_input(x)
    assert fovea.shape == context.shape == (1, 3, 10, 32, 32)
    assert torch.equal(fovea, x[:, :, :, 16:48, 16:48])
    assert torch.allclose(context, F.avg_pool3d(x, (1, 2, 2)), atol=1e-6)
    assert {n.split(".")[1] for n in m.layer_groups()[0].params} == {"fovea", "context"}
    assert m.fc6.in_features == 2 * 32 * 1 * 1  # two streams, width 1/8 conv5 = 32 channels, 1x1


@pytest.mark.parametrize("shape", [(1, 3, 9, 64, 64), (1, 3, 10, 60, 64), (1, 1, 10, 64, 64)])
def test_wrong_clip_shape_raises(shape):
    with pytest.raises(ConfigError, match="slowfusion"):
        tiny()(torch.randn(shape))


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="fusion"):
        SlowFusion(fusion="medium")
    with pytest.raises(ConfigError, match="too small"):
        SlowFusion(input_size=24, width=0.125, fc_dim=8)


def test_reset_classifier_rebuild_and_top3():
    m = tiny(fusion="late", multires=True)
    m.reset_classifier(4)
    assert m.num_classes == 4 and m.config["num_classes"] == 4
    m.eval()
    assert m(clip(m, 1)).shape == (1, 4)
    rebuilt = registry.build_from_config("slowfusion", m.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert rebuilt.preprocessing == m.preprocessing
    top3 = m.layer_groups()[-3:]
    assert [g.name for g in top3] == ["fc6", "fc7", "head"]
    assert top3[-1].params == ["classifier.weight", "classifier.bias"]


def test_forward_groups_split_equals_forward_multires():
    m = tiny(multires=True).eval()
    x = clip(m)
    with torch.no_grad():
        prefix = m.forward_groups(x, 0, 3)
        assert isinstance(prefix, tuple) and len(prefix) == 2
        assert torch.allclose(m.forward_groups(prefix, 3, 8), m(x), atol=1e-6)


def test_dropout_rate_is_configurable():
    m = tiny(dropout=0.9)
    assert m.drop6.p == 0.9 and m.drop7.p == 0.9
    with pytest.raises(ConfigError):
        tiny(dropout=1.0)
