"""The model side of ``--stream flow``: cross-modality initialisation, flow preprocessing, refusals, checkpoints."""

from __future__ import annotations

import pytest
import torch

from vtransfer.data.flow import FLOW_MEAN, FLOW_STD
from vtransfer.data.flow_settings import FlowSettings
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.transforms import normalize_clips
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.models.registry import build_backbone, check_stream, takes_flow
from vtransfer.policies.freezing import apply_policy, resolve_policy
from vtransfer.policies.names import FREEZING_POLICY_NAMES
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.weights.checkpoint import save_checkpoint
from vtransfer.weights.inflate import cross_modality_weight
from vtransfer.workflows.run_model import build_run_model

TINY = {"backbone": "effnet3d", "frames": 4, "stride": 1, "size": 64}


def test_cross_modality_weight_is_the_colour_average_replicated_per_channel():
    torch.manual_seed(0)
    rgb = torch.randn(4, 3, 2, 3, 3)
    for channels in (1, 2, 3, 5):
        got = cross_modality_weight(rgb, channels)
        assert got.shape == (4, channels, 2, 3, 3)
        for o in range(4):
            mean = (rgb[o, 0] + rgb[o, 1] + rgb[o, 2]) / 3  # by hand, filter by filter
            for c in range(channels):
                expected = rgb[o, c] if channels == 3 else mean
                assert torch.allclose(got[o, c], expected, atol=1e-7)


def test_cross_modality_weight_refuses_what_is_not_an_rgb_filter():
    with pytest.raises(WeightsError, match="out x 3"):
        cross_modality_weight(torch.zeros(4, 2, 3, 3), 2)


def test_a_flow_effnet3d_starts_from_the_imagenet_weights_averaged_over_colour(home):
    flow, _ = build_run_model({**TINY, "weights": "effnet3d:imagenet", "stream": "flow", "flow_channels": 2}, num_classes=3)
    rgb, _ = build_run_model({**TINY, "weights": "effnet3d:imagenet"}, num_classes=3)
    stem_rgb = rgb._conv_stem.conv.weight
    assert flow._conv_stem.conv.weight.shape[1] == 2
    assert torch.allclose(flow._conv_stem.conv.weight, stem_rgb.mean(1, keepdim=True).repeat(1, 2, 1, 1, 1))
    flow_state, rgb_state = flow.state_dict(), rgb.state_dict()
    same = [k for k in rgb_state if k != "_conv_stem.conv.weight" and not k.startswith("_fc.")]
    assert all(torch.equal(flow_state[k], rgb_state[k]) for k in same)
    assert flow.config["in_channels"] == 2 and "in_channels" not in rgb.config


def test_flow_from_rgb_weights_takes_three_channels_by_default_with_the_rgb_filters_unchanged(home):
    flow, _ = build_run_model({**TINY, "weights": "effnet3d:imagenet", "stream": "flow"}, num_classes=3)
    rgb, _ = build_run_model({**TINY, "weights": "effnet3d:imagenet"}, num_classes=3)
    assert flow.preprocessing.flow.channels == 3 and flow.preprocessing.channels == 3
    assert torch.equal(flow._conv_stem.conv.weight, rgb._conv_stem.conv.weight)  # x, y, magnitude in place of R, G, B


def test_flow_channels_follow_weights_trained_on_flow(tmp_path, home):
    from vtransfer.loading.backbone import check_weights_stream, weights_flow_channels

    two, _ = build_run_model({**TINY, "stream": "flow", "flow_channels": 2, "policy": "scratch"}, num_classes=3)
    path = save_checkpoint(tmp_path / "flow2.safetensors", two, classes=["a", "b", "c"])
    assert weights_flow_channels(path) == 2
    assert weights_flow_channels("i3d:kinetics400-flow") == 2
    assert weights_flow_channels("effnet3d:imagenet") is None and weights_flow_channels(None) is None
    started, _ = build_run_model({"backbone": "effnet3d", "weights": str(path), "stream": "flow", "policy": "top-layer"},
                                 num_classes=3)
    assert started.preprocessing.flow.channels == 2 and started._conv_stem.conv.weight.shape[1] == 2
    with pytest.raises(ConfigError, match=r"flow2.safetensors is a flow network on 2 channels; --flow-channels 3 "
                                          r"does not fit it \(leave --flow-channels out"):
        check_weights_stream(path, "flow", flow_channels=3)
    with pytest.raises(ConfigError, match="i3d:kinetics400-flow is a flow network on 2 channels; --flow-channels 3"):
        check_weights_stream("i3d:kinetics400", "two-stream", flow_channels=3)  # its flow twin fixes 2
    check_weights_stream("i3d:kinetics400", "two-stream", flow_channels=2)
    check_weights_stream("effnet3d:imagenet", "flow", flow_channels=2)  # RGB weights start any count


def test_flow_preprocessing_maps_the_uint8_levels_to_minus_one_one(home):
    model, _ = build_run_model({**TINY, "stream": "flow", "flow_channels": 3, "policy": "scratch"}, num_classes=3)
    pre = model.preprocessing
    bound = round(20 * pre.resize_short / 256, 2)  # I3D's 20 px at 256 px, scaled to the working resolution
    assert pre.stream == "flow" and pre.flow == FlowSettings("farneback", bound, 3, "next-sampled") and pre.channels == 3
    assert pre.mean == (FLOW_MEAN,) * 3 and pre.std == (FLOW_STD,) * 3
    levels = torch.tensor([1, 128, 255], dtype=torch.uint8).view(1, 1, 1, 1, 3).expand(1, 1, 3, 1, 3)
    x = normalize_clips(levels.contiguous(), pre)
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize("policy", FREEZING_POLICY_NAMES)
def test_every_paper_policy_trains_a_flow_stream_forward_and_backward(policy):
    model = build_backbone("effnet3d", None, num_classes=3, frames=4, frame_stride=1, crop_size=64, in_channels=2)
    plan = resolve_policy(model, policy)
    apply_policy(model, plan)
    clip = torch.randn(2, 2, 4, 64, 64)
    loss = torch.nn.functional.cross_entropy(model(clip), torch.tensor([0, 2]))
    loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(model.get_parameter(n).grad is not None for n in trained if "_fc" in n)
    assert torch.isfinite(loss)


def test_a_flow_checkpoint_reloads_as_a_flow_model(tmp_path, home):
    model, _ = build_run_model({**TINY, "stream": "flow", "flow_method": "farneback", "policy": "scratch"}, num_classes=3)
    path = save_checkpoint(tmp_path / "flow.safetensors", model, classes=["a", "b", "c"])
    back, ckpt = model_from_checkpoint(path)
    assert back._conv_stem.conv.weight.shape[1] == 3  # the default for a network not started from flow weights
    assert back.preprocessing == model.preprocessing and ckpt.preprocessing.flow.method == "farneback"
    assert Preprocessing.from_dict(model.preprocessing.to_dict()) == model.preprocessing


def test_rgb_preprocessing_is_written_as_before():
    assert set(Preprocessing(8, 2, (224, 224), 256).to_dict()) == {"frames", "stride", "crop_size", "resize_short",
                                                                   "mean", "std"}


def test_a_family_that_cannot_take_flow_is_refused_naming_those_that_can():
    assert takes_flow("effnet3d") and not takes_flow("vivit")
    check_stream("vivit", "rgb")
    with pytest.raises(ConfigError, match="backbone 'vivit' cannot take optical flow.*effnet3d"):
        check_stream("vivit", "flow")


def test_flow_options_are_checked_before_any_video_is_read(demo_dataset, tmp_path, no_decoding):
    from vtransfer import api

    bad = [({"stream": "depth"}, "--stream must be one of rgb, flow"),
           ({"stream": "flow", "flow_method": "lucas"}, "unknown flow method 'lucas'"),
           ({"stream": "flow", "flow_channels": 4}, "flow channels must be 2"),
           ({"stream": "flow", "flow_bound": 0}, "flow bound must be a positive"),
           ({"stream": "flow", "backbone": "vivit", "preset": "tiny"}, "cannot take optical flow")]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            api.finetune(demo_dataset, **{"backbone": "effnet3d", **options}, out=tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_a_flow_i3d_inflates_googlenet_with_the_colour_average_in_its_first_layer():
    from torchvision.models import googlenet

    from vtransfer.weights.inflate import inflate_conv2d_weight, inflate_googlenet_into_i3d

    torch.manual_seed(0)
    net2d = googlenet(weights=None, aux_logits=False, init_weights=True).state_dict()
    flow = build_backbone("i3d", None, num_classes=5, in_channels=2, frames=9, crop_size=32)
    rgb = build_backbone("i3d", None, num_classes=5, frames=9, crop_size=32)
    inflate_googlenet_into_i3d(net2d, flow)
    inflate_googlenet_into_i3d(net2d, rgb)
    stem = flow.Conv3d_1a_7x7.conv3d.weight
    assert stem.shape[1] == 2
    expected = inflate_conv2d_weight(net2d["conv1.conv.weight"].mean(1, keepdim=True).repeat(1, 2, 1, 1), 7)
    assert torch.allclose(stem, expected, atol=1e-7)
    assert torch.equal(flow.Mixed_5c.b0.conv3d.weight, rgb.Mixed_5c.b0.conv3d.weight)
    assert flow(torch.randn(1, 2, 9, 32, 32)).shape == (1, 5)


def test_weights_must_fit_the_stream(tmp_path, home):
    from vtransfer.loading.backbone import check_weights_stream

    check_weights_stream("effnet3d:imagenet", "flow")  # 2D ImageNet weights start either stream
    check_weights_stream("i3d:imagenet", "flow")
    with pytest.raises(ConfigError, match="i3d:kinetics400-flow starts a flow network.*add --stream flow"):
        check_weights_stream("i3d:kinetics400-flow", "rgb")
    with pytest.raises(ConfigError, match="i3d:kinetics400 starts a rgb network, not --stream flow"):
        check_weights_stream("i3d:kinetics400", "flow")
    model, _ = build_run_model({**TINY, "stream": "flow", "policy": "scratch"}, num_classes=3)
    path = save_checkpoint(tmp_path / "flow.safetensors", model, classes=["a", "b", "c"])
    check_weights_stream(path, "flow")
    with pytest.raises(ConfigError, match="is a flow network, but --stream is rgb"):
        check_weights_stream(path, "rgb")
