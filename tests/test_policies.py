"""Freezing policies over every backbone's layer groups."""

from __future__ import annotations

import pytest
import torch

from vtransfer.utils.errors import ConfigError
from vtransfer.models.registry import build_backbone
from vtransfer.policies.names import FREEZING_POLICY_NAMES
from vtransfer.policies.freezing import apply_policy, frozen_modules, resolve_policy, set_train_mode

BACKBONES = ("slowfusion", "i3d", "vivit", "effnet3d")


def tiny(name: str, classes: int = 4):
    torch.manual_seed(0)
    return build_backbone(name, "tiny", num_classes=classes)


@pytest.mark.parametrize("name", BACKBONES)
def test_top_layer_trains_only_the_head(name):
    m = tiny(name)
    plan = resolve_policy(m, "top-layer")
    head = m.layer_groups()[-1]
    assert plan.trainable == [p for p, _ in m.named_parameters() if p in set(head.params)]
    assert plan.first_trainable_group == len(m.layer_groups()) - 1
    assert plan.trainable_count(m) == sum(dict(m.named_parameters())[p].numel() for p in head.params)


@pytest.mark.parametrize("name", BACKBONES)
def test_top3_is_the_last_three_groups(name):
    m = tiny(name)
    plan = resolve_policy(m, "top-3")
    assert plan.trainable_groups == [g.name for g in m.layer_groups()[-3:]]


def test_top3_on_slowfusion_is_fc6_fc7_classifier():
    plan = resolve_policy(tiny("slowfusion"), "top-3")
    assert plan.trainable_groups == ["fc6", "fc7", "head"]


def test_temporal_policy_per_backbone():
    vivit = tiny("vivit")
    plan = resolve_policy(vivit, "temporal")
    assert all(g.startswith("temporal") or g == "head" for g in plan.trainable_groups)
    assert plan.first_trainable_group == vivit.group_names().index("temporal.0")

    sf = resolve_policy(tiny("slowfusion"), "temporal")
    assert sf.trainable_groups == ["conv1", "conv2", "conv3", "head"]

    i3d = tiny("i3d")
    plan = resolve_policy(i3d, "temporal")
    params = dict(i3d.named_parameters())
    # inside an Inception block, only convs with temporal extent > 1 (and their BN) train
    assert "Mixed_4b.b1b.conv3d.weight" in plan.trainable
    assert "Mixed_4b.b0.conv3d.weight" not in plan.trainable
    for name in plan.trainable:
        if name.endswith("conv3d.weight") and not name.startswith("logits"):
            assert params[name].shape[2] > 1, name


def test_all_and_scratch_train_everything():
    m = tiny("i3d")
    total = sum(p.numel() for p in m.parameters())
    assert resolve_policy(m, "all").trainable_count(m) == total
    plan = resolve_policy(m, "scratch")
    assert plan.reinit and plan.trainable_count(m) == total


def test_custom_groups_with_globs_and_head_always_trains():
    m = tiny("vivit")
    plan = resolve_policy(m, "top-layer", train_groups=["spatial*", "temporal*"])
    assert plan.policy == "custom"
    assert plan.trainable_groups == [g for g in m.group_names() if g != "embed"]


def test_unknown_policy_and_group_errors_list_valid_names():
    m = tiny("i3d")
    with pytest.raises(ConfigError, match="top-3"):
        resolve_policy(m, "top-7")
    with pytest.raises(ConfigError, match="Mixed_4b"):
        resolve_policy(m, "all", train_groups=["nonexistent*"])


def test_temporal_without_temporal_layers_is_an_error():
    m = build_backbone("slowfusion", "tiny", num_classes=3, fusion="single")
    with pytest.raises(ConfigError, match="mix information across time"):
        resolve_policy(m, "temporal")


def test_apply_policy_and_frozen_batchnorm_stays_fixed():
    m = tiny("i3d")
    plan = resolve_policy(m, "top-3")
    apply_policy(m, plan)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(plan.trainable)
    set_train_mode(m, True)
    bn = m.Mixed_3b.b0.bn
    assert not bn.training  # frozen BatchNorm in eval mode
    assert m.Mixed_5c.b0.bn.training  # trainable BatchNorm in train mode
    before = bn.running_mean.clone()
    m(torch.randn(2, 3, 16, 112, 112))
    assert torch.equal(before, bn.running_mean)
    assert any(mod is m.Mixed_3b for mod in frozen_modules(m))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("policy", FREEZING_POLICY_NAMES)
def test_prefix_split_equals_full_forward(name, policy):
    m = tiny(name).eval()
    plan = resolve_policy(m, policy)
    pp = m.preprocessing
    x = torch.randn(2, 3, pp.frames, *pp.crop_size)
    n = len(m.layer_groups())
    with torch.no_grad():
        h = m.forward_groups(x, 0, plan.first_trainable_group)
        split = m.forward_groups(h, plan.first_trainable_group, n)
        full = m(x)
    torch.testing.assert_close(split, full)


DROPOUT = {"slowfusion": dict(dropout=0.5), "i3d": dict(dropout=0.5),
           "vivit": dict(dropout=0.3, attn_dropout=0.2, emb_dropout=0.5), "effnet3d": dict(dropout=0.5)}


@pytest.mark.parametrize("name", BACKBONES)
def test_every_dropout_belongs_to_one_group(name):
    """A dropout module either sits inside a module with parameters or is listed by exactly one group."""
    m = build_backbone(name, "tiny", num_classes=4, **DROPOUT[name])
    listed = [mod for g in m.layer_groups() for mod in g.modules]
    assert len(listed) == len(set(listed))
    for mod_name, mod in m.named_modules():
        if not isinstance(mod, torch.nn.Dropout):
            continue
        parent = mod_name.rpartition(".")[0]
        inside_params = bool(parent) and any(True for _ in m.get_submodule(parent).parameters())
        assert inside_params or mod_name in listed, mod_name


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("policy", FREEZING_POLICY_NAMES)
def test_frozen_groups_are_fixed_functions_in_training(name, policy):
    """With dropout on, every fully frozen group gives the same output twice in train mode, equal to eval mode."""
    torch.manual_seed(0)
    m = build_backbone(name, "tiny", num_classes=4, **DROPOUT[name])
    plan = resolve_policy(m, policy)
    apply_policy(m, plan)
    pp = m.preprocessing
    x = torch.randn(2, 3, pp.frames, *pp.crop_size)
    trainable = set(plan.trainable)
    frozen = [i for i, g in enumerate(m.layer_groups()) if not trainable.intersection(g.params)]
    with torch.no_grad():
        for i in frozen:
            m.eval()
            state = m.forward_groups(x, 0, i)
            expected = m.run_group(i, state)
            set_train_mode(m, True)
            first, second = m.run_group(i, state), m.run_group(i, state)
            for a in (first, second):
                for got, want in zip(a if isinstance(a, tuple) else (a,), expected if isinstance(expected, tuple) else (expected,)):
                    torch.testing.assert_close(got, want, msg=f"{name}/{policy}: group {m.layer_groups()[i].name}")
    if policy in ("all", "scratch"):
        assert frozen == []
