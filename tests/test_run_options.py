"""The options added to the run configuration work end to end through the CLI: parameter-efficient policies,
calibration, test crops and the training features, each checked for what it does to the run folder."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import vtransfer.cli
from checkpoints import random_checkpoints
from vtransfer.cli.app import app
from vtransfer.run_config import FIELDS, OPTION_NAMES, RunConfig
from vtransfer.loading.checkpoints import load_checkpoint, model_from_checkpoint

vtransfer.cli._register_commands()

FAST = ["--epochs", "2", "--batch-size", "8", "--clips-per-video", "2", "--val-clips", "1", "--workers", "0",
        "--patience", "0", "--device", "cpu", "--cache", "memory"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_datasets):
    root = tmp_path_factory.mktemp("opts")
    data = demo_datasets("target", class_set="target", videos_per_class=5, frames=16, size=48, seed=2)
    return data, random_checkpoints(root / "pretrained")


def _run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"vtransfer {' '.join(map(str, args))} failed:\n{result.output}") from result.exception
    return result


def _finetune(demo, out, *extra):
    data, pretrained = demo
    return _run("finetune", data, "--backbone", "vivit", "--preset", "tiny", "--weights", pretrained["vivit"],
                "--out", out, *FAST, *extra)


def test_every_option_is_declared_once_and_reaches_the_help():
    help_text = " ".join(_run("finetune", "--help").output.replace("│", " ").split())
    for name in OPTION_NAMES:
        meta = FIELDS[name][1].metadata
        if meta["on_cli"]:
            assert "--" + (meta["cli_name"] or name).replace("_", "-") in help_text, name
    cfg = RunConfig.from_options(lora_rank=4, test_crops=3, ema_decay=0.9, lora_targets="qkv,fc1")
    assert RunConfig.from_json({"options": cfg.to_json()}) == cfg and cfg.policy.lora_targets == ["qkv", "fc1"]
    old = {"backbone": "i3d", "policy": "top-3", "reporter": None}  # a config.json from before these options
    assert RunConfig.from_json({"options": old}).policy.lora_rank == 8


def test_lora_with_merge_saves_a_plain_model(demo, tmp_path):
    _finetune(demo, tmp_path / "lora", "--policy", "lora", "--lora-rank", "2", "--merge")
    ckpt = load_checkpoint(tmp_path / "lora" / "model.safetensors")
    assert not ckpt.metadata.get("structure") and not any("lora" in k for k in ckpt.state_dict)
    report = json.loads((tmp_path / "lora" / "report" / "report.json").read_text())
    assert report["extra"]["policy"] == "lora"
    assert 0 < report["extra"]["trainable_params"] < report["extra"]["total_params"] / 4


@pytest.mark.parametrize("policy", ["bitfit", "adapter", "attentive-probe"])
def test_parameter_efficient_policies_train_and_reload(demo, tmp_path, policy):
    _finetune(demo, tmp_path / policy, "--policy", policy)
    net, _ = model_from_checkpoint(tmp_path / policy / "model.safetensors")
    pre = net.preprocessing
    clip = torch.randn(1, 3, pre.frames, *pre.crop_size)
    assert net(clip).shape == (1, 6)
    config = json.loads((tmp_path / policy / "config.json").read_text())
    assert config["resolved"]["policy"]["policy"] == policy


def test_calibrate_stores_a_temperature_that_evaluate_and_predict_use(demo, tmp_path):
    data, _ = demo
    _finetune(demo, tmp_path / "cal", "--policy", "top-3", "--calibrate", "--test-crops", "3")
    ckpt = load_checkpoint(tmp_path / "cal" / "model.safetensors")
    report = json.loads((tmp_path / "cal" / "report" / "report.json").read_text())
    assert report["views"] == {"clips": 2, "crops": 3}
    assert (tmp_path / "cal" / "report" / "reliability.png").is_file()
    assert ckpt.temperature is not None and ckpt.temperature > 0
    assert report["calibration"]["temperature"] == pytest.approx(ckpt.temperature)
    raw = json.loads(_run("evaluate", tmp_path / "cal", data, "--uncalibrated", "--json", "--clips-per-video", "2").output)
    scaled = json.loads(_run("evaluate", tmp_path / "cal", data, "--json", "--clips-per-video", "2").output)
    assert raw["calibration"].get("temperature") is None
    assert scaled["calibration"]["temperature"] == pytest.approx(ckpt.temperature)
    assert scaled["calibration"]["ece"] != pytest.approx(raw["calibration"]["ece"])
    video = str(next(p for p in data.rglob("*.mp4")))
    probs = [json.loads(_run("predict", tmp_path / "cal" / "model.safetensors", video, "--json", *flag).output)[0]["top"][0]
             for flag in ((), ("--uncalibrated",))]
    assert probs[0]["label"] == probs[1]["label"] and probs[0]["prob"] != pytest.approx(probs[1]["prob"])


def test_training_features_run_and_are_recorded(demo, tmp_path):
    _finetune(demo, tmp_path / "feat", "--policy", "all", "--micro-batch", "4", "--ema-decay", "0.9", "--mixup", "0.4",
              "--layer-decay", "0.8", "--grad-checkpointing")
    resolved = json.loads((tmp_path / "feat" / "config.json").read_text())["resolved"]["train"]
    assert (resolved["micro_batch"], resolved["ema_decay"], resolved["mixup"], resolved["layer_decay"],
            resolved["grad_checkpointing"]) == (4, 0.9, 0.4, 0.8, True)


def test_bad_values_fail_before_any_video_is_read(demo, tmp_path, no_decoding):
    data, pretrained = demo
    for extra, says in ((["--policy", "lora", "--lora-rank", "0"], "--lora-rank"),
                        (["--policy", "top-layer", "--mixup", "0.5"], "mixup"),
                        (["--policy", "adapter", "--backbone", "slowfusion"], "adapter"),
                        (["--optimizer", "rmsprop"], "--optimizer"), (["--micro-batch", "0"], "--micro-batch")):
        result = CliRunner().invoke(app, ["finetune", str(data), "--preset", "tiny", "--out", str(tmp_path / "bad"),
                                          "--backbone", "vivit", *FAST, *extra])
        assert result.exit_code != 0 and says in str(result.exception) + result.output, (extra, result.output)
        assert not (tmp_path / "bad").exists()


def test_compare_policies_takes_seed_as_finetune_does(demo, tmp_path):
    from vtransfer.workflows.compare import resolve_seeds

    assert resolve_seeds(None, None) == [0] and resolve_seeds([1, 2], None) == [1, 2]
    assert resolve_seeds(None, 3) == [3] and resolve_seeds([3], 3) == [3]
    data, _ = demo
    result = CliRunner().invoke(app, ["compare-policies", str(data), "--seed", "1", "--seeds", "0,1",
                                      "--backbone", "slowfusion", "--preset", "tiny", "--out", str(tmp_path / "cmp")])
    assert result.exit_code != 0 and "--seed 1 and --seeds 0,1 disagree" in str(result.exception) + result.output
    assert not (tmp_path / "cmp").exists()
    for command in ("finetune", "pretrain", "compare-policies"):  # one declaration: the same flags everywhere
        text = _run(command, "--help").output
        for flag in ("--backbone", "--lr", "--seed", "--epochs", "--frames", "--cache", "--micro-batch", "--calibrate"):
            assert flag in text, (command, flag)
