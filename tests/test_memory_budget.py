"""``--max-memory`` (issue 23, item 3): parsed before any video is read, feature stores past the budget spill to a
memory-mapped file with the same results, a micro-batch or checkpointing is picked from a measured step, and a run
that cannot fit stops before training with the numbers."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import vtransfer.api as api
import vtransfer.cli
import vtransfer.workflows.pipeline as pipeline
from checkpoints import random_checkpoints
from vtransfer.cli.app import app
from vtransfer.data.dataset import ClipDataset
from vtransfer.data.scan import load_dataset
from vtransfer.engine import feature_cache, step_memory
from vtransfer.engine.feature_cache import CachedPrefixSource, get_store
from vtransfer.engine import spill as spill_module
from vtransfer.engine.spill import remove_stale
from vtransfer.engine.step_memory import StepMemory, fit_step_to_memory, measure_step
from vtransfer.utils.allocator import MallocTuning
from vtransfer.engine.trainer import QuietReporter, Trainer
from vtransfer.models.registry import build_backbone, training_defaults
from vtransfer.policies.freezing import apply_policy, resolve_policy, set_train_mode
from vtransfer.run_config import RunConfig, resolve_training
from vtransfer.api import shared_reader
from vtransfer.utils import memory_budget as mb
from vtransfer.utils.errors import ConfigError
from vtransfer.utils.memory_budget import MemoryBudget, MemoryBudgetError

vtransfer.cli._register_commands()
CPU = torch.device("cpu")
GiB, MiB = 2**30, 2**20
def _geometry(backbone: str) -> dict:
    return api.geometry_overrides(backbone, "tiny", None, None, 32)


SMALL = dict(epochs=1, batch_size=4, clips_per_video=1, val_clips=1, workers=0, patience=0, device="cpu",
             cache="memory", cached_views=2, size=32, threads=1)


@pytest.fixture(autouse=True)
def _own_budget():
    """Each test sets the process's budget as it likes; the next one starts from the default again."""
    before = mb.set_current(None)
    yield
    mb.set_current(before)
    feature_cache.clear_stores()


@pytest.fixture(scope="module")
def data(demo_datasets):
    return demo_datasets("target", class_set="target", videos_per_class=3, frames=16, size=40, seed=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return random_checkpoints(tmp_path_factory.mktemp("mb-weights"), classes=5, seed=3,
                              overrides={"slowfusion": _geometry("slowfusion")})


# -- parsing ---------------------------------------------------------------------------------------------------------


def test_sizes_and_fractions_parse_and_bad_values_say_what_is_taken():
    assert mb.parse_max_memory("12G") == mb.parse_max_memory("12GiB") == mb.parse_max_memory("12gb") == 12 * GiB
    assert mb.parse_max_memory("800M") == 800 * MiB and mb.parse_max_memory("1.5G") == int(1.5 * GiB)
    assert mb.parse_max_memory("0.8") == mb.parse_max_memory("80%") == mb.parse_max_memory(0.8) == 0.8
    assert mb.parse_max_memory(None) is None
    for bad, says in (("lots", "a size like 12G"), ("16", "give a unit"), ("0", "more than 0"), ("-2G", "a size like"),
                      ("150%", "at most 100%"), ("1K", "at least 256 MiB"), ("", "a size like")):
        with pytest.raises(ConfigError, match="--max-memory") as e:
            mb.parse_max_memory(bad)
        assert says in str(e.value), (bad, str(e.value))
    with pytest.raises(ConfigError, match="--max-memory"):  # the API's keywords are parsed when the options are read
        RunConfig.from_options(max_memory="16")
    assert RunConfig.from_options(max_memory=" 12G ").clips.max_memory == "12G"


def test_the_budget_is_the_size_given_or_a_fraction_of_what_the_process_could_use(monkeypatch):
    held, available = mb.memory_basis()
    assert held > 0 and available > 0
    assert mb.configure("1G").limit == GiB and "--max-memory 1G" in mb.current().describe()
    assert mb.configure(0.5).limit == pytest.approx(0.5 * (held + available), rel=1e-6)
    default = mb.configure(None)
    assert default.limit == pytest.approx(mb.DEFAULT_FRACTION * (held + available), rel=1e-6)
    assert "default: 80%" in default.describe()
    # what the process holds is fixed here: giving free heap back (fits does) would otherwise move it under the test
    monkeypatch.setattr(mb, "process_memory", lambda: 500 * MiB)
    budget = MemoryBudget(limit=564 * MiB)
    assert budget.fits(MiB) and budget.fits(64 * MiB) and not budget.fits(65 * MiB)
    budget.reserve(63 * MiB)  # set aside: counts as held until the process has grown by that much
    assert budget.fits(MiB) and not budget.fits(8 * MiB) and budget.remaining() == MiB


def test_bad_max_memory_fails_before_any_video_is_read(data, tmp_path, no_decoding):
    for value in ("lots", "16", "10M"):
        result = CliRunner().invoke(app, ["finetune", str(data), "--backbone", "slowfusion", "--preset", "tiny",
                                          "--max-memory", value, "--out", str(tmp_path / "bad")])
        assert result.exit_code != 0 and "--max-memory" in str(result.exception) + result.output, result.output
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="--max-memory"):
        api.compare_policies(data, policies=["top-layer"], out=tmp_path / "cmp", max_memory="0")
    assert not (tmp_path / "cmp").exists()


# -- feature stores --------------------------------------------------------------------------------------------------


def _train(model, plan, source):
    options = RunConfig.from_options(epochs=2, batch_size=4, lr=0.05, optimizer="sgd", weight_decay=1e-4, patience=0)
    config = resolve_training(options, training_defaults(model.backbone_name))
    torch.manual_seed(0)
    trainer = Trainer(model, plan, config, CPU, source, validate=lambda m: (0.0, 0.0), save_best=lambda m, r: None,
                      save_state=lambda s: None, train_size=len(source.labels))
    return trainer.fit().history


def test_a_store_past_the_budget_spills_to_a_file_trains_the_same_and_is_deleted_when_dropped(data, tmp_path):
    index = load_dataset(data)
    torch.manual_seed(5)
    base = build_backbone("slowfusion", "tiny", num_classes=len(index.classes), **_geometry("slowfusion"))
    plan = resolve_policy(base, "top-3")
    apply_policy(base, plan)
    labels = [index.class_to_idx[r.label] for r in index.records]
    reader = shared_reader("memory", data / "unused", index.records, base.preprocessing)
    dataset = ClipDataset(index.records, index.class_to_idx, base.preprocessing, "train", fixed_views=2, seed=0,
                          reader=reader)
    k, said = plan.first_trainable_group, []
    models, stores, histories = {}, {}, {}
    for where, limit in (("memory", 1 << 50), ("file", 0)):
        feature_cache.clear_stores()
        mb.set_current(MemoryBudget(limit=limit, spill_dir=tmp_path / "run", message=said.append))
        models[where] = model = build_backbone("slowfusion", "tiny", num_classes=len(index.classes),
                                               **_geometry("slowfusion"))
        model.load_state_dict(base.state_dict())
        apply_policy(model, plan)
        set_train_mode(model, True)
        stores[where] = store = get_store(model, dataset, k, 4, 0, CPU, "fp32")
        histories[where] = _train(model, plan, CachedPrefixSource(store, labels, 2, 4, 0, CPU))
    mem, spilled = stores["memory"], stores["file"]
    assert mem.spill is None and spilled.spill is not None and spilled.nbytes() == 0
    files = [Path(p) for p in spilled.spill.paths]
    assert files and all(f.is_file() and f.parent == tmp_path / "run" / "spill" for f in files)
    assert any("written to" in s and "memory budget" in s for s in said), said
    assert torch.equal(mem.state, spilled.state) and torch.equal(mem.labels, spilled.labels)
    untimed = {w: [{k: v for k, v in h.items() if k != "time_s"} for h in hist] for w, hist in histories.items()}
    assert untimed["memory"] == untimed["file"]
    a, b = models["memory"].state_dict(), models["file"].state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)

    feature_cache.clear_stores()  # a dropped store's file goes at once
    assert not any(f.exists() for f in files)
    again = get_store(models["file"], dataset, k, 4, 0, CPU, "fp32")  # and one let go by the garbage collector
    files = [Path(p) for p in again.spill.paths]
    feature_cache._STORES.clear()
    del again
    gc.collect()
    assert files and not any(f.exists() for f in files)


def test_a_full_disk_names_the_folder_and_the_bytes(data, tmp_path, monkeypatch):
    index = load_dataset(data)
    model = build_backbone("slowfusion", "tiny", num_classes=len(index.classes), **_geometry("slowfusion"))
    plan = resolve_policy(model, "top-3")
    apply_policy(model, plan)
    reader = shared_reader("memory", data / "unused", index.records, model.preprocessing)
    dataset = ClipDataset(index.records, index.class_to_idx, model.preprocessing, "eval", clips_per_video=1, reader=reader)
    monkeypatch.setattr(spill_module.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    mb.set_current(MemoryBudget(limit=0, spill_dir=tmp_path))
    with pytest.raises(mb.SpillError, match=str(tmp_path / "spill")) as e:
        get_store(model, dataset, plan.first_trainable_group, 4, 0, CPU, "fp32")
    assert "free" in str(e.value) and "--cache-dir" in str(e.value)
    assert not list((tmp_path / "spill").glob("feature-store-*"))


def test_files_of_a_killed_process_are_deleted_by_the_next_spill(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"feature-store-{int(gone.stdout)}-abc.bin"
    mine = tmp_path / f"feature-store-{os.getpid()}-def.bin"
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    assert remove_stale(tmp_path) == [stale] and mine.exists() and not stale.exists()


def test_a_run_with_every_store_spilled_gives_the_same_model(data, pretrained, tmp_path, monkeypatch):
    """Every feature store of a run (training views, validation, test) in a file: the same weights and results."""
    said: list[str] = []

    class Listen(QuietReporter):
        def message(self, text: str) -> None:
            said.append(text)

    kw = dict(SMALL, backbone="slowfusion", weights=str(pretrained["slowfusion"]), policy="top-layer", cache="auto")
    loose = api.finetune(data, out=tmp_path / "loose", **kw)
    feature_cache.clear_stores()  # else the second run reuses the first one's stores
    monkeypatch.setattr(MemoryBudget, "fits", lambda self, nbytes: False)  # no store fits
    tight = api.finetune(data, out=tmp_path / "tight", manifest=tmp_path / "loose" / "split.csv", max_memory="0.9",
                         reporter=Listen(), **kw)
    assert any("memory-mapped" in s for s in said), said
    a, b = load_file(loose.model_path), load_file(tight.model_path)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert tight.report["summary"] == loose.report["summary"]
    spilled = list((tmp_path / "tight" / "spill").glob("feature-store-*"))  # in the run folder while the stores live
    feature_cache.clear_stores()
    assert spilled and not any(p.exists() for p in spilled)
    options = json.loads((tmp_path / "tight" / "config.json").read_text())["options"]
    assert options["max_memory"] == "0.9"


# -- the training step -----------------------------------------------------------------------------------------------


NO_FORWARD = lambda: StepMemory(0, 0, False, "given")  # noqa: E731 - the forward pass without autograd: nothing


def _planned(backbone: str, policy: str):
    model = build_backbone(backbone, "tiny", num_classes=5, **_geometry(backbone))
    plan = resolve_policy(model, policy)
    apply_policy(model, plan)
    config = resolve_training(RunConfig.from_options(backbone=backbone, policy=policy, batch_size=8, epochs=1),
                              training_defaults(backbone))
    return model, plan, config


def test_a_micro_batch_is_picked_when_the_measured_step_does_not_fit():
    model, plan, config = _planned("slowfusion", "all")  # no BatchNorm: micro-batches give the same gradients
    keep = step_memory.persistent_bytes(model, config)
    said: list[str] = []
    budget = MemoryBudget(limit=mb.process_memory() + keep + 10 * MiB + 350 * MiB, described="--max-memory test")
    fitted = fit_step_to_memory(model, plan, config, CPU, said.append, budget=budget, forward=NO_FORWARD,
                                measure=lambda ckpt: StepMemory(10 * MiB, 100 * MiB, ckpt, "given"))
    assert (fitted.training.micro_batch, fitted.training.grad_checkpointing) == (3, False)
    assert fitted.batch_size == 8 and len(said) == 1 and "--micro-batch 3" in said[0] and "8 clips per" in said[0]
    assert budget.floor >= mb.process_memory() + keep + 300 * MiB  # the step's memory is set aside for it

    roomy = MemoryBudget(limit=1 << 50)  # a step that fits changes nothing and says nothing
    same = fit_step_to_memory(model, plan, config, CPU, said.append, budget=roomy, forward=NO_FORWARD,
                              measure=lambda ckpt: StepMemory(10 * MiB, 100 * MiB, ckpt, "given"))
    assert same is config and len(said) == 1


def test_batch_norm_networks_get_checkpointing_first():
    model, plan, config = _planned("i3d", "all")
    keep = step_memory.persistent_bytes(model, config)
    budget = MemoryBudget(limit=mb.process_memory() + keep + 500 * MiB)
    sizes = {False: StepMemory(0, 100 * MiB, False, "given"), True: StepMemory(0, 40 * MiB, True, "given")}
    fitted = fit_step_to_memory(model, plan, config, CPU, budget=budget, measure=lambda ckpt: sizes[ckpt],
                                forward=NO_FORWARD)
    assert (fitted.training.micro_batch, fitted.training.grad_checkpointing) == (None, True)


def test_the_measurement_changes_nothing_and_grows_with_the_batch():
    model, plan, config = _planned("i3d", "all")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    rng = torch.get_rng_state()
    modes = [m.training for m in model.modules()]
    mem = measure_step(model, plan, CPU, "fp32", checkpointing=False)
    assert mem.per_clip > 0 and mem.fixed >= 0 and mem.how
    passes = step_memory.measure_forward(model, CPU, "fp32")
    assert passes.per_clip >= 0 and passes.how
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # BatchNorm statistics included
    assert torch.equal(rng, torch.get_rng_state()) and modes == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())


def test_a_run_that_cannot_fit_stops_before_training_with_the_numbers(data, tmp_path, monkeypatch):
    monkeypatch.setattr(step_memory, "measure_step",
                        lambda model, plan, device, precision, ckpt: StepMemory(0, 100 * GiB, ckpt, "given"))
    result = CliRunner().invoke(app, ["finetune", str(data), "--backbone", "slowfusion", "--preset", "tiny",
                                      "--policy", "all", "--max-memory", "2G", "--out", str(tmp_path / "run"),
                                      "--epochs", "1", "--size", "32", "--cache", "memory"])
    text = " ".join((str(result.exception) + result.output).split())
    assert result.exit_code != 0 and isinstance(result.exception, (MemoryBudgetError, SystemExit)), text
    for says in ("--policy all needs about 100 GiB", "--max-memory 2G", "Options that would fit: --max-memory",
                 "Stopped before training"):
        assert says in text, (says, text)
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()

    # measured for real: a budget below what the process already holds (PyTorch alone) stops the same way
    result = CliRunner().invoke(app, ["finetune", str(data), "--backbone", "slowfusion", "--preset", "tiny",
                                      "--policy", "top-layer", "--max-memory", "256M", "--out", str(tmp_path / "small"),
                                      "--epochs", "1", "--size", "32", "--cache", "memory"])
    text = " ".join((str(result.exception) + result.output).split())
    assert result.exit_code != 0 and "the memory budget, 256 MiB (--max-memory 256M)" in text, text
    assert "Stopped before training" in text and not (tmp_path / "small" / "model.safetensors").exists()


def test_a_batch_whose_forward_pass_does_not_fit_stops_naming_a_batch_size_that_would():
    model, plan, config = _planned("slowfusion", "top-layer")  # a head alone: only the forward pass is measured
    budget = MemoryBudget(limit=mb.process_memory() + 350 * MiB, described="--max-memory test")
    with pytest.raises(MemoryBudgetError) as e:
        fit_step_to_memory(model, plan, config, CPU, budget=budget,
                           forward=lambda: StepMemory(0, 100 * MiB, False, "given"))
    assert "--batch-size 8 clips" in str(e.value) and "--batch-size 3" in str(e.value), str(e.value)
    assert "Stopped before training" in str(e.value)


def test_the_tuned_heap_scales_both_measurements_by_the_measured_fragmentation():
    tuned = MallocTuning(applied={"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}, reason="applied")
    assert step_memory.heap_margin(tuned) == step_memory.HEAP_FRAGMENTATION > 1
    assert step_memory.heap_margin(MallocTuning(reason="left to glibc")) == 1.0  # glibc maps large blocks itself
    mem = StepMemory(10 * MiB, 100 * MiB, True, "peak resident set")
    scaled = step_memory.with_heap_margin(mem, 1.4)
    assert (scaled.fixed, scaled.per_clip, scaled.checkpointing) == (14 * MiB, 140 * MiB, True)
    assert scaled.need(8) == int(1.4 * mem.need(8)) and "x1.4 for the heap's fragmentation" in scaled.how
    assert step_memory.with_heap_margin(mem, 1.0) is mem


class _Unreadable:
    """A resident set that cannot be read: the step falls back to the bytes autograd saves (the same each time)."""

    grown = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_a_measured_step_carries_this_processs_heap_margin(monkeypatch):
    model, plan, _ = _planned("slowfusion", "all")
    monkeypatch.setattr(mb, "PeakSampler", _Unreadable)
    monkeypatch.setattr(step_memory, "heap_margin", lambda tuning=None: 1.0)
    plain = measure_step(model, plan, CPU, "fp32", checkpointing=False)
    monkeypatch.setattr(step_memory, "heap_margin", lambda tuning=None: 3.0)
    scaled = measure_step(model, plan, CPU, "fp32", checkpointing=False)
    assert plain.how == "bytes saved for backward" and plain.per_clip > 0
    assert scaled.how == "bytes saved for backward, x3 for the heap's fragmentation"
    assert (scaled.fixed, scaled.per_clip) == (3 * plain.fixed, 3 * plain.per_clip)


def test_a_store_in_memory_sets_its_bytes_aside_so_the_next_one_spills(tmp_path):
    need = 64 * MiB
    budget = MemoryBudget(limit=mb.process_memory() + need + need // 2, spill_dir=tmp_path)
    previous = mb.set_current(budget)
    try:
        first = spill_module.RowBuffer(torch.zeros(1, 16 * 1024), capacity=need // (64 * 1024))
        second = spill_module.RowBuffer(torch.zeros(1, 16 * 1024), capacity=need // (64 * 1024))
        assert first.spill is None and second.spill is not None  # nothing of the first was written yet
        assert budget.floor >= need
        second.finish()
    finally:
        mb.set_current(previous)


def test_what_a_holder_takes_after_a_reservation_stays_on_top_of_it():
    budget = MemoryBudget(limit=1 << 50)
    budget.held(100 * MiB)  # nothing reserved: what the process holds is counted as it is
    assert budget.floor == 0
    budget.reserve(500 * MiB)
    floor = budget.floor
    budget.held(200 * MiB)  # e.g. a frame cache filled after the step's memory was set aside
    assert budget.floor == floor + 200 * MiB


def test_the_training_step_is_set_aside_before_the_frame_cache_picks_memory_or_disk(data, tmp_path, monkeypatch):
    seen = {}
    real_fit, real_reader = pipeline.fit_step_to_memory, pipeline.shared_reader

    def fit(*args, **kwargs):
        seen["fitted"] = True
        out = real_fit(*args, **kwargs)
        seen["reserved"] = mb.current().floor
        return out

    def reader(*args, **kwargs):
        seen["floor at the cache"] = mb.current().floor if seen.get("fitted") else None
        return real_reader(*args, **kwargs)

    monkeypatch.setattr(pipeline, "fit_step_to_memory", fit)
    monkeypatch.setattr(pipeline, "shared_reader", reader)
    result = CliRunner().invoke(app, ["finetune", str(data), "--backbone", "slowfusion", "--preset", "tiny",
                                      "--policy", "all", "--out", str(tmp_path / "run"), "--epochs", "1",
                                      "--size", "32", "--report-videos", "0"])
    assert result.exit_code == 0, result.output
    assert seen["reserved"] > 0 and seen["floor at the cache"] == seen["reserved"]
