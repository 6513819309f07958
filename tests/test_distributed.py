"""torchrun with 2 CPU processes (gloo) gives the same model as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


ARGS = ["finetune", "--backbone", "slowfusion", "--preset", "tiny", "--size", "48", "--epochs", "2", "--batch-size", "8",
        "--dropout", "0", "--workers", "0", "--cache", "memory", "--clips-per-video", "2", "--val-clips", "1",
        "--patience", "0", "--policy", "all", "--device", "cpu", "--threads", "1"]


def _run(cmd, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, demo_datasets):
    data = demo_datasets("data", class_set="target", videos_per_class=6, frames=16, size=48, seed=3)
    single, multi = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "vtransfer", *ARGS, str(data), "--out", str(single)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
          "-m", "vtransfer", *ARGS, str(data), "--out", str(multi)])
    a, b = load_file(single / "model.safetensors"), load_file(multi / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3, msg=k)
    ha = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert len(ha) == len(hb) == 2
    for x, y in zip(ha, hb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["train_acc"] == y["train_acc"] and x["val_video_acc"] == y["val_video_acc"]
    cfg = json.loads((multi / "config.json").read_text())
    assert cfg["resolved"]["processes"] == 2
    # only rank 0 wrote: one report, no stray temp files
    assert (multi / "report" / "report.json").exists()
    assert not list(multi.glob(".*.tmp"))


RANK_SCRIPT = """
import atexit, os, sys
import torch
import torch.distributed as dist
from vtransfer.utils import distributed
ctx = distributed.init_from_env(torch.device("cpu"))
x = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(x)  # gloo's worker threads have run work
assert x.item() == 3.0 and dist.is_initialized()
atexit._run_exitfuncs()  # what the interpreter runs at exit, before tearing itself down
print(f"rank {ctx.rank} destroyed={not dist.is_initialized()}", flush=True)
"""


def test_every_rank_destroys_its_process_group_before_python_exits(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534", str(script)])
    assert r.stdout.count("destroyed=True") == 2, r.stdout
