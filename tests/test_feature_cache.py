"""Frozen-prefix feature cache: the same model as live decoding, shared stores, run order, fast paths."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import vtransfer.api as api
from checkpoints import random_checkpoints
from vtransfer.api import ClipOptions, evaluate_records, plan_comparison, shallow_prefixes_first, shared_reader
from vtransfer.engine.batches import LivePrefixSource
from vtransfer.data.dataset import ClipDataset
from vtransfer.data.scan import load_dataset
from vtransfer.engine.feature_cache import CachedPrefixSource, clear_stores, get_store
from vtransfer.models.registry import build_backbone, training_defaults
from vtransfer.policies.freezing import apply_policy, resolve_policy, set_train_mode
from vtransfer.models.registry import preferred_memory_format
from vtransfer.engine.trainer import Trainer, build_optimizer
from vtransfer.run_config import RunConfig, resolve_training

CPU = torch.device("cpu")
GEOMETRY = {name: api.geometry_overrides(name, "tiny", None, None, None if name == "vivit" else 32)
            for name in ("i3d", "slowfusion", "vivit")}


@pytest.fixture(scope="module")
def data(demo_datasets):
    return demo_datasets("target", class_set="target", videos_per_class=3, frames=16, size=40, seed=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Random tiny checkpoints standing in for pretrained weights."""
    return random_checkpoints(tmp_path_factory.mktemp("fc-weights"), classes=5, seed=3, overrides=GEOMETRY)


def _train(model, plan, source, epochs: int = 3):
    options = RunConfig.from_options(epochs=epochs, batch_size=4, lr=0.05, optimizer="sgd", weight_decay=1e-4, patience=0)
    config = resolve_training(options, training_defaults(model.backbone_name))
    torch.manual_seed(0)  # dropout masks: the same on both sides
    trainer = Trainer(model, plan, config, CPU, source, validate=lambda m: (0.0, 0.0), save_best=lambda m, r: None,
                      save_state=lambda s: None, train_size=len(source.labels))
    return trainer.fit().history


@pytest.mark.parametrize("backbone,policy", [("i3d", "top-3"), ("slowfusion", "top-layer"), ("vivit", "temporal")])
def test_cached_prefix_trains_the_same_model_as_live_decoding(data, backbone, policy):
    """Cached prefix activations and decoding + prefix every epoch: same clips, same model up to rounding."""
    index = load_dataset(data)
    records = index.records
    torch.manual_seed(5)
    base = build_backbone(backbone, "tiny", num_classes=len(index.classes), **GEOMETRY[backbone])
    plan = resolve_policy(base, policy)
    apply_policy(base, plan)
    k = plan.first_trainable_group
    assert k > 0
    labels = [index.class_to_idx[r.label] for r in records]
    reader = shared_reader("memory", data / "unused", records, base.preprocessing)
    views = 2
    dataset = ClipDataset(records, index.class_to_idx, base.preprocessing, "train", fixed_views=views, seed=0, reader=reader)

    cached, live = copy.deepcopy(base), copy.deepcopy(base)
    clear_stores()
    set_train_mode(cached, True)
    store = get_store(cached, dataset, k, 4, 0, CPU, "fp32")
    hist_cached = _train(cached, plan, CachedPrefixSource(store, labels, views, 4, 0, CPU))
    hist_live = _train(live, plan, LivePrefixSource(dataset, labels, live, k, 4, 0, CPU, seed=0, views=views))

    assert [h["train_loss"] for h in hist_cached] == pytest.approx([h["train_loss"] for h in hist_live], rel=1e-4, abs=1e-5)
    before, a, b = base.state_dict(), cached.state_dict(), live.state_dict()
    trained = set(plan.trainable)
    assert any(not torch.equal(before[n], a[n]) for n in trained)  # it did train
    for name in before:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
        if name in dict(base.named_parameters()) and name not in trained:
            assert torch.equal(a[name], before[name]), f"frozen {name} changed"


def test_cached_evaluation_equals_full_forward(data, pretrained):
    index = load_dataset(data)
    from vtransfer.loading.checkpoints import model_from_checkpoint

    model, _ = model_from_checkpoint(pretrained["i3d"])
    model.reset_classifier(len(index.classes))
    plan = resolve_policy(model, "top-layer")
    apply_policy(model, plan)
    opts = ClipOptions(frames=None, stride=None, size=None, clips_per_video=2, val_clips=1, batch_size=4, workers=0,
                       cache="memory", cache_dir=None, cached_views=None, crop_scale=None)
    reader = shared_reader("memory", data / "unused", index.records, model.preprocessing)
    clear_stores()
    full, preds_full = evaluate_records(model, index.records, index.classes, opts, CPU, reader=reader)
    cached, preds_cached = evaluate_records(model, index.records, index.classes, opts, CPU, reader=reader,
                                            prefix_stop=plan.first_trainable_group)
    torch.testing.assert_close(torch.from_numpy(preds_cached.probs), torch.from_numpy(preds_full.probs), rtol=1e-4, atol=1e-6)
    assert (preds_cached.video == preds_full.video).all()
    assert cached.video_hit1 == full.video_hit1


def test_compare_shares_stores_shallowest_first_and_gives_the_same_models(data, pretrained, tmp_path):
    """top-3 runs first, top-layer's store is derived from it, and both equal runs made on their own."""
    kw = dict(backbone="i3d", weights=str(pretrained["i3d"]), epochs=2, batch_size=4, clips_per_video=1, val_clips=1,
              workers=0, patience=0, device="cpu", cache="memory", cached_views=2)
    ran = []
    clear_stores()
    res = api.compare_policies(data, policies=["top-layer", "top-3"], out=tmp_path / "cmp",
                               on_policy=lambda p, s: ran.append(p), **kw)
    assert ran == ["top-3", "top-layer"]
    assert [r.policy for r in res.rows] == ["top-layer", "top-3"]
    for policy in ("top-layer", "top-3"):
        clear_stores()
        alone = api.finetune(data, policy=policy, out=tmp_path / policy, manifest=tmp_path / "cmp" / "split.csv", **kw)
        shared, own = load_file(tmp_path / "cmp" / policy / "model.safetensors"), load_file(alone.model_path)
        for name in own:
            torch.testing.assert_close(shared[name], own[name], rtol=1e-4, atol=1e-5, msg=f"{policy}: {name}")


def test_run_order_puts_shallow_prefixes_first(pretrained):
    five = ["scratch", "top-layer", "top-3", "temporal", "all"]
    i3d = dict(backbone="i3d", weights=str(pretrained["i3d"]))
    assert plan_comparison(five, i3d) == (["scratch", "top-3", "top-layer", "temporal", "all"], {})
    vivit = dict(backbone="vivit", weights=str(pretrained["vivit"]))
    model = build_backbone("vivit", "tiny", num_classes=2)
    depth = {p: resolve_policy(model, p).first_trainable_group for p in ("top-layer", "top-3", "temporal")}
    expected = iter(sorted(("top-layer", "top-3", "temporal"), key=depth.get))
    assert plan_comparison(five, vivit)[0] == [p if p in ("scratch", "all") else next(expected) for p in five]
    assert shallow_prefixes_first(["all", "top-layer", "top-3"], {"all": 0, "top-layer": 5, "top-3": 3}) == [
        "all", "top-3", "top-layer"]


def test_a_comparison_that_cannot_run_fails_before_any_work(pretrained, tmp_path):
    from vtransfer.utils.errors import ConfigError, WeightsError

    five = ["scratch", "top-layer", "top-3", "temporal", "all"]
    with pytest.raises(WeightsError, match="no such file"):
        plan_comparison(five, dict(backbone="i3d", weights="no/such/file"))
    with pytest.raises(ConfigError, match=r"unknown 'top3'; choose from scratch, top-layer, top-3"):
        plan_comparison(["scratch", "top3"], dict(backbone="i3d", weights=str(pretrained["i3d"])))
    with pytest.raises(WeightsError, match="holds a backbone of type vivit"):
        plan_comparison(five, dict(backbone="i3d", weights=str(pretrained["vivit"])))
    with pytest.raises(ConfigError, match="unknown 'top3'"):  # nothing trained, no folder made
        api.compare_policies(tmp_path / "no-data", policies=["scratch", "top3"], out=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_channels_last_only_where_measured_faster():
    for precision in ("fp32", "bf16"):
        assert preferred_memory_format("i3d", precision, CPU) == torch.channels_last_3d
        assert preferred_memory_format("slowfusion", precision, CPU) == torch.contiguous_format
        assert preferred_memory_format("vivit", precision, CPU) == torch.contiguous_format
    assert preferred_memory_format("i3d", "fp32", torch.device("cuda")) == torch.contiguous_format


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_optimizer_matches_the_default_update(optimizer):
    torch.manual_seed(0)
    model = build_backbone("i3d", "tiny", num_classes=4, **GEOMETRY["i3d"])
    params = [p for p in model.parameters()]
    options = RunConfig.from_options(optimizer=optimizer, lr=0.01, weight_decay=0.01)
    config = resolve_training(options, training_defaults("i3d"))
    copies = {kind: [p.detach().clone().requires_grad_() for p in params] for kind in ("fused", "plain")}
    opts = {"fused": build_optimizer(copies["fused"], config), "plain": build_optimizer(copies["plain"], config, fused=False)}
    assert opts["fused"].defaults.get("fused") is True and not opts["plain"].defaults.get("fused")
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for kind, opt in opts.items():
            for p, g in zip(copies[kind], grads):
                p.grad = g.clone()
            opt.step()
    for a, b, p in zip(copies["fused"], copies["plain"], params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, p)
