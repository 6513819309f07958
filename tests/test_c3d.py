"""c3d: C3D with an importer for the DavideA/c3d-pytorch port's state dict (``c3d.pickle``).

The port's module cannot be installed, so the reference is its forward pass
written here with ``torch.nn.functional`` on the port's tensors, fed what
the Caffe model expects: BGR in 0-255 minus the Sports-1M channel means.
Port-layout files are built at 1/16 of the conv widths (the real one is
about 320 MB); the full-size name and shape table is checked on the meta device.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from vtransfer.data.transforms import normalize_clips
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.loading.backbone import backbone_summary, load_backbone, load_backbone_with_info
from vtransfer.models import c3d
from vtransfer.models.registry import build_backbone
from vtransfer.policies.freezing import apply_policy, resolve_policy, set_train_mode
from vtransfer.loading.sources import BUILTIN_SOURCES, detect_layout

#: The port's C3D_model.py: (name, input channels, output channels) of its eight 3x3x3 convs.
PORT_CONVS = [
    ("conv1", 3, 64), ("conv2", 64, 128), ("conv3a", 128, 256), ("conv3b", 256, 256),
    ("conv4a", 256, 512), ("conv4b", 512, 512), ("conv5a", 512, 512), ("conv5b", 512, 512),
]
#: Sports-1M mean-cube channel means (B, G, R), DavideA/c3d-pytorch issue #1.
MEAN_BGR = torch.tensor([90.25, 97.66, 101.41])
TINY_WIDTH = 1 / 16  # the tiny preset's
TINY_FC = 32


def port_shapes(width: float = 1.0, fc_dim: int = 4096, fc6_in: int = 8192, classes: int = 487) -> dict[str, tuple]:
    """Names and shapes of the port's state dict (at ``width`` of its conv channels)."""
    ch = lambda c: c if c == 3 else max(1, round(c * width))  # noqa: E731
    shapes: dict[str, tuple] = {}
    for name, cin, cout in PORT_CONVS:
        shapes[f"{name}.weight"] = (ch(cout), ch(cin), 3, 3, 3)
        shapes[f"{name}.bias"] = (ch(cout),)
    for name, cin, cout in (("fc6", fc6_in, fc_dim), ("fc7", fc_dim, fc_dim), ("fc8", fc_dim, classes)):
        shapes[f"{name}.weight"] = (cout, cin)
        shapes[f"{name}.bias"] = (cout,)
    return shapes


def tiny_port_state(classes: int = 487, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """A port-layout state dict at the tiny preset's size (32 x 2 x 2 = 128 fc6 inputs), He-scaled."""
    g = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in port_shapes(TINY_WIDTH, TINY_FC, 32 * 2 * 2, classes).items():
        std = 0.05 if len(shape) == 1 else (2.0 / torch.Size(shape[1:]).numel()) ** 0.5  # biases small, weights He
        sd[key] = torch.randn(shape, generator=g) * std
    return sd


def port_forward(sd: dict[str, torch.Tensor], x_bgr: torch.Tensor) -> torch.Tensor:
    """The port's C3D.forward up to fc8 (its logits), in eval mode, on BGR 0-255 minus the mean."""
    h = x_bgr
    for name, _, _ in PORT_CONVS:
        h = F.relu(F.conv3d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1))
        if name == "conv1":
            h = F.max_pool3d(h, (1, 2, 2), (1, 2, 2))
        elif name in ("conv2", "conv3b", "conv4b"):
            h = F.max_pool3d(h, 2, 2)
        elif name == "conv5b":
            h = F.max_pool3d(h, 2, 2, padding=(0, 1, 1))
    h = h.reshape(h.shape[0], -1)
    h = F.relu(F.linear(h, sd["fc6.weight"], sd["fc6.bias"]))
    h = F.relu(F.linear(h, sd["fc7.weight"], sd["fc7.bias"]))
    return F.linear(h, sd["fc8.weight"], sd["fc8.bias"])


def clips_uint8(batch: int = 2, frames: int = 16, size: int = 32, seed: int = 1) -> torch.Tensor:
    """Decoded RGB clips as the pipeline holds them: uint8 ``B x T x C x H x W``."""
    return torch.randint(0, 256, (batch, frames, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def reference_input(clips: torch.Tensor) -> torch.Tensor:
    """What the Caffe model (and so the port's weights) expects: BGR, 0-255, minus the channel means."""
    x = clips.permute(0, 2, 1, 3, 4).float()[:, [2, 1, 0]]
    return x - MEAN_BGR.view(1, 3, 1, 1, 1)


def assert_matches_port(model, sd, clips) -> float:
    with torch.no_grad():
        got = model(normalize_clips(clips, model.preprocessing))
        want = port_forward(sd, reference_input(clips))
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-5, rel
    return rel


# -- architecture -------------------------------------------------------------------------


def test_tiny_forward_backward_shapes_and_groups():
    model = build_backbone("c3d", "tiny", num_classes=5).train()
    x = torch.randn(2, 3, 16, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5) and model.features(x).shape == (2, TINY_FC)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is not None for p in model.parameters())
    assert model.group_names() == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "head"]
    assert [g.tag for g in model.layer_groups()] == ["temporal"] * 5 + ["spatial", "spatial", "head"]
    assert model.layer_groups()[2].params == ["conv3a.weight", "conv3a.bias", "conv3b.weight", "conv3b.bias"]
    model.eval()
    with torch.no_grad():
        state = model.forward_groups(x, 0, 5)
        assert state.shape == (2, 32, 1, 2, 2)  # pool5 with the port's (0, 1, 1) padding on a 2 x 2 map
        assert torch.equal(model.forward_groups(state, 5, 8), model(x))


def test_more_frames_make_fc6_temporal_and_wrong_clips_are_refused():
    model = build_backbone("c3d", "tiny", frames=32)
    assert model.pool5_out == (2, 2, 2) and model.fc6.in_features == 32 * 8
    assert model.layer_groups()[5].tag == "temporal"
    assert "fc6.weight" in resolve_policy(model, "temporal").trainable
    with pytest.raises(ConfigError, match=r"expects clips B x 3 x 32 x 32 x 32.*got \(1, 3, 16, 32, 32\)"):
        model(torch.zeros(1, 3, 16, 32, 32))
    with pytest.raises(ConfigError, match="at least 16 frames"):
        build_backbone("c3d", "tiny", frames=8)
    with pytest.raises(ConfigError, match="pool5 must be one of"):
        build_backbone("c3d", "tiny", pool5="avg")


def test_pool5_port_padding_and_caffe_rounding_place_windows_differently():
    x = torch.arange(7.0).view(1, 1, 1, 1, 7).expand(1, 1, 2, 7, 7).contiguous()  # value = column index
    port = build_backbone("c3d", "tiny").pool_after(4, x)
    caffe = build_backbone("c3d", "tiny", pool5="caffe").pool_after(4, x)
    assert port[0, 0, 0, 0].tolist() == [0.0, 2.0, 4.0, 6.0]  # windows at -1, 1, 3, 5
    assert caffe[0, 0, 0, 0].tolist() == [1.0, 3.0, 5.0, 6.0]  # windows at 0, 2, 4, 6 (the last clipped)
    with torch.device("meta"):  # both fit the port's file at 16 x 112 x 112
        assert build_backbone("c3d", pool5="caffe").fc6.in_features == build_backbone("c3d").fc6.in_features == 8192


@pytest.mark.parametrize("policy", ["scratch", "top-layer", "top-3", "temporal", "all"])
def test_every_policy_trains_what_it_promises(policy):
    torch.manual_seed(0)
    model = build_backbone("c3d", "tiny", num_classes=3)
    plan = resolve_policy(model, policy)
    convs = [n for n, _ in model.named_parameters() if n.startswith("conv")]
    fc = lambda *names: [n for n, _ in model.named_parameters() if n.split(".")[0] in names]  # noqa: E731
    promised = {
        "scratch": convs + fc("fc6", "fc7", "fc8"),
        "all": convs + fc("fc6", "fc7", "fc8"),
        "top-layer": fc("fc8"),
        "top-3": fc("fc6", "fc7", "fc8"),
        "temporal": convs + fc("fc8"),
    }[policy]
    assert plan.trainable == promised and plan.reinit == (policy == "scratch")
    apply_policy(model, plan)
    set_train_mode(model, True)
    assert model.drop6.training == ("fc6.weight" in promised) and model.drop7.training == ("fc7.weight" in promised)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(torch.randn(4, 3, 16, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == promised


def test_backbones_summary_counts_the_full_network_and_says_it_is_not_slow_fusion(home):
    summary = backbone_summary("c3d")
    assert summary["default_preset"] == "sports1m" and "tiny" in summary["presets"]
    assert summary["params"] == sum(map(lambda s: torch.Size(s).numel(), port_shapes().values())) == 79_991_015
    assert summary["input"] == {"frames": 16, "stride": 1, "size": [112, 112]} and summary["num_classes"] == 487
    assert summary["preprocessing"]["resize_short"] == 128 and summary["preprocessing"]["std"] == [1.0, 1.0, 1.0]
    [source] = summary["sources"]
    assert source["name"] == "c3d:sports1m" and source["available"] and not source["present"]
    assert "Not Karpathy" in c3d.DESCRIPTION and "slow fusion" in c3d.DESCRIPTION
    assert "not Karpathy's slow fusion" in source["note"]


# -- the port's state dict --------------------------------------------------------------


def test_full_size_port_table_matches_names_and_shapes_and_is_detected():
    with torch.device("meta"):
        model = build_backbone("c3d")
        state = {k: torch.empty(s) for k, s in port_shapes().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == port_shapes()
    layout = detect_layout(state)
    assert layout is not None and layout.name == "c3d-port" and layout.num_classes(state) == 487
    c3d.load_c3d_port_state_dict(state, model)  # the full-size checks pass (meta tensors: no data)


def test_port_file_through_load_backbone_equals_the_reference_forward(tmp_path):
    sd = tiny_port_state()
    path = tmp_path / "c3d.pickle"
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # the 2017 file predates the zip format
    assert torch.load(path, weights_only=True).keys() == sd.keys()  # a plain dict of tensors: weights_only accepts it
    model, info = load_backbone_with_info("c3d", weights=path, preset="tiny")
    assert info["kind"] == "foreign" and info["layout"] == "c3d-port" and model.num_classes == 487
    rel = assert_matches_port(model, sd, clips_uint8())
    print(f"port import: max relative difference {rel:.2e}")
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"].flip(1) * 255)  # BGR -> RGB, 0-255 scale
    assert torch.equal(model.fc6.weight, sd["fc6.weight"])
    headed = load_backbone("c3d", weights=path, preset="tiny", num_classes=3)
    assert headed.num_classes == 3 and torch.equal(headed.conv5b.weight, model.conv5b.weight)


def test_source_loads_the_cached_file_offline_with_provenance(home):
    sd = tiny_port_state(seed=3)
    (home / "weights").mkdir(parents=True)
    torch.save(sd, home / "weights" / "c3d.pickle")
    model, info = load_backbone_with_info("c3d", weights="c3d:sports1m", preset="tiny")
    assert info["source"] == "c3d:sports1m" and info["pretrained_on"]["name"] == "Sports-1M"
    assert info["pretrained_on"]["num_classes"] == 487 and model.num_classes == 487
    assert (home / "weights" / "c3d.pickle.sha256").is_file()  # no published hash: trust on first use
    assert_matches_port(model, sd, clips_uint8(seed=4))
    prov = BUILTIN_SOURCES["c3d:sports1m"].provenance()
    assert prov["url"] == "http://imagelab.ing.unimore.it/files/c3d_pytorch/c3d.pickle" and prov["sha256"] is None


def test_offline_error_names_the_file_and_the_folder(home):
    with pytest.raises(WeightsError) as err:
        load_backbone("c3d", weights="c3d:sports1m")
    message = str(err.value)
    assert "c3d_pytorch/c3d.pickle" in message and "offline" in message
    assert str(home.resolve() / "weights" / "c3d.pickle") in message


def test_wrong_shapes_name_the_first_mismatch_and_leave_the_model_untouched():
    sd = tiny_port_state()
    sd["conv2.weight"] = torch.zeros(9, 4, 3, 3, 3)
    sd["fc6.weight"] = torch.zeros(TINY_FC, 8192)
    model = build_backbone("c3d", "tiny", num_classes=487)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        c3d.load_c3d_port_state_dict(sd, model)
    message = str(err.value)
    assert "2 shape mismatch(es): conv2.weight: file (9, 4, 3, 3, 3) vs model (8, 4, 3, 3, 3), fc6.weight" in message
    assert "fits 16 x 112 x 112" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    del sd["fc8.bias"]
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): fc8\.bias"):
        c3d.load_c3d_port_state_dict(sd, model)
