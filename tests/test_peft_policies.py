"""Parameter-efficient policies: bitfit, lora (Hugging Face peft), adapter (ST-Adapter), attentive-probe."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vtransfer.utils.errors import ConfigError
from vtransfer.engine.feature_cache import prefix_fingerprint
from vtransfer.models.attentive_probe import AttentiveProbe
from vtransfer.models.base import LayerGroup, Preprocessing, VideoBackbone, check_groups_partition, module_param_names
from vtransfer.models.registry import build_backbone, presets
from vtransfer.models.st_adapter import STAdapter
from vtransfer.models.structured import StructuredBackbone, structure_of
from vtransfer.policies.peft import PolicyOptions, merge_lora, parameter_counts, prepare_model_for_policy
from vtransfer.loading.checkpoints import merge_lora_checkpoint
from vtransfer.policies.names import ALL_POLICY_NAMES
from vtransfer.policies.freezing import apply_policy, plan_policy, resolve_policy, set_train_mode
from vtransfer.loading.checkpoints import load_checkpoint, model_from_checkpoint
from vtransfer.weights.checkpoint import read_checkpoint_metadata, save_checkpoint

pytest.importorskip("peft")

FAMILIES = ("vivit", "i3d", "effnet3d")
#: Small clips for the tiny presets (effnet3d and I3D cost the most on a CPU).
GEOMETRY = {"vivit": {"image_size": 32}, "i3d": {"crop_size": 64, "frames": 9}, "effnet3d": {"crop_size": 32, "frames": 2}}
PEFT = ("bitfit", "lora", "adapter", "attentive-probe")
STRUCTURAL = ("lora", "adapter", "attentive-probe")
OPTIONS = PolicyOptions(probe_heads=4)


_BUILT: dict[str, VideoBackbone] = {}
_LOGITS: dict[str, torch.Tensor] = {}


def tiny(name: str) -> VideoBackbone:
    """A fresh copy of the family's tiny model with 3 classes (built once: effnet3d's init is slow)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = build_backbone(name, "tiny", num_classes=3, **GEOMETRY[name]).eval()
    return copy.deepcopy(_BUILT[name])


def plain_logits(name: str) -> torch.Tensor:
    """The plain tiny model's logits on :func:`clip` (computed once)."""
    if name not in _LOGITS:
        model = tiny(name)
        with torch.no_grad():
            _LOGITS[name] = model(clip(model))
    return _LOGITS[name]


def clip(model: VideoBackbone, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pp = model.preprocessing
    return torch.randn(batch, 3, pp.frames, *pp.crop_size, generator=g)


def prepared(name: str, policy: str):
    """The tiny model prepared for ``policy``, its plan applied."""
    model = prepare_model_for_policy(tiny(name), policy, OPTIONS)
    plan = resolve_policy(model, policy)
    apply_policy(model, plan)
    return model, plan


def head_params(model) -> set[str]:
    return set(model.layer_groups()[-1].params)


def perturb(model, names, scale: float = 0.05, seed: int = 3) -> None:
    """Move the named parameters away from their (often zero) initial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * scale)


# -- what trains --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_bitfit_trains_biases_norms_and_head(name):
    model, plan = prepared(name, "bitfit")
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, (nn.LayerNorm, nn.BatchNorm3d))
             for p in ("weight", "bias") if getattr(mod, p, None) is not None}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert set(plan.trainable) == norms | biases | head_params(model)
    assert plan.structure is None and type(model).__name__ == type(tiny(name)).__name__
    example = {"vivit": "spatial_blocks.0.norm1.weight", "i3d": "Mixed_4b.b1b.bn.weight", "effnet3d": "_blocks.1._bn0.weight"}
    assert example[name] in plan.trainable
    assert not [n for n in plan.trainable if n.endswith("weight") and n not in norms | head_params(model)]


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_trains_only_the_lora_factors_and_head(name):
    model, plan = prepared(name, "lora")
    check_groups_partition(model)
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert lora and set(plan.trainable) == lora | head_params(model)
    assert all(p.requires_grad == (n in set(plan.trainable)) for n, p in model.named_parameters())
    targets = structure_of(model)["targets"]
    if name == "vivit":  # qkv, proj, fc1, fc2 of the 2 spatial and 2 temporal blocks; not the patch embedding
        assert len(targets) == 16 and all(t.rpartition(".")[2] in ("qkv", "proj", "fc1", "fc2") for t in targets)
        assert not any(t.startswith("patch_embed") for t in targets)
    else:  # every ungrouped conv outside the classifier; effnet3d's depthwise convs stay plain
        convs = [n for n, m in tiny(name).named_modules() if isinstance(m, nn.Conv3d) and m.groups == 1]
        assert targets == [n for n in convs if not n.startswith(("logits", "_fc"))]
    # the first trainable group is the first with a LoRA layer: vivit's embed is a frozen (cacheable) prefix
    assert plan.first_trainable_group == (1 if name == "vivit" else 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_trains_only_the_adapters_and_head(name):
    model, plan = prepared(name, "adapter")
    check_groups_partition(model)
    adapters = {n for n, _ in model.named_parameters() if n.startswith("st_adapters.")}
    assert set(plan.trainable) == adapters | head_params(model)
    sites = {"vivit": ["spatial.0", "spatial.1"], "effnet3d": [f"stage{i}" for i in range(1, 8)],
             "i3d": ["Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b"]}
    assert structure_of(model)["sites"] == sites[name]
    groups = {g.name: g for g in model.layer_groups()}
    for site in sites[name]:  # each adapter's parameters are in its site's group, as temporal parameters
        own = [p for p in adapters if p.startswith(f"st_adapters.{site.replace('.', '_')}.")]
        assert own and set(own) <= set(groups[site].temporal_params) and groups[site].tag == "temporal"
    assert plan.first_trainable_group == [g.name for g in model.layer_groups()].index(sites[name][0])


@pytest.mark.parametrize("name", FAMILIES)
def test_attentive_probe_trains_only_the_probe_and_classifier(name):
    model, plan = prepared(name, "attentive-probe")
    check_groups_partition(model)
    n = len(model.layer_groups())
    assert plan.trainable_groups == ["head"] and plan.first_trainable_group == n - 1
    probe = {p for p, _ in model.named_parameters() if p.startswith("attentive_probe.")}
    assert probe and set(plan.trainable) == head_params(model) == probe | set(tiny(name).layer_groups()[-1].params)
    # same frozen weights, but the probe's prefix ends before the pooling: the feature cache must not share them
    assert prefix_fingerprint(model, n - 1) != prefix_fingerprint(tiny(name), n - 1)
    # below the unpooled group nothing changed, so its store derives from top-3's (compare-policies)
    assert prefix_fingerprint(model, n - 2) == prefix_fingerprint(tiny(name), n - 2)


def test_lora_on_vivit_b_trains_at_most_two_percent():
    with torch.device("meta"):  # real shapes, no memory
        model, plan = plan_policy(build_backbone("vivit", "vivit-b", num_classes=400), "lora", PolicyOptions())
    counts = parameter_counts(model, plan.trainable)
    per_block = 8 * ((768 + 3 * 768) + (768 + 768) + (768 + 3072) + (3072 + 768))  # r * (in + out) of each target
    assert counts["total"] == 115_062_928 + 16 * per_block
    assert counts["trainable"] == 16 * per_block + 400 * 768 + 400
    assert counts["fraction"] <= 0.02, counts
    json.dumps(plan.to_dict())
    assert plan.to_dict()["structure"]["kind"] == "lora" and plan.to_dict()["structure"]["rank"] == 8


# -- the added modules -----------------------------------------------------------------------


def test_st_adapter_is_a_depthwise_time_conv_bottleneck():
    torch.manual_seed(0)
    a = STAdapter(6, 4)
    assert tuple(a.conv.weight.shape) == (4, 1, 3, 1, 1) and torch.count_nonzero(a.up.weight) == 0
    nn.init.normal_(a.up.weight)
    x = torch.randn(2, 6, 5, 3, 2)
    z = torch.einsum("oc,bcthw->bothw", a.down.weight[:, :, 0, 0, 0], x) + a.down.bias[None, :, None, None, None]
    zp = F.pad(z, (0, 0, 0, 0, 1, 1))  # zero padding in time
    k = a.conv.weight[:, 0, :, 0, 0]  # per channel, 3 taps over time
    mixed = sum(k[None, :, j, None, None, None] * zp[:, :, j:j + 5] for j in range(3)) + a.conv.bias[None, :, None, None, None]
    want = x + torch.einsum("co,bothw->bcthw", a.up.weight[:, :, 0, 0, 0], mixed) + a.up.bias[None, :, None, None, None]
    torch.testing.assert_close(a(x), want, atol=1e-5, rtol=1e-5)

    tokens = STAdapter(6, 4, layout="tokens", skip_tokens=1)
    tokens.load_state_dict(a.state_dict())
    tok = torch.randn(2, 5, 1 + 6, 6)  # B x T' x (CLS + 6 patches) x D
    out = tokens(tok)
    assert torch.equal(out[:, :, 0], tok[:, :, 0])  # the CLS token passes through
    as_map = a(tok[:, :, 1:].permute(0, 3, 1, 2).unsqueeze(-1)).squeeze(-1).permute(0, 2, 3, 1)
    torch.testing.assert_close(out[:, :, 1:], as_map)


def test_attentive_probe_is_attention_weighted_pooling():
    torch.manual_seed(0)
    probe = AttentiveProbe(12, heads=3, attn_dim=6)
    fmap = torch.randn(2, 12, 2, 3, 3)  # a CNN map: 18 positions
    a = probe.attention(fmap)
    assert a.shape == (2, 3, 18)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3))
    v = probe.to_v(probe.norm(fmap.flatten(2).transpose(1, 2))).view(2, 18, 3, 2)
    pooled = torch.einsum("bhn,bnhd->bhd", a, v).reshape(2, 6)
    torch.testing.assert_close(probe(fmap), probe.to_out(pooled), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe(fmap), probe(fmap.flatten(2).transpose(1, 2)))  # a map is its positions' tokens


def test_frozen_batchnorm_statistics_stay_fixed_under_lora():
    model, _plan = prepared("i3d", "lora")
    bn = model.Mixed_4b.b1b.bn
    before = bn.running_mean.clone()
    set_train_mode(model, True)
    assert not bn.training and model.Mixed_4b.b1b.conv3d.training  # the LoRA layer trains, the BN is frozen
    model(clip(model))
    assert torch.equal(before, bn.running_mean)


# -- merge and checkpoints -------------------------------------------------------------------


def _train_steps(model, plan, steps: int = 2, batch: int = 2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = clip(model, batch, seed=5)
    y = torch.arange(batch) % model.num_classes
    set_train_mode(model, True)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_lora_equals_the_unmerged_model(name, tmp_path):
    model, plan = prepared(name, "lora")
    _train_steps(model, plan)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if ".lora_B." in n)  # the update moved
    x = clip(model)
    with torch.no_grad():
        unmerged = model(x)
    path = save_checkpoint(tmp_path / "lora.safetensors", model, classes=["a", "b", "c"])
    merged = merge_lora(model)
    assert type(merged).__name__ == type(tiny(name)).__name__ and structure_of(merged) is None
    assert not [n for n in merged.state_dict() if "lora" in n or "base_layer" in n]
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max().item() <= 1e-5
        assert (merged(x) - plain_logits(name)).abs().max().item() > 1e-3  # the folded-in update is there

    merge_lora_checkpoint(path)  # the saved file is rewritten as a plain model
    assert "structure" not in read_checkpoint_metadata(path)
    plain, ckpt = model_from_checkpoint(path)
    assert ckpt.training["lora_merged"]["kind"] == "lora" and not isinstance(plain, StructuredBackbone)
    with torch.no_grad():
        assert (plain(x) - unmerged).abs().max().item() <= 1e-5


#: The map before global pooling that the attentive probe reads (and the feature cache stores), 2 clips.
UNPOOLED = {"vivit": (2, 1 + 4, 64), "i3d": (2, 128, 2, 2, 2), "effnet3d": (2, 1280, 2, 1, 1)}
WIDTH = {"vivit": 64, "i3d": 128, "effnet3d": 1280}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("policy", STRUCTURAL)
def test_structure_starts_pretrained_splits_at_the_cache_and_reloads(name, policy, tmp_path):
    model, plan = prepared(name, policy)
    x = clip(model)
    n, k = len(model.layer_groups()), plan.first_trainable_group
    if policy != "attentive-probe":  # zero-initialised up-projection / LoRA B: the pretrained network at step 0
        with torch.no_grad():
            assert (model(x) - plain_logits(name)).abs().max().item() <= 1e-6
    perturb(model, plan.trainable)  # as training would move them
    with torch.no_grad():
        prefix = model.forward_groups(x, 0, k)  # what the frozen-prefix feature cache stores
        split = model.forward_groups(prefix, k, n)
        want = model(x)
    torch.testing.assert_close(split, want)
    if policy == "attentive-probe":
        assert prefix.shape == UNPOOLED[name] and model.features(x).shape == (2, WIDTH[name])

    path = save_checkpoint(tmp_path / "m.safetensors", model, classes=["a", "b", "c"], training={"policy": plan.to_dict()})
    assert read_checkpoint_metadata(path)["structure"] == structure_of(model)
    loaded, ckpt = model_from_checkpoint(path)
    assert type(loaded) is type(model) and structure_of(loaded) == structure_of(model)
    assert ckpt.training["policy"]["structure"] == structure_of(model)
    with torch.no_grad():
        assert (loaded(x) - want).abs().max().item() <= 1e-6
    assert load_checkpoint(path).backbone == name  # the header-and-shapes check rebuilds it on the meta device
    assert resolve_policy(loaded, policy).trainable == plan.trainable


# -- training ----------------------------------------------------------------------------------


def _direction_task(model, n: int = 8):
    """Clips that brighten over time (class 1) or darken (class 0), with random offsets and noise."""
    g = torch.Generator().manual_seed(7)
    pp = model.preprocessing
    labels = torch.arange(n) % 2
    ramp = torch.linspace(-1, 1, pp.frames)
    sign = labels.float() * 2 - 1
    x = sign[:, None, None, None, None] * ramp[None, None, :, None, None] + 0.3 * torch.randn(n, 1, 1, 1, 1, generator=g)
    return x.expand(n, 3, pp.frames, *pp.crop_size) + 0.2 * torch.randn(n, 3, pp.frames, *pp.crop_size, generator=g), labels


@pytest.mark.parametrize("policy", PEFT)
def test_short_training_learns_a_temporal_task(policy):
    model, plan = prepared("vivit", policy)
    x, y = _direction_task(model)
    k, n = plan.first_trainable_group, len(model.layer_groups())
    with torch.no_grad():
        prefix = model.forward_groups(x, 0, k)  # the frozen prefix, run once as the feature cache does

    def accuracy() -> float:
        with torch.no_grad():
            return (model.forward_groups(prefix, k, n).argmax(1) == y).float().mean().item()

    before = accuracy()
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    set_train_mode(model, True)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model.forward_groups(prefix, k, n), y).backward()
        opt.step()
    model.eval()
    after = accuracy()
    assert after >= 0.9 and after > before, (before, after)
    moved = [name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[name])]
    assert set(moved) == set(plan.trainable)  # every promised parameter learned, the policy's own ones included


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -2])
def test_rank_below_one_is_refused_before_any_surgery(rank):
    model = tiny("vivit")
    with pytest.raises(ConfigError, match=r"--lora-rank must be an integer >= 1"):
        prepare_model_for_policy(model, "lora", PolicyOptions(lora_rank=rank))
    assert not isinstance(model, StructuredBackbone)


def test_unknown_lora_target_names_the_valid_layers():
    with pytest.raises(ConfigError, match=r"'attn_out' matches no layer .*layer names: .*fc1, fc2, .*qkv"):
        prepare_model_for_policy(tiny("vivit"), "lora", PolicyOptions(lora_targets=("attn_out",)))
    model = prepare_model_for_policy(tiny("vivit"), "lora", PolicyOptions(lora_targets=("qkv", "temporal_blocks.*.fc2")))
    assert structure_of(model)["targets"] == ["spatial_blocks.0.qkv", "spatial_blocks.1.qkv", "temporal_blocks.0.qkv",
                                              "temporal_blocks.0.fc2", "temporal_blocks.1.qkv", "temporal_blocks.1.fc2"]


class DepthwiseOnly(VideoBackbone):
    """A CNN whose only convolution is depthwise (peft cannot merge it) and whose only Linear is the classifier."""

    backbone_name = "depthwise-only"

    def __init__(self):
        super().__init__()
        self.config = {}
        self.preprocessing = Preprocessing(frames=4, stride=1, crop_size=(8, 8), resize_short=8)
        self.dw = nn.Conv3d(3, 3, 3, padding=1, groups=3)
        self.bn = nn.BatchNorm3d(3)
        self.fc = nn.Linear(3, 2)

    def layer_groups(self):
        return [LayerGroup("body", "temporal", module_param_names("dw", self.dw) + module_param_names("bn", self.bn)),
                LayerGroup("head", "head", module_param_names("fc", self.fc))]

    def run_group(self, index, state):
        return self.bn(self.dw(state)).mean(dim=(2, 3, 4)) if index == 0 else self.fc(state)


def test_policies_that_do_not_fit_the_backbone_name_the_choices():
    with pytest.raises(ConfigError, match=r"no layer LoRA can adapt .*use bitfit, adapter, attentive-probe"):
        prepare_model_for_policy(DepthwiseOnly(), "lora")
    sf = build_backbone("slowfusion", "tiny", num_classes=2)
    with pytest.raises(ConfigError, match=r"policy 'adapter': .*'slowfusion'.*i3d, vivit, effnet3d"):
        prepare_model_for_policy(sf, "adapter")
    with pytest.raises(ConfigError, match=r"policy 'attentive-probe': .*'slowfusion'.*i3d, vivit, effnet3d"):
        prepare_model_for_policy(sf, "attentive-probe")
    with pytest.raises(ConfigError, match=r"--probe-heads 5 does not divide the probe width 64; choose one of 1, 2, 4, 8"):
        prepare_model_for_policy(tiny("vivit"), "attentive-probe", PolicyOptions(probe_heads=5))
    with pytest.raises(ConfigError, match=r"--merge .* --policy lora only"):
        prepare_model_for_policy(tiny("vivit"), "adapter", PolicyOptions(merge=True))
    if "tiny-joint" in presets("vivit"):  # ViViT model 1: every block attends across frames
        joint = build_backbone("vivit", "tiny-joint", num_classes=2)
        with pytest.raises(ConfigError, match=r"variant 'joint' has no spatial-only blocks"):
            prepare_model_for_policy(joint, "adapter")


def test_resolving_a_structural_policy_needs_the_surgery_first():
    with pytest.raises(ConfigError, match=r"policy 'lora' adds modules .*is a plain model: call .*prepare_model_for_policy"):
        resolve_policy(tiny("vivit"), "lora")
    adapted = prepare_model_for_policy(tiny("vivit"), "adapter", OPTIONS)
    with pytest.raises(ConfigError, match=r"policy 'attentive-probe' .*carries a 'adapter' structure"):
        resolve_policy(adapted, "attentive-probe")
    with pytest.raises(ConfigError, match=r"one parameter-efficient policy"):
        prepare_model_for_policy(adapted, "lora", OPTIONS)
    with pytest.raises(ConfigError, match=r"unknown policy 'lora2'.*bitfit, lora, adapter, attentive-probe"):
        resolve_policy(tiny("vivit"), "lora2")
    assert set(PEFT) <= set(ALL_POLICY_NAMES)
    model, plan = plan_policy(tiny("vivit"), "lora", train_groups=["temporal.1"])  # a --train set adds nothing
    assert plan.policy == "custom" and plan.structure is None and not isinstance(model, StructuredBackbone)


def test_the_probe_trains_at_the_base_rate_and_only_its_classifier_at_the_head_rate():
    """effnet3d's 10x classifier rate applied to the probe's attention made its loss run to 40-80 on real clips."""
    from vtransfer.engine.trainer import Trainer
    from vtransfer.models.registry import training_defaults
    from vtransfer.run_config import RunConfig, resolve_training

    model, plan = plan_policy(build_backbone("effnet3d", "tiny", num_classes=3), "attentive-probe")
    apply_policy(model, plan)
    config = resolve_training(RunConfig.from_options(epochs=1, batch_size=2), training_defaults("effnet3d"))
    source = type("S", (), {"num_batches": lambda self: 1, "batches": lambda self, epoch: iter(())})()
    trainer = Trainer(model, plan, config, torch.device("cpu"), source, lambda m: (0.0, 0.0), lambda m, r: None,
                      save_state=lambda state: None)
    rate = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    probe = [n for n in plan.trainable if n.startswith("attentive_probe.")]
    classifier = [n for n in plan.trainable if not n.startswith("attentive_probe.")]
    assert probe and classifier
    assert {rate[id(named[n])] for n in probe} == {config.lr}
    assert {rate[id(named[n])] for n in classifier} == {config.lr * config.head_lr_scale} != {config.lr}
