"""Training features: gradient accumulation, EMA, mixup/cutmix, layer-wise lr decay,
gradient checkpointing and multi-crop test views, each tested for what it does."""

from __future__ import annotations

import copy
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vtransfer.data.dataset import ClipDataset
from vtransfer.data.records import VideoRecord
from vtransfer.data.spatial_crops import crop_windows
from vtransfer.data.transforms import eval_clip_transform
from vtransfer.engine.ema import WeightEma
from vtransfer.utils.errors import ConfigError
from vtransfer.engine.feature_cache import clipset_key
from vtransfer.engine.lr_decay import layer_lr_scales, scales_by_param
from vtransfer.evaluation.metrics import EvalResult, classification_report, views_text
from vtransfer.engine.mixing import cutmix_clips, mix_batch, mixing_rng, mixup_clips
from vtransfer.models.base import LayerGroup, Preprocessing, VideoBackbone, module_buffer_names, module_param_names
from vtransfer.models.registry import build_backbone, training_defaults
from vtransfer.policies.freezing import PolicyPlan, apply_policy, resolve_policy
from vtransfer.reporting.report import eval_tables
from vtransfer.engine.trainer import Trainer, TrainablePart, build_optimizer, micro_batches
from vtransfer.run_config import ResolvedTraining, RunConfig, resolve_training

CPU = torch.device("cpu")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


class TinyNet(VideoBackbone):
    """stem (conv + BatchNorm) -> block (conv, pooled) -> head: three layer groups, seconds to train."""

    backbone_name = "tinynet"

    def __init__(self, classes: int = 3, batchnorm: bool = True):
        super().__init__()
        self.config = {"classes": classes, "batchnorm": batchnorm}
        self.preprocessing = Preprocessing(frames=4, stride=1, crop_size=(8, 8), resize_short=8)
        self.stem = nn.Conv3d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm3d(4) if batchnorm else nn.Identity()
        self.block = nn.Conv3d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, classes)

    def layer_groups(self) -> list[LayerGroup]:
        stem = module_param_names("stem", self.stem) + module_param_names("norm", self.norm)
        block = module_param_names("block", self.block)
        return [LayerGroup("stem", "spatial", stem, buffers=module_buffer_names("norm", self.norm)),
                LayerGroup("block", "temporal", block, temporal_params=list(block)),
                LayerGroup("head", "head", module_param_names("head", self.head))]

    def run_group(self, index, state):
        if index == 0:
            return torch.relu(self.norm(self.stem(state)))
        if index == 1:
            return torch.relu(self.block(state)).mean(dim=(2, 3, 4))
        return self.head(state)

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(6, num_classes)

    @property
    def num_classes(self) -> int:
        return self.head.out_features


def plan_all(model: VideoBackbone) -> PolicyPlan:
    """Every group trains."""
    return PolicyPlan(policy="all", trainable=[n for n, _ in model.named_parameters()],
                      trainable_groups=model.group_names(), first_trainable_group=0)


class OneBatch:
    """A prefix source serving the same batch every epoch."""

    def __init__(self, x, labels, repeat: int = 1):
        self.x, self.labels, self.repeat = x, labels, repeat

    def num_batches(self) -> int:
        return self.repeat

    def batches(self, epoch):
        for _ in range(self.repeat):
            yield self.x, self.labels, []


def trainer(model, config: ResolvedTraining, source=None, plan=None, **kw) -> Trainer:
    source = source or OneBatch(None, torch.zeros(0, dtype=torch.long))
    validate = kw.pop("validate", lambda m: (0.0, 0.0))
    save_best = kw.pop("save_best", lambda m, r: None)
    return Trainer(model, plan or plan_all(model), config, CPU, source, validate=validate, save_best=save_best,
                   save_state=lambda s: None, **kw)


def config(**changes) -> ResolvedTraining:
    """A resolved i3d training configuration; ``momentum`` and ``label_smoothing`` (not run options) set the view's."""
    fixed = {k: changes.pop(k) for k in ("momentum", "label_smoothing") if k in changes}
    base = dict(epochs=1, batch_size=8, lr=0.1, optimizer="sgd", weight_decay=1e-3, head_lr_scale=1.0,
                warmup_epochs=0.0, patience=0)
    resolved = resolve_training(RunConfig.from_options({**base, **changes}), training_defaults("i3d"))
    return dataclasses.replace(resolved, **fixed)


# --------------------------------------------------------------------------- options


def test_defaults_are_off_and_bad_values_name_the_valid_range():
    t = resolve_training(RunConfig(), training_defaults("vivit")).training
    assert (t.micro_batch, t.ema_decay, t.mixup, t.cutmix, t.layer_decay, t.grad_checkpointing) == (
        None, None, 0.0, 0.0, None, False)
    for bad, pattern in [({"micro_batch": 0}, r"--micro-batch must be at least 1"),
                         ({"ema_decay": 1.0}, r"--ema-decay must be in \[0, 1\)"),
                         ({"mixup": -0.2}, r"--mixup .* >= 0"),
                         ({"cutmix": float("nan")}, r"--cutmix .* >= 0"),
                         ({"layer_decay": 0.0}, r"--layer-decay must be in \(0, 1\]"),
                         ({"layer_decay": 1.5}, r"--layer-decay must be in \(0, 1\]")]:
        with pytest.raises(ConfigError, match=pattern):
            resolve_training(RunConfig.from_options(bad), training_defaults("vivit"))


# --------------------------------------------------------------------------- gradient accumulation


def test_micro_batches_cover_the_batch_with_an_uneven_last_slice():
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert micro_batches(5, None) == [slice(0, 5)]
    assert micro_batches(5, 8) == [slice(0, 5)]


@pytest.mark.parametrize("weighted", [False, True])
def test_accumulated_micro_batches_take_the_same_step_as_the_whole_batch(weighted):
    """ViViT tiny (LayerNorm, no BatchNorm, no dropout): 3 passes of 2+2+1 clips vs one pass of 5, one SGD step."""
    torch.manual_seed(0)
    base = build_backbone("vivit", "tiny", num_classes=3, dropout=0.0, attn_dropout=0.0, emb_dropout=0.0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in base.modules())
    apply_policy(base, resolve_policy(base, "all"))
    p = base.preprocessing
    x = torch.randn(5, 3, p.frames, *p.crop_size)
    labels = torch.tensor([0, 2, 1, 1, 2])
    weights = torch.tensor([0.5, 1.0, 2.0]) if weighted else None
    after = {}
    for micro in (None, 2):
        model = copy.deepcopy(base)
        t = trainer(model, config(micro_batch=micro, label_smoothing=0.1, momentum=0.0), loss_weights=weights)
        loss, correct = t.train_step(x, labels)
        after[micro] = (loss, {n: (q.detach().clone(), q.grad.clone()) for n, q in model.named_parameters()})
        assert t.scheduler.last_epoch == 1  # one schedule step per effective batch
    assert after[2][0] == pytest.approx(after[None][0], abs=1e-6)
    for name, (param, grad) in after[None][1].items():
        torch.testing.assert_close(after[2][1][name][1], grad, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(after[2][1][name][0], param, atol=1e-5, rtol=0, msg=name)
    moved = max(float((after[None][1][n][0] - q.detach()).abs().max()) for n, q in base.named_parameters())
    assert moved > 1e-4  # the step did change the weights


# --------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_formula_for_parameters_and_batchnorm_statistics(warmup):
    model = TinyNet()
    ema = WeightEma(model, decay=0.9, warmup=warmup)
    assert "norm.running_mean" in ema.names and "norm.num_batches_tracked" in ema.names
    expected = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}
    for k in range(3):
        with torch.no_grad():
            for q in model.parameters():
                q.add_(0.1 * (k + 1))
            model.norm.running_mean.add_(1.0)
            model.norm.num_batches_tracked.add_(1)
        ema.update(model)
        d = min(0.9, (1 + k) / (10 + k)) if warmup else 0.9  # warm-up: 0.1, 0.18, 0.25
        for n, t in model.state_dict().items():
            if n in expected:
                expected[n] = d * expected[n] + (1 - d) * t
    for n, value in expected.items():
        torch.testing.assert_close(ema.shadow[n], value, atol=1e-6, rtol=0, msg=n)
    assert int(ema.shadow["norm.num_batches_tracked"]) == 3  # integer buffers are copied
    raw = copy.deepcopy(model.state_dict())
    with ema.applied(model):
        torch.testing.assert_close(model.stem.weight, ema.shadow["stem.weight"])
        assert not torch.equal(model.stem.weight, raw["stem.weight"])  # EMA weights differ from the raw ones
    for n, t in model.state_dict().items():
        assert torch.equal(t, raw[n]), n  # the model's own weights are back


def test_ema_only_follows_trainable_groups():
    model = TinyNet()
    for n, q in model.named_parameters():
        q.requires_grad_(n.startswith("head"))
    assert WeightEma(model, 0.99).names == ["head.weight", "head.bias"]


def test_ema_weights_are_validated_saved_and_resumed():
    torch.manual_seed(0)
    model = TinyNet()
    x, labels = torch.randn(6, 3, 4, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    seen, saved = [], []
    cfg = config(epochs=2, ema_decay=0.5, micro_batch=4, layer_decay=0.5)
    t = trainer(model, cfg, OneBatch(x, labels, repeat=2),
                validate=lambda m: (seen.append(m.head.weight.detach().clone()), (0.5, 0.5))[1],
                save_best=lambda m, r: saved.append(m.head.weight.detach().clone()))
    state = t.fit()
    assert len(state.history) == 2
    torch.testing.assert_close(seen[-1], t.ema.shadow["head.weight"])
    torch.testing.assert_close(saved[-1], t.ema.shadow["head.weight"])
    assert not torch.equal(model.head.weight, t.ema.shadow["head.weight"])  # raw weights back after validation
    # layer decay: the record's lr is --lr times the schedule, not the first (slowest) group's
    assert state.history[0]["lr"] == pytest.approx(cfg.lr * t.scheduler.lr_lambdas[0](2))
    resumed = trainer(TinyNet(), cfg, OneBatch(x, labels, repeat=2))
    resumed.load_state_dict(t.state_dict())
    for n, value in t.ema.shadow.items():
        assert torch.equal(resumed.ema.shadow[n], value), n


class ShuffledBatches:
    """A prefix source serving ``x``/``labels`` in shuffled batches of ``batch``, a new order every epoch."""

    def __init__(self, x, labels, batch: int):
        self.x, self.labels, self.batch = x, labels, batch

    def num_batches(self) -> int:
        return len(self.labels) // self.batch

    def batches(self, epoch):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(epoch))
        for k in range(self.num_batches()):
            rows = order[k * self.batch:(k + 1) * self.batch]
            yield self.x[rows], self.labels[rows], []


def noisy_blobs(n: int, seed: int, flip: float = 0.0):
    """Two overlapping 6-d Gaussian classes (Bayes accuracy about 0.84), a ``flip`` fraction of labels wrong."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = (2.0 * labels - 1).unsqueeze(1) * 0.4 + torch.randn(n, 6, generator=g)
    if flip:
        labels = torch.where(torch.rand(n, generator=g) < flip, 1 - labels, labels)
    return x, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ema_weights_validate_no_worse_than_raw_where_the_steps_are_noisy(seed):
    """What EMA is for: SGD at a high lr on batches of 4 with 20% wrong labels jitters the raw head; its
    average does not. Both are validated every epoch (the raw number is in the history for the user)."""
    torch.manual_seed(seed)
    model = TinyNet(classes=2)
    plan = resolve_policy(model, "top-layer")
    apply_policy(model, plan)
    x_val, y_val = noisy_blobs(4000, 1000 + seed)

    def validate(m):
        with torch.no_grad():
            acc = float((m.head(x_val).argmax(1) == y_val).float().mean())
        return acc, acc

    x, labels = noisy_blobs(400, seed, flip=0.2)
    state = trainer(model, config(epochs=5, batch_size=4, lr=1.0, ema_decay=0.99), ShuffledBatches(x, labels, 4),
                    plan=plan, validate=validate).fit()
    ema = np.array([h["val_video_acc"] for h in state.history])
    raw = np.array([h["raw_val_video_acc"] for h in state.history])
    assert not np.array_equal(ema, raw)
    assert ema.mean() >= raw.mean() + 0.02  # measured: +0.06 to +0.15 over the five epochs
    assert ema.max() >= raw.max() - 0.005  # the saved (best) epoch
    assert ema[-1] >= raw[-1] - 0.005  # the lr has decayed to ~0: the two meet


def test_without_ema_the_history_has_no_raw_accuracy():
    torch.manual_seed(0)
    model = TinyNet()
    x, labels = torch.randn(6, 3, 4, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    state = trainer(model, config(epochs=1), OneBatch(x, labels)).fit()
    assert state.history[0]["raw_val_video_acc"] is None


@pytest.mark.parametrize("policy,stats_move", [("bitfit", False), ("all", True)])
def test_bitfit_trains_batchnorm_scale_and_shift_but_keeps_its_running_statistics(policy, stats_move):
    torch.manual_seed(0)
    model = TinyNet()
    plan = resolve_policy(model, policy)
    apply_policy(model, plan)
    before = copy.deepcopy(model.state_dict())
    x, labels = torch.randn(6, 3, 4, 8, 8) * 3 + 1, torch.tensor([0, 1, 2, 0, 1, 2])
    trainer(model, config(epochs=1), OneBatch(x, labels), plan=plan).fit()
    after = model.state_dict()
    assert "norm.weight" in plan.trainable and not torch.equal(before["norm.weight"], after["norm.weight"])
    assert (not torch.equal(before["norm.running_mean"], after["norm.running_mean"])) is stats_move
    assert (int(after["norm.num_batches_tracked"]) > 0) is stats_move


# --------------------------------------------------------------------------- mixup / cutmix


def test_mixup_blends_whole_clips_and_labels():
    x = torch.randn(4, 3, 5, 8, 10)
    labels = torch.tensor([0, 1, 2, 1])
    perm = torch.tensor([2, 0, 3, 1])
    mixed = mixup_clips(x, labels, 3, 0.3, perm)
    assert mixed.clips.shape == x.shape and mixed.targets.shape == (4, 3)
    torch.testing.assert_close(mixed.clips, 0.3 * x + 0.7 * x[perm])
    torch.testing.assert_close(mixed.targets.sum(1), torch.ones(4))
    assert mixed.targets[0].tolist() == pytest.approx([0.3, 0.0, 0.7])  # own label 0, partner's label 2


def test_cutmix_pastes_the_same_box_of_the_other_clip_into_every_frame():
    x = torch.randn(4, 3, 5, 16, 20)
    labels = torch.tensor([0, 1, 2, 1])
    perm = torch.tensor([1, 2, 3, 0])
    mixed = cutmix_clips(x, labels, 3, 0.6, perm, np.random.default_rng(3))
    top, left, h, w = mixed.box
    assert h > 0 and w > 0
    inside = torch.zeros(16, 20, dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    for i in range(4):
        for frame in range(5):
            assert torch.equal(mixed.clips[i, :, frame][:, inside], x[perm[i], :, frame][:, inside])
            assert torch.equal(mixed.clips[i, :, frame][:, ~inside], x[i, :, frame][:, ~inside])
    assert mixed.lam == pytest.approx(1 - h * w / (16 * 20))
    torch.testing.assert_close(mixed.targets.sum(1), torch.ones(4))
    assert mixed.targets[0, 0] == pytest.approx(mixed.lam) and mixed.targets[0, 1] == pytest.approx(1 - mixed.lam)


def test_mix_batch_depends_on_the_epoch_generator_only():
    x, labels = torch.randn(6, 3, 2, 8, 8), torch.arange(6) % 3
    a = mix_batch(x, labels, 3, mixup=0.8, cutmix=1.0, rng=mixing_rng(0, 4))
    b = mix_batch(x, labels, 3, mixup=0.8, cutmix=1.0, rng=mixing_rng(0, 4))
    assert torch.equal(a.clips, b.clips) and torch.equal(a.targets, b.targets)
    methods = {mix_batch(x, labels, 3, mixup=0.8, cutmix=1.0, rng=mixing_rng(0, e)).method for e in range(12)}
    assert methods == {"mixup", "cutmix"}
    with pytest.raises(ValueError, match="B x C x T x H x W"):
        mix_batch(torch.randn(6, 8), labels, 3, mixup=0.8, cutmix=0.0, rng=mixing_rng(0, 0))


def test_mixing_needs_the_trainable_part_to_start_at_the_clips():
    model = TinyNet()
    for n, q in model.named_parameters():
        q.requires_grad_(n.startswith("head"))
    plan = PolicyPlan(policy="top-layer", trainable=["head.weight", "head.bias"], trainable_groups=["head"],
                      first_trainable_group=2)
    with pytest.raises(ConfigError, match=r"--mixup mix input clips, but policy 'top-layer' freezes the first 2"):
        trainer(model, config(mixup=0.8), plan=plan)
    t = trainer(TinyNet(), config(mixup=0.8, cutmix=1.0))
    loss, correct = t.train_step(torch.randn(4, 3, 4, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert np.isfinite(loss) and 0 <= correct <= 4


# --------------------------------------------------------------------------- layer-wise lr decay


def test_layer_decay_gives_each_group_lr_times_decay_to_its_distance_from_the_head():
    model = TinyNet()
    assert layer_lr_scales(model, 0.5)["stem.weight"] == 0.25
    cfg = config(lr=0.1, layer_decay=0.5, head_lr_scale=10.0)
    params = list(model.parameters())
    opt = build_optimizer(params, cfg, head=list(model.head.parameters()), lr_scales=scales_by_param(model, 0.5))
    lr_of = {id(q): g["lr"] for g in opt.param_groups for q in g["params"]}
    wd_of = {id(q): g["weight_decay"] for g in opt.param_groups for q in g["params"]}
    assert lr_of[id(model.stem.weight)] == pytest.approx(0.025) and lr_of[id(model.norm.weight)] == pytest.approx(0.025)
    assert lr_of[id(model.block.weight)] == pytest.approx(0.05)
    assert lr_of[id(model.head.weight)] == pytest.approx(1.0)  # the head: full lr (times its own scale)
    assert wd_of[id(model.stem.bias)] == 0.0 and wd_of[id(model.stem.weight)] == 1e-3
    # without layer decay the parameter groups are today's: body decay/no-decay, head decay/no-decay
    plain = build_optimizer(params, cfg, head=list(model.head.parameters()))
    assert [g["lr"] for g in plain.param_groups] == pytest.approx([0.1, 0.1, 1.0, 1.0])


def test_layer_decay_over_vivit_blocks_in_the_trainer():
    model = build_backbone("vivit", "tiny", num_classes=3)
    t = trainer(model, config(lr=1e-3, layer_decay=0.8))
    names = model.group_names()  # embed, spatial.0, spatial.1, temporal.0, temporal.1, head
    lr_of = {id(q): g["lr"] for g in t.optimizer.param_groups for q in g["params"]}
    params = dict(model.named_parameters())
    for i, group in enumerate(model.layer_groups()):
        for name in group.params:
            assert lr_of[id(params[name])] == pytest.approx(1e-3 * 0.8 ** (len(names) - 1 - i)), name


# --------------------------------------------------------------------------- gradient checkpointing


def _grads(model, part, x, labels, seed=7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks
    loss = nn.functional.cross_entropy(part(x), labels)
    loss.backward()
    return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


@pytest.mark.parametrize("backbone,overrides,shape", [
    ("vivit", {"dropout": 0.1}, (3, 8, 64, 64)),
    ("i3d", {"frames": 10, "crop_size": 32}, (3, 10, 32, 32)),
])
def test_checkpointed_groups_give_the_same_gradients_and_batchnorm_statistics(backbone, overrides, shape):
    torch.manual_seed(0)
    model = build_backbone(backbone, "tiny", num_classes=3, **overrides)
    apply_policy(model, resolve_policy(model, "all"))
    model.train()
    twin = copy.deepcopy(model)
    x, labels = torch.randn(2, *shape), torch.tensor([0, 2])
    plain = _grads(model, TrainablePart(model, 0), x, labels)
    ckpt = _grads(twin, TrainablePart(twin, 0, grad_checkpointing=True), x, labels)
    assert plain.keys() == ckpt.keys() and len(plain) == sum(1 for _ in model.parameters())
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, atol=1e-6, rtol=0, msg=name)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name  # BatchNorm statistics advanced once, not twice
    with torch.no_grad():
        torch.testing.assert_close(TrainablePart(twin, 0, True).eval()(x), model.eval()(x), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_bench_memory_shows_lower_peak_memory_with_checkpointing():
    r = subprocess.run([sys.executable, str(BENCH / "bench_memory.py"), "--grad-checkpointing", "--quick",
                        "--threads", "1", "--backbones", "i3d"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = re.search(r"^i3d\s+\S+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", r.stdout, re.M)
    assert row, r.stdout
    plain, ckpt = float(row.group(1)), float(row.group(2))
    assert 0 < ckpt < plain, r.stdout


# --------------------------------------------------------------------------- multi-crop test views


class StripesReader:
    """Frames whose pixel values encode (frame, row, column): every window of a frame is distinct."""

    def __init__(self, height: int, width: int, frames: int = 40):
        self.height, self.width, self.frames = height, width, frames

    def num_frames(self, path) -> int:
        return self.frames

    def read_clip(self, path, start, num_frames, stride, short_side):
        t = torch.arange(start, start + num_frames * stride, stride).view(-1, 1, 1, 1)
        rows = torch.arange(self.height).view(1, 1, -1, 1)
        cols = torch.arange(self.width).view(1, 1, 1, -1)
        chan = torch.arange(3).view(1, -1, 1, 1)
        return ((t * 7 + rows * 3 + cols * 5 + chan) % 251).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _eval_set(crops: int, height: int = 40, width: int = 56, clips: int = 2):
    records = [VideoRecord(Path(f"/v/{c}/{i}.mp4"), c) for c in ("a", "b") for i in range(2)]
    prep = Preprocessing(frames=4, stride=2, crop_size=(32, 32), resize_short=40)
    return ClipDataset(records, {"a": 0, "b": 1}, prep, "eval", clips_per_video=clips, crops=crops,
                       reader=StripesReader(height, width))


def test_three_crops_are_the_two_ends_and_the_centre_of_the_long_side():
    assert crop_windows(40, 56, (32, 32), 3) == [(4, 0), (4, 12), (4, 24)]  # landscape: left, centre, right
    assert crop_windows(56, 40, (32, 32), 3) == [(0, 4), (12, 4), (24, 4)]  # portrait: top, centre, bottom
    one, three = _eval_set(1), _eval_set(3)
    assert len(three) == 3 * len(one) == 3 * 4 * 2
    assert three.views() == {"clips": 2, "crops": 3} and one.views() == {"clips": 2, "crops": 1}
    reader = StripesReader(40, 56)
    for video in range(4):
        for clip in range(2):
            single = one[video * 2 + clip]
            views = [three[video * 6 + clip * 3 + crop] for crop in range(3)]
            assert [v["view"] for v in views] == [clip * 3, clip * 3 + 1, clip * 3 + 2]
            assert torch.equal(views[1]["clip"], single["clip"])  # crop 1 of 3 is today's centre crop exactly
            _, start, _ = one.clip_plan(video * 2 + clip)
            frame = reader.read_clip(None, start, 4, 2, 40)
            for (top, left), view in zip(crop_windows(40, 56, (32, 32), 3), views):
                assert torch.equal(view["clip"], frame[..., top:top + 32, left:left + 32])
            assert not torch.equal(views[0]["clip"], views[2]["clip"])


def test_one_crop_is_the_centre_crop_transform_and_small_frames_are_upscaled_alike():
    one = _eval_set(1)
    assert repr(one.transform) == repr(eval_clip_transform((32, 32)))
    small = _eval_set(3, height=24, width=30)
    assert torch.equal(small[1]["clip"], _eval_set(1, height=24, width=30)[0]["clip"])
    assert small[0]["clip"].shape == (4, 3, 32, 32)
    assert clipset_key(_eval_set(1)) != clipset_key(_eval_set(3))  # cached eval features never mix crop counts


def test_crop_options_are_checked():
    with pytest.raises(ConfigError, match="--test-crops must be 1 .* or 3"):
        _eval_set(2)
    records = [VideoRecord(Path("/v/a/0.mp4"), "a")]
    prep = Preprocessing(frames=4, stride=2, crop_size=(32, 32), resize_short=40)
    with pytest.raises(ConfigError, match="evaluation only"):
        ClipDataset(records, {"a": 0}, prep, "train", crops=3, reader=StripesReader(40, 56))


def test_reports_state_the_views():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=12)  # 2 videos x 2 clips x 3 crops
    video = np.repeat([0, 1], 6)
    result = classification_report(probs, video, [0, 2], ["a", "b", "c"], views={"clips": 2, "crops": 3})
    assert result.num_clips == 12
    assert views_text(result.views) == "views = 2 clips × 3 crops"
    assert views_text({"clips": 10, "crops": 1}) == "views = 10 clips × 1 crop"
    assert EvalResult.from_dict(result.to_dict()).views == {"clips": 2, "crops": 3}
    summary = eval_tables(result)["summary"]
    assert ["Views", "views = 2 clips × 3 crops"] in summary.rows
    assert "views = 2 clips × 3 crops" in summary.caption
