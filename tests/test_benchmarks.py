"""The benchmark scripts run in --quick mode and print their ratios (speed targets are checked by running them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> str:
    r = subprocess.run([sys.executable, str(BENCH / name), "--quick", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_bench_policies_quick():
    out = run_script("bench_policies.py", "--threads", "1")
    assert "ratio vtransfer/reference:" in out
    assert "top-layer epoch after the first / all epoch:" in out
    assert "peak memory (RSS):" in out
    for policy in ("scratch", "top-layer", "top-3", "temporal", "all"):
        assert any(line.startswith(policy) for line in out.splitlines()), policy


@pytest.mark.slow
def test_bench_memory_quick():
    out = run_script("bench_memory.py", "--threads", "1")
    assert "main-process RSS growth" in out and "decoded disk cache" in out
    assert "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_budget_quick_runs_with_and_without_the_budget_and_compares_the_results():
    out = run_script("bench_budget.py", "--threads", "1", "--videos", "12")
    assert "same test accuracies with and without --max-memory 1G: yes" in out
    assert "peak anon MiB" in out and "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_scale_curve_quick_prints_the_table_slopes_targets_and_extrapolation():
    out = run_script("bench_scale.py", "--curve", "--threads", "1", "--policies", "top-layer")
    rows = [line.split() for line in out.splitlines() if re.match(r"^ +(12|24) +(compare|all-1ep|sum) ", line)]
    assert [(r[0], r[1]) for r in rows] == [(n, run) for n in ("12", "24") for run in ("compare", "all-1ep", "sum")]
    for n, run, wall, per_video, *_ in rows:
        assert float(per_video) == pytest.approx(float(wall) / int(n), abs=0.01)  # wall printed to 0.1 s
    assert "slopes between successive sizes (extra per extra video):" in out and "12 -> 24" in out
    assert out.count(": PASS") + out.count(": FAIL") == 4
    # each part alone (bench_parts.py), then every policy's run against its slowest part's rate
    assert re.search(r"decoding \(PyAV.*\d+ frames/s", out) and re.search(r"^  +all +0 \(stem\) +- +[\d.]+ +[\d.]+$", out, re.M)
    limit = out[out.index("against the limit"):out.index("slopes between")]
    assert len(re.findall(r"^ +(12|24) +(top-layer|all) .* (prefix|training) +\d+% +\d+%$", limit, re.M)) == 4
    assert "LINEAR EXTRAPOLATIONS" in out and "13,320 clips" in out and "MemTotal" in out
    assert "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_transfer_quick_prints_the_table_and_the_baseline():
    out = run_script("bench_transfer.py", "--threads", "1", "--policies", "scratch,top-layer")
    assert "motion+LR" in out and "flowhist+LR" in out and "chance" in out and "best pretrained policy: top-layer" in out
    for policy in ("scratch", "top-layer"):
        assert any(line.startswith(policy) for line in out.splitlines()), policy
    assert "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_contention_quick_times_the_compare_step_alone_and_beside_busy_processes():
    out = run_script("bench_contention.py")
    alone = re.search(r"^alone: +(\d+\.\d)s", out, re.M)
    loaded = re.search(r"^beside 2 busy: +(\d+\.\d)s", out, re.M)
    ratio = re.search(r"^slowdown loaded/alone: (\d+\.\d\d)x +\(fair share \(cores\+2\)/cores = (\d\.\d\d)x", out, re.M)
    assert alone and loaded and ratio, out
    assert float(ratio.group(1)) == pytest.approx(float(loaded.group(1)) / float(alone.group(1)), rel=0.05)
    cores = len(os.sched_getaffinity(0))
    assert float(ratio.group(2)) == pytest.approx((cores + 2) / cores, abs=0.006)
    # both runs had the CLI's OpenMP default (or the user's own value) in effect
    assert out.count(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')},") == 2
    assert out.count(f"intra_op_threads={cores},") == 2
    assert "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_peft_quick_prints_every_policy_against_all():
    out = run_script("bench_peft.py", "--threads", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny")]
    assert [r[1] for r in rows] == ["all", "lora", "adapter", "bitfit", "attentive-probe"]
    assert rows[0][-1] == "1.00" and rows[0][-3] == "1.00"  # all against itself
    shares = {r[1]: float(r[3].rstrip("%")) for r in rows}
    assert shares["all"] == 100.0 and all(shares[p] < 100.0 for p in shares if p != "all")


@pytest.mark.slow
def test_bench_motion_quick_builds_the_arrow_of_time_and_runs_both_streams(demo_dataset, home):
    out = run_script("bench_motion.py", str(demo_dataset), "--threads", "1", "--policies", "top-layer", "--epochs", "1")
    assert "8 videos x 2 directions" in out
    table = out.split("test video accuracy on the arrow of time (chance 50%)")[1]
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:4]}
    assert set(rows) == {"rgb", "flow"} and all(v.endswith("%") for v in rows.values())
    assert "motion+LR" in table and "flowhist+LR" in table and "flowhist/clip+LR (8 frames" in table


@pytest.mark.slow
def test_bench_frame_cache_quick_prints_sizes_codecs_and_epochs():
    out = run_script("bench_frame_cache.py", "--threads", "1")
    assert out.count("raw/jpeg") == 2 and "jpeg opencv (the cache)" in out
    assert "loader only:" in out and "ratio jpeg/raw:" in out
    assert "peak memory (RSS):" in out
