"""--stream two-stream: the fused model, its checkpoint, its clips, the fusion weight, and a whole run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vtransfer import api
from vtransfer.data.decode import DirectReader
from vtransfer.data.flow_reader import DirectFlowReader
from vtransfer.data.flow_settings import FlowSettings
from vtransfer.data.preprocessing import Preprocessing
from vtransfer.data.transforms import TrainClipTransform
from vtransfer.data.two_stream_reader import TwoStreamReader
from vtransfer.engine import feature_cache
from vtransfer.evaluation.fusion import choose_fusion_weight, fuse_probabilities, paired_clips
from vtransfer.loading.backbone import stream_weights
from vtransfer.loading.checkpoints import model_from_checkpoint
from vtransfer.models.base import check_groups_partition
from vtransfer.models.two_stream import TwoStreamBackbone
from vtransfer.utils.errors import ConfigError
from vtransfer.weights.checkpoint import save_checkpoint
from vtransfer.workflows.run_model import build_run_model

TINY = {"backbone": "effnet3d", "frames": 4, "stride": 2, "size": 48, "flow_method": "farneback", "policy": "scratch"}
RUN = {"backbone": "effnet3d", "frames": 4, "stride": 2, "size": 48, "flow_method": "farneback", "epochs": 2,
       "clips_per_video": 2, "val_clips": 1, "policy": "top-layer"}


def _pair(flow_weight: float = 0.3, rule: str = "mean") -> TwoStreamBackbone:
    torch.manual_seed(0)
    rgb, _ = build_run_model({**TINY, "stream": "rgb"}, num_classes=3)
    flow, _ = build_run_model({**TINY, "stream": "flow", "flow_channels": 2}, num_classes=3)
    return TwoStreamBackbone(rgb.eval(), flow.eval(), flow_weight, fusion_rule=rule).eval()


@pytest.mark.parametrize("rule", ["mean", "geometric"])
def test_the_fused_output_is_the_weighted_mean_of_the_streams_probabilities(rule):
    model = _pair(0.3, rule)
    clip = torch.randn(2, 5, 4, 48, 48)
    with torch.no_grad():
        fused = torch.softmax(model(clip), dim=1)
        p_rgb = torch.softmax(model.rgb(clip[:, :3]), dim=1)
        p_flow = torch.softmax(model.flow(clip[:, 3:]), dim=1)
        features = model.features(clip)
    if rule == "mean":
        expected = 0.7 * p_rgb + 0.3 * p_flow
    else:  # the weighted geometric mean, renormalised
        expected = p_rgb ** 0.7 * p_flow ** 0.3
        expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(fused, expected, atol=1e-6)
    assert features.shape == (2, model.rgb.features(clip[:, :3]).shape[1] * 2)
    check_groups_partition(model)
    assert [g.tag for g in model.layer_groups()] == ["temporal", "head"]
    assert model.preprocessing.channels == 5 and model.preprocessing.flow_from == 3


@pytest.mark.parametrize("rule", ["mean", "geometric"])
def test_a_weight_of_zero_is_the_rgb_stream_alone_and_one_the_flow_stream(rule):
    clip = torch.randn(1, 5, 4, 48, 48)
    with torch.no_grad():
        for weight, stream in ((0.0, "rgb"), (1.0, "flow")):
            model = _pair(weight, rule)
            part = clip[:, :3] if stream == "rgb" else clip[:, 3:]
            assert torch.allclose(torch.softmax(model(clip), 1), torch.softmax(model.stream(stream)(part), 1), atol=1e-6)


def test_the_geometric_rule_picks_the_class_neither_stream_rules_out():
    # RGB: "a or b, surely not c"; flow: "c, or else b". The average picks c, which RGB ruled out;
    # the geometric mean picks b, the class both allow.
    rgb = np.array([[0.5, 0.4999, 0.0001]])
    flow = np.array([[0.0, 0.2, 0.8]])
    assert fuse_probabilities(rgb, flow, 0.5, "mean").argmax() == 2
    geometric = fuse_probabilities(rgb, flow, 0.5, "geometric")
    assert geometric.argmax() == 1 and geometric.sum() == pytest.approx(1.0)
    as_torch = fuse_probabilities(torch.tensor(rgb), torch.tensor(flow), 0.5, "geometric").numpy()
    assert np.allclose(as_torch, geometric)
    with pytest.raises(ConfigError, match="fusion rule must be one of mean, geometric"):
        fuse_probabilities(rgb, flow, 0.5, "median")


def test_a_two_stream_checkpoint_reloads_with_both_streams_and_the_weight(tmp_path):
    model = _pair(0.6, "geometric")
    path = save_checkpoint(tmp_path / "m.safetensors", model, classes=["a", "b", "c"])
    back, ckpt = model_from_checkpoint(path)
    assert isinstance(back, TwoStreamBackbone) and back.flow_weight == 0.6 and back.fusion_rule == "geometric"
    assert ckpt.preprocessing == model.preprocessing and back.flow._conv_stem.conv.weight.shape[1] == 2
    clip = torch.randn(1, 5, 4, 48, 48)
    with torch.no_grad():
        assert torch.allclose(back(clip), model(clip), atol=1e-6)
    assert {k.split(".")[0] for k in ckpt.state_dict} == {"rgb", "flow"}


def test_streams_that_read_different_clips_cannot_be_joined():
    rgb = Preprocessing(8, 2, (112, 112), 128)
    flow = Preprocessing(8, 4, (112, 112), 128, mean=(0.5, 0.5), std=(0.5, 0.5), stream="flow", flow=FlowSettings())
    with pytest.raises(ConfigError, match="stride 2 vs 4"):
        Preprocessing.join_streams(rgb, flow)
    joined = Preprocessing.join_streams(rgb, flow.replace(stride=2))
    assert joined.split_streams() == (rgb, flow.replace(stride=2))
    assert Preprocessing.from_dict(joined.to_dict()) == joined
    assert "RGB and optical flow" in joined.describe()


def test_a_two_stream_clip_is_the_rgb_clip_then_the_flow_clip(demo_dataset):
    video = sorted(demo_dataset.glob("*/*.mp4"))[0]
    settings = FlowSettings("farneback", 5.0, 2, "next-frame")
    joined = TwoStreamReader(DirectReader(), DirectFlowReader(settings)).read_clip(video, 2, 4, 2, 48)
    assert joined.shape[1] == 5 and joined.dtype == torch.uint8
    assert torch.equal(joined[:, :3], DirectReader().read_clip(video, 2, 4, 2, 48))
    assert torch.equal(joined[:, 3:], DirectFlowReader(settings).read_clip(video, 2, 4, 2, 48))


def test_a_flip_of_a_two_stream_clip_negates_only_the_flow_x_channel():
    clip = torch.full((2, 5, 8, 8), 100, dtype=torch.uint8)
    clip[:, 3] = 140  # flow x: +12 levels
    flip = TrainClipTransform((8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, flow_from=3)
    out = flip(clip)
    assert torch.equal(out[:, :3], clip[:, :3]) and torch.equal(out[:, 4], clip[:, 4])
    assert int(out[0, 3, 0, 0]) == 256 - 140


def test_the_weight_is_chosen_on_validation_and_ties_go_to_the_plain_average():
    labels = np.array([0, 1, 0, 1])
    video = np.arange(4)
    rgb = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])  # right on videos 0 and 2
    flow = np.array([[0.4, 0.6], [0.2, 0.8], [0.4, 0.6], [0.2, 0.8]])  # right on 1 and 3, surer there
    choice = choose_fusion_weight(rgb, flow, video, labels)
    assert choice.accuracies[0.0] == 0.5 and choice.accuracies[1.0] == 0.5
    assert choice.accuracies[choice.weight] == 1.0 and 0.0 < choice.weight < 1.0
    same = choose_fusion_weight(rgb, rgb, video, labels)
    assert same.weight == 0.5


def test_clips_only_one_stream_scored_are_left_out_of_the_fusion():
    rows_a, rows_b = paired_clips(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 2, 2]))
    assert rows_a.tolist() == [0, 1, 4, 5] and rows_b.tolist() == [0, 1, 2, 3]


def test_a_source_s_flow_twin_starts_the_flow_stream(home):
    assert stream_weights("i3d:kinetics400", None) == ("i3d:kinetics400", "i3d:kinetics400-flow")
    assert stream_weights("effnet3d:imagenet", None) == ("effnet3d:imagenet", "effnet3d:imagenet")
    assert stream_weights(None, None) == (None, None)
    with pytest.raises(ConfigError, match="is a flow network|starts a flow network"):
        stream_weights("i3d:kinetics400-flow", None)


def test_two_stream_options_are_checked_before_any_video_is_read(demo_dataset, tmp_path, no_decoding):
    bad = [({"stream": "two-stream", "fusion_weight": 1.5}, "--fusion-weight is the flow stream's share, in"),
           ({"stream": "rgb", "fusion_weight": 0.5}, "--fusion-weight weighs the streams of --stream two-stream"),
           ({"stream": "rgb", "fusion_rule": "geometric"}, "--fusion-rule fuses the streams of --stream two-stream"),
           ({"stream": "two-stream", "fusion_rule": "median"}, "--fusion-rule must be one of mean, geometric"),
           ({"stream": "rgb", "flow_weights": "effnet3d:imagenet"}, "--flow-weights is for --stream two-stream"),
           ({"stream": "two-stream", "backbone": "vivit", "preset": "tiny"}, "--stream two-stream: backbone 'vivit'")]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            api.finetune(demo_dataset, **{**RUN, **options}, out=tmp_path / "run")
        assert not (tmp_path / "run").exists()


def test_a_two_stream_run_saves_one_model_that_every_command_takes(demo_dataset, tmp_path):
    res = api.finetune(demo_dataset, **RUN, stream="two-stream", out=tmp_path / "run")
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"rgb", "flow", "model.safetensors", "fusion.json", "report", "split.csv"}
    assert set(res.streams) == {"rgb", "flow"} and 0.0 <= res.fusion_weight <= 1.0
    fusion = json.loads((run / "fusion.json").read_text())
    assert fusion["flow_weight"] == res.fusion_weight and len(fusion["val_video_acc"]) == 11
    assert fusion["fusion_rule"] == "geometric"  # the default
    for name in ("rgb", "flow"):
        assert (run / name / "report" / "report.json").is_file()
    # the saved model scores the test split as the run's fused report says
    again = api.evaluate(run, demo_dataset, clips_per_video=2)
    assert again.video_hit1 == pytest.approx(res.test.video_hit1)
    for ours, theirs in zip(again.to_dict()["predictions"], res.test.to_dict()["predictions"]):
        assert ours["name"] == theirs["name"] and ours["predicted"] == theirs["predicted"]
        assert np.allclose([p for _, p in ours["top"]], [p for _, p in theirs["top"]], atol=1e-5)
    top = api.predict(run / "model.safetensors", [sorted(demo_dataset.glob("*/*.mp4"))[0]], clips_per_video=2, top_k=6)
    assert sum(t["prob"] for t in top[0]["top"]) == pytest.approx(1.0, abs=1e-5)


def test_a_fixed_fusion_weight_is_used_and_a_stopped_run_resumes(demo_dataset, tmp_path):
    first = api.finetune(demo_dataset, **RUN, stream="two-stream", fusion_weight=0.2, fusion_rule="mean",
                         out=tmp_path / "run", stop_after_epochs=1)
    assert not first.finished and not (tmp_path / "run" / "model.safetensors").exists()
    res = api.finetune(resume=tmp_path / "run")
    assert res.fusion_weight == 0.2 and len(res.streams["rgb"].history) == 2 and len(res.streams["flow"].history) == 2
    fusion = json.loads((tmp_path / "run" / "fusion.json").read_text())
    assert fusion["chosen_on"] == "--fusion-weight" and fusion["fusion_rule"] == "mean"  # not the default
    model, _ = model_from_checkpoint(tmp_path / "run" / "model.safetensors")
    assert model.fusion_rule == "mean"
    # the saved model fuses as the run's report did
    again = api.evaluate(tmp_path / "run", demo_dataset, clips_per_video=2)
    assert again.video_hit1 == pytest.approx(res.test.video_hit1)


def test_compare_policies_shows_each_stream_and_the_fused_row(demo_dataset, tmp_path):
    res = api.compare_policies(demo_dataset, policies=["top-layer"], out=tmp_path / "cmp",
                               **{**RUN, "epochs": 1}, stream="two-stream")
    assert [(r.policy, r.stream) for r in res.rows] == [("top-layer", "rgb"), ("top-layer", "flow"),
                                                        ("top-layer", "two-stream")]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "top-layer (flow)" in table and "top-layer (two-stream)" in table
    again = api.compare_policies(demo_dataset, policies=["top-layer"], out=tmp_path / "cmp",
                                 **{**RUN, "epochs": 1}, stream="two-stream")
    assert [r.test_video_hit1 for r in again.rows] == [r.test_video_hit1 for r in res.rows]


def test_comparisons_in_a_kept_block_leave_their_stores_to_the_two_stream_rgb_stream(demo_dataset, tmp_path,
                                                                                      monkeypatch):
    """As the demo runs them: RGB top-layer, then top-layer on two streams; the RGB stream computes nothing again."""
    computed = []  # the stream of every store computed from decoded clips
    real = feature_cache.compute_store
    monkeypatch.setattr(feature_cache, "compute_store", lambda model, *a, **k: computed.append(
        model.preprocessing.stream) or real(model, *a, **k))
    before = feature_cache.store_keys()
    with feature_cache.kept_between_comparisons():
        first = api.compare_policies(demo_dataset, policies=["top-layer"], out=tmp_path / "rgb", **{**RUN, "epochs": 1})
        assert computed and set(computed) == {"rgb"} and feature_cache.store_keys() - before  # still held
        computed.clear()
        both = api.compare_policies(demo_dataset, policies=["top-layer"], out=tmp_path / "both", **{**RUN, "epochs": 1},
                                    stream="two-stream")
    assert computed and set(computed) == {"flow"}  # only the flow stream's
    assert both.rows[0].stream == "rgb" and both.rows[0].test_video_hit1 == first.rows[0].test_video_hit1
    assert feature_cache.store_keys() - before == set()  # let go when the block ends


def test_auto_chooses_the_stream_among_rgb_flow_and_both(demo_dataset, tmp_path):
    res = api.finetune(demo_dataset, **{**RUN, "epochs": 1, "policy": "auto"}, auto_trials=0, stream="two-stream",
                       out=tmp_path / "run")
    choice = json.loads((tmp_path / "run" / "auto.json").read_text())
    tried = {(t["policy"], t["stream"]) for t in choice["trials"]}
    assert {("top-layer", "rgb"), ("top-layer", "flow"), ("top-layer", "two-stream")} <= tried
    config = json.loads((tmp_path / "run" / "config.json").read_text())["options"]
    assert config["stream"] == choice["stream"] and config["policy"] == choice["winner"]
    assert (res.streams is not None) == (choice["stream"] == "two-stream")


def test_the_flow_stream_takes_its_frames_from_the_rgb_stream_s_memory_cache(demo_dataset, tmp_path):
    from vtransfer.data.clips import shared_reader
    from vtransfer.data.scan import scan_dataset

    records = scan_dataset(demo_dataset).records[:4]
    model = _pair()
    rgb_pre, flow_pre = model.preprocessing.split_streams()
    rgb = shared_reader("memory", tmp_path, records, rgb_pre)
    flow = shared_reader("memory", tmp_path, records, flow_pre)
    assert flow.cache.frames is rgb.cache
    both = shared_reader("memory", tmp_path, records, model.preprocessing)
    assert both.rgb is rgb and both.flow is flow
    # scoring the validation and test videos asks for some of them: served by the same caches, nothing recomputed
    some = shared_reader("memory", tmp_path, records[1:3], model.preprocessing)
    assert some.rgb is rgb and some.flow is flow
    assert shared_reader("memory", tmp_path, records, flow_pre) is flow  # and the next policy's run finds them still
