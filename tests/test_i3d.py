"""I3D: architecture, layer groups, the PyTorch-port importer and GoogLeNet inflation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.models import registry
from vtransfer.models.base import check_groups_partition
from vtransfer.models.i3d import I3D, PRESETS, same_padding
from vtransfer.weights.i3d_port import load_i3d_port_state_dict, read_i3d_port_file
from vtransfer.weights.inflate import googlenet_unit_map, inflate_conv2d_weight, inflate_googlenet_into_i3d

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PORT_KEYS = SHARED_DATA / "i3d_pytorch_port_keys.tsv"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def port_shapes() -> dict[str, tuple[int, ...]]:
    if not PORT_KEYS.is_file():
        pytest.skip(f"{PORT_KEYS} not present")
    shapes = {}
    for line in PORT_KEYS.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            shapes[key] = tuple(ast.literal_eval(shape))
    assert len(shapes) == 344
    return shapes


@pytest.fixture(scope="module")
def kinetics_model() -> I3D:
    return I3D(**PRESETS["kinetics"])


def tiny(**overrides) -> I3D:
    torch.manual_seed(0)
    return I3D(**{**PRESETS["tiny"], **overrides})


def random_port_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(1234, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g)
    return sd


# -- architecture -------------------------------------------------------------------


def test_parameter_count_400_classes(kinetics_model):
    assert sum(p.numel() for p in kinetics_model.parameters()) == 12_697_264


def test_state_dict_layout_is_the_ports(kinetics_model, port_shapes):
    sd = kinetics_model.state_dict()
    assert set(sd) == set(port_shapes)
    wrong = {k: (tuple(sd[k].shape), s) for k, s in port_shapes.items() if tuple(sd[k].shape) != s}
    assert not wrong


def test_batchnorm_settings(kinetics_model):
    bn = kinetics_model.Mixed_4c.b1b.bn
    assert bn.eps == 1e-3 and bn.momentum == 0.01
    assert kinetics_model.logits.bn is None and kinetics_model.logits.conv3d.bias is not None
    assert kinetics_model.Conv3d_1a_7x7.conv3d.bias is None


def test_same_padding_matches_tf_rule():
    # TF SAME: out = ceil(n / s), extra padding goes after.
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(225, 7, 2) == (3, 3)
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(64, 7, 2) == (2, 3)
    assert same_padding(16, 3, 1) == (1, 1)
    assert same_padding(8, 2, 2) == (0, 0)
    assert same_padding(9, 2, 2) == (0, 1)


def test_preprocessing_and_presets():
    m = registry.build_backbone("i3d")  # default preset: kinetics
    p = m.preprocessing
    assert (p.frames, p.crop_size, p.resize_short) == (64, (224, 224), 256)
    assert p.mean == (0.5, 0.5, 0.5) and p.std == (0.5, 0.5, 0.5)
    assert m.num_classes == 400
    t = tiny()
    assert (t.preprocessing.frames, t.preprocessing.crop_size) == (16, (112, 112))
    assert t.num_classes == 10


@pytest.mark.parametrize("frames", [9, 16])
@pytest.mark.parametrize("size", [112, 128])
def test_output_shapes(frames, size):
    m = tiny().eval()
    with torch.no_grad():
        x = torch.randn(2, 3, frames, size, size)
        assert m(x).shape == (2, 10)
        assert m.features(x).shape == (2, m.embed_dim)


def test_non_square_input():
    m = tiny().eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 12, 112, 144)).shape == (1, 10)


def test_intermediate_shapes_follow_same_padding():
    m = tiny().eval()
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        h = m.forward_groups(x, 0, 1)
        assert h.shape[2:] == (8, 56, 56)  # 7x7x7 stride 2, then 1x3x3 stride 1x2x2
        h = m.forward_groups(h, 1, 11)  # through Mixed_5b
        assert h.shape[2:] == (2, 7, 7)


@pytest.mark.parametrize("shape", [(1, 3, 8, 112, 112), (1, 3, 16, 16, 112), (1, 1, 16, 112, 112)])
def test_bad_input_raises(shape):
    m = tiny()
    with pytest.raises(ConfigError, match="i3d"):
        m(torch.randn(shape))


def test_too_few_frames_message():
    with pytest.raises(ConfigError, match="at least 9 frames"):
        tiny()(torch.randn(1, 3, 8, 112, 112))
    with pytest.raises(ConfigError):
        I3D(frames=8)


def test_forward_backward_tiny():
    m = tiny().train()
    x = torch.randn(2, 3, 16, 112, 112)
    with FlopCounterMode(display=False) as flops:  # counted, not timed: about 2.7 GFLOP
        loss = F.cross_entropy(m(x), torch.tensor([1, 2]))
        loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.Conv3d_1a_7x7.conv3d.weight.grad.abs().sum() > 0
    assert 0 < flops.get_total_flops() < 5e9


def test_forward_groups_split_equals_forward():
    m = tiny().eval()
    x = torch.randn(1, 3, 10, 112, 112)
    with torch.no_grad():
        full = m(x)
        for k in (3, 8, 12):
            assert torch.allclose(m.forward_groups(m.forward_groups(x, 0, k), k, 13), full, atol=1e-5)


def test_layer_groups():
    m = tiny()
    check_groups_partition(m)
    groups = m.layer_groups()
    assert [g.name for g in groups] == [
        "Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "Mixed_3b", "Mixed_3c",
        "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b", "Mixed_5c", "head",
    ]  # fmt: skip
    tags = {g.name: g.tag for g in groups}
    assert tags["Conv3d_1a_7x7"] == "temporal" and tags["Conv3d_2c_3x3"] == "temporal"
    assert tags["Conv3d_2b_1x1"] == "spatial" and tags["head"] == "head"
    mixed = next(g for g in groups if g.name == "Mixed_4d")
    assert mixed.tag == "temporal"
    assert sorted(mixed.temporal_params) == sorted(
        f"Mixed_4d.{b}.{p}" for b in ("b1b", "b2b") for p in ("conv3d.weight", "bn.weight", "bn.bias")
    )
    # the parameter-level rule: exactly the params of convs with temporal extent > 1
    shapes = dict(m.named_parameters())
    for g in groups[:-1]:
        for name in g.params:
            conv_weight = name.rsplit(".", 2)[0] + ".conv3d.weight"
            assert (name in g.temporal_params) == (shapes[conv_weight].shape[2] > 1), name
    assert groups[-1].params == ["logits.conv3d.weight", "logits.conv3d.bias"]
    assert sum(len(g.buffers) for g in groups) == len(list(m.buffers()))


def test_reset_classifier_and_rebuild_from_config():
    m = tiny()
    m.reset_classifier(7)
    assert m.num_classes == 7 and m.config["num_classes"] == 7
    assert m(torch.randn(1, 3, 9, 112, 112)).shape == (1, 7)
    rebuilt = registry.build_from_config("i3d", m.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert rebuilt.preprocessing == m.preprocessing


def test_port_head_pool_equals_port_computation():
    """head_pool="port" == AvgPool3d(2x7x7, stride 1) -> logits per time window -> mean of logits."""
    torch.manual_seed(1)
    m = tiny(head_pool="port").eval()
    feats = torch.randn(2, m.embed_dim, 5, 7, 7)
    with torch.no_grad():
        ours = m.run_group(12, m.pool_features(feats))
        pooled = F.avg_pool3d(feats, (2, 7, 7), stride=1)  # B x C x 4 x 1 x 1
        reference = m.logits(pooled).squeeze(-1).squeeze(-1).mean(dim=2)
        assert torch.allclose(ours, reference, atol=1e-5)
        # "global" differs only in weighting the border time steps; equal when T' == 2
        glob = tiny().eval()
        glob.load_state_dict(m.state_dict())
        assert not torch.allclose(glob.pool_features(feats), m.pool_features(feats), atol=1e-4)
        two = feats[:, :, :2]
        assert torch.allclose(glob.pool_features(two), m.pool_features(two), atol=1e-6)


# -- port importer ------------------------------------------------------------------------


def test_port_state_dict_imports_exactly(kinetics_model, port_shapes):
    sd = random_port_state_dict(port_shapes)
    load_i3d_port_state_dict(sd, kinetics_model)
    got = kinetics_model.state_dict()
    assert set(got) == set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_port_state_dict_without_num_batches_tracked(kinetics_model, port_shapes):
    sd = {k: v for k, v in random_port_state_dict(port_shapes, seed=1).items() if "num_batches_tracked" not in k}
    assert len(sd) == 344 - 57
    load_i3d_port_state_dict(sd, kinetics_model)
    got = kinetics_model.state_dict()
    assert torch.equal(got["Mixed_5c.b2b.conv3d.weight"], sd["Mixed_5c.b2b.conv3d.weight"])
    assert int(got["Mixed_5c.b2b.bn.num_batches_tracked"]) == 0


def test_port_dataparallel_prefix(kinetics_model, port_shapes):
    sd = random_port_state_dict(port_shapes, seed=2)
    load_i3d_port_state_dict({f"module.{k}": v for k, v in sd.items()}, kinetics_model)
    assert torch.equal(kinetics_model.state_dict()["logits.conv3d.bias"], sd["logits.conv3d.bias"])


def test_port_wrong_shape_names_key_and_shapes(kinetics_model, port_shapes):
    sd = random_port_state_dict(port_shapes)
    sd["Mixed_3b.b1b.conv3d.weight"] = torch.zeros(128, 96, 1, 3, 3)
    before = kinetics_model.Mixed_3b.b1b.conv3d.weight.clone()
    with pytest.raises(WeightsError) as info:
        load_i3d_port_state_dict(sd, kinetics_model)
    msg = str(info.value)
    assert "Mixed_3b.b1b.conv3d.weight" in msg and "(128, 96, 1, 3, 3)" in msg and "(128, 96, 3, 3, 3)" in msg
    assert torch.equal(kinetics_model.Mixed_3b.b1b.conv3d.weight, before)  # untouched on error


def test_port_missing_and_unexpected_keys(kinetics_model, port_shapes):
    sd = random_port_state_dict(port_shapes)
    del sd["Mixed_4e.b0.bn.running_mean"]
    sd["Mixed_6a.b0.conv3d.weight"] = torch.zeros(1)
    expected = r"missing key\(s\): Mixed_4e\.b0\.bn\.running_mean.*unexpected key\(s\): Mixed_6a"
    with pytest.raises(WeightsError, match=expected):
        load_i3d_port_state_dict(sd, kinetics_model)


def test_port_many_mismatches_are_summarised(port_shapes):
    m = tiny()  # width 1/8, 10 classes: nearly everything mismatches
    with pytest.raises(WeightsError, match=r"shape mismatch\(es\): .*and \d+ more"):
        load_i3d_port_state_dict(random_port_state_dict(port_shapes), m)


def test_read_port_file(tmp_path, port_shapes, kinetics_model):
    sd = random_port_state_dict(port_shapes, seed=3)
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(sd, path)
    loaded = read_i3d_port_file(path)
    assert set(loaded) == set(sd) and torch.equal(loaded["logits.conv3d.weight"], sd["logits.conv3d.weight"])
    load_i3d_port_state_dict(loaded, kinetics_model)

    with pytest.raises(WeightsError, match="no such file"):
        read_i3d_port_file(tmp_path / "absent.pt")
    bad = tmp_path / "pickled_object.pt"
    torch.save({"weights": sd["logits.conv3d.bias"], "obj": _NotAllowed()}, bad)
    with pytest.raises(WeightsError, match="pickled_object.pt"):
        read_i3d_port_file(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        read_i3d_port_file(garbage)


class _NotAllowed:
    """An arbitrary class: weights_only unpickling must refuse it."""


# -- inflation ------------------------------------------------------------------------------


def test_inflate_conv2d_weight_boring_fixed_point():
    torch.manual_seed(0)
    w2 = torch.randn(5, 4, 3, 3)
    w3 = inflate_conv2d_weight(w2, 3)
    assert w3.shape == (5, 4, 3, 3, 3)
    assert torch.allclose(w3.sum(dim=2), w2, atol=1e-6)
    frame = torch.randn(1, 4, 8, 8)
    boring = frame.unsqueeze(2).expand(-1, -1, 6, -1, -1)
    y3 = F.conv3d(boring, w3, padding=(0, 1, 1))  # VALID in time: 4 outputs, all interior
    y2 = F.conv2d(frame, w2, padding=1)
    for t in range(y3.shape[2]):
        assert torch.allclose(y3[:, :, t], y2, atol=1e-5)
    with pytest.raises(WeightsError):
        inflate_conv2d_weight(w3, 3)


@pytest.fixture(scope="module")
def googlenet_and_inflated():
    """Random torchvision GoogLeNet (with non-trivial BN statistics) and a width-1 I3D inflated from it."""
    torch.manual_seed(0)
    g = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    for mod in g.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    m = I3D(num_classes=400)
    logits_before = m.logits.conv3d.weight.clone()
    inflate_googlenet_into_i3d(g.state_dict(), m)
    assert torch.equal(m.logits.conv3d.weight, logits_before)  # fc dropped, logits kept
    return g.eval(), m.eval()


def _valid_after(valid: set[int], length: int, kernel: int, stride: int) -> tuple[set[int], int]:
    """Time indices of a SAME-padded op's output whose window lies on valid (non-border) inputs."""
    before, _ = same_padding(length, kernel, stride)
    out_len = -(-length // stride)
    out = {j for j in range(out_len) if all(j * stride - before + i in valid for i in range(kernel))}
    return out, out_len


def test_every_inflated_unit_matches_2d_on_boring_video(googlenet_and_inflated):
    g, m = googlenet_and_inflated
    units = googlenet_unit_map()
    assert len(units) == 3 + 9 * 6
    frames, size = 15, 9  # odd size: SAME == torchvision's symmetric padding, also for conv1's stride 2
    checked_border = 0
    with torch.no_grad():
        for name2d, name3d in units.items():
            unit2d, unit3d = g.get_submodule(name2d), m.get_submodule(name3d)
            frame = torch.randn(1, unit2d.conv.in_channels, size, size)
            y2 = unit2d(frame)
            y3 = unit3d(frame.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous())
            kt, st = unit3d.kernel[0], unit3d.stride[0]
            interior, out_len = _valid_after(set(range(frames)), frames, kt, st)
            assert y3.shape[2] == out_len and interior, name3d
            for t in interior:
                assert torch.allclose(y3[:, :, t], y2, atol=1e-4), f"{name3d} t={t}"
            border = sorted(set(range(out_len)) - interior)
            if border:  # zero padding in time changes the border: shows the comparison can fail
                assert not torch.allclose(y3[:, :, border[0]], y2, atol=1e-4), name3d
                checked_border += 1
    assert checked_border == 1 + 1 + 9 * 2  # conv1, conv3 and the two 3x3x3 branches per block


def test_inflated_stem_matches_2d_stem_in_eval(googlenet_and_inflated):
    g, m = googlenet_and_inflated
    # 119 -> conv1 60 -> pool 30 -> pool 15: odd before the stride-2 conv, even before the stride-2
    # pools, the sizes at which TF SAME and torchvision's padding/ceil_mode pick the same pixels.
    frames, size = 16, 119
    frame = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        y2 = g.maxpool2(g.conv3(g.conv2(g.maxpool1(g.conv1(frame)))))
        y3 = m.forward_groups(frame.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous(), 0, 3)
    valid, length = _valid_after(set(range(frames)), frames, 7, 2)  # Conv3d_1a_7x7
    valid, length = _valid_after(valid, length, 3, 1)  # Conv3d_2c_3x3 (pools and 2b are 1 in time)
    assert y3.shape[2:] == (length, 15, 15) and y2.shape[2:] == (15, 15)
    assert valid == {2, 3, 4}
    for t in valid:
        assert torch.allclose(y3[:, :, t], y2, atol=1e-4), t


def test_inflation_errors_name_keys():
    torch.manual_seed(0)
    sd = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).state_dict()
    sd["aux1.conv.conv.weight"] = torch.zeros(1)  # auxiliary heads are dropped silently
    m = I3D(num_classes=5)
    inflate_googlenet_into_i3d(sd, m)
    assert torch.allclose(m.Conv3d_2c_3x3.conv3d.weight.sum(dim=2), sd["conv3.conv.weight"], atol=1e-6)
    assert torch.equal(m.Mixed_4b.b0.bn.running_var, sd["inception4a.branch1.bn.running_var"])

    extra = dict(sd, **{"inception6a.branch1.conv.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"unexpected key\(s\): inception6a"):
        inflate_googlenet_into_i3d(extra, m)
    missing = {k: v for k, v in sd.items() if k != "inception4c.branch2.1.conv.weight"}
    with pytest.raises(WeightsError, match=r"missing key\(s\): inception4c\.branch2\.1\.conv\.weight"):
        inflate_googlenet_into_i3d(missing, m)
    expected = r"conv1\.conv\.weight \(64, 3, 7, 7\) -> Conv3d_1a_7x7\.conv3d\.weight \(8, 3, 7, 7, 7\)"
    with pytest.raises(WeightsError, match=expected):
        inflate_googlenet_into_i3d(sd, tiny())
