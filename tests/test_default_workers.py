"""How many DataLoader workers a run gets when --workers is not given (``runtime.default_workers``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

import vtransfer.api as api
from vtransfer.utils.runtime import cpu_count, default_workers

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def _reader(mode: str | None, cache_format: str = "raw"):
    return SimpleNamespace(cache=None if mode is None else SimpleNamespace(mode=mode, cache_format=cache_format))


def test_frames_in_memory_on_cpu_need_no_workers():
    assert default_workers(CPU, _reader("memory")) == 0
    assert default_workers(CPU, _reader("memory", "jpeg")) == 0
    assert default_workers(GPU, _reader("memory", "jpeg")) == min(8, cpu_count())  # JPEG decoding would stall the GPU


def test_the_whole_network_training_on_cpu_from_a_disk_cache_reads_in_the_main_process():
    workers = min(2, cpu_count())
    assert default_workers(CPU, _reader("disk"), whole_network=True) == 0
    assert default_workers(CPU, _reader("disk")) == workers  # a frozen prefix computed from decoded clips
    assert default_workers(CPU, _reader(None), whole_network=True) == workers  # no cache: decoding each clip
    assert default_workers(GPU, _reader("disk"), whole_network=True) == min(8, cpu_count())


def test_a_run_records_the_workers_it_picked(demo_dataset, tmp_path):
    options = dict(backbone="slowfusion", preset="tiny", size=48, epochs=1, clips_per_video=1, val_clips=1,
                   cache="disk", device="cpu")
    for policy, expected in (("all", 0), ("top-3", min(2, cpu_count()))):
        api.finetune(demo_dataset, policy=policy, out=tmp_path / policy, **options)
        resolved = json.loads((tmp_path / policy / "config.json").read_text())["resolved"]
        assert resolved["workers"] == expected, policy
