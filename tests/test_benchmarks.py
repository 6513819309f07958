"""The benchmark scripts run in --quick mode and print their ratios (speed targets are checked by running them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([sys.executable, str(BENCH / name), "--quick", *args], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


#: The single-threaded quick runs, by the test that checks each, longest first (seconds alone on 2 cores: 59, 45,
#: 30, 23, 17, 15, 14, 6). ``{demo}`` is the shared demo dataset.
SINGLE_THREADED = {
    "test_bench_scale_curve_quick_prints_the_table_slopes_targets_and_extrapolation":
        ("bench_scale.py", "--curve", "--threads", "1", "--policies", "top-layer"),
    "test_bench_budget_quick_runs_with_and_without_the_budget_and_compares_the_results":
        ("bench_budget.py", "--threads", "1", "--videos", "12"),
    "test_bench_policies_quick": ("bench_policies.py", "--threads", "1"),
    "test_bench_peft_quick_prints_every_policy_against_all": ("bench_peft.py", "--threads", "1"),
    "test_bench_transfer_quick_prints_the_table_and_the_baseline":
        ("bench_transfer.py", "--threads", "1", "--policies", "scratch,top-layer"),
    "test_bench_motion_quick_builds_the_arrow_of_time_and_runs_both_streams":
        ("bench_motion.py", "{demo}", "--threads", "1", "--policies", "top-layer", "--epochs", "1"),
    "test_bench_memory_quick": ("bench_memory.py", "--threads", "1"),
    "test_bench_frame_cache_quick_prints_sizes_codecs_and_epochs": ("bench_frame_cache.py", "--threads", "1"),
}


@pytest.fixture(scope="module")
def quick_output(request, demo_dataset, tmp_path_factory):
    """``quick_output(test_name)``: the stdout of that test's quick run (:data:`SINGLE_THREADED`), a :class:`QuickRuns`.

    The runs take one thread each, so the selected ones start with the module and run two at a time (one at a
    time on one core): the module takes about half as long. Their timings are not measurements (two run side by
    side); these tests check what the scripts print. Offline, with a home of their own.
    """
    home = tmp_path_factory.mktemp("bench-home")
    env = {**os.environ, "VTRANSFER_HOME": str(home / "vthome"), "VTRANSFER_OFFLINE": "1"}
    selected = {item.name for item in request.session.items if item.module is request.module}
    pool = ThreadPoolExecutor(max_workers=max(1, min(2, len(os.sched_getaffinity(0)))))
    runs = {
        name: pool.submit(run_script, script, *(a.format(demo=demo_dataset) for a in args), env=env)
        for name, (script, *args) in SINGLE_THREADED.items() if name in selected
    }
    yield QuickRuns(runs)
    pool.shutdown(cancel_futures=True)


class QuickRuns:
    """The pooled quick runs: call with a test's name for its output; :meth:`wait_all` before timing anything."""

    def __init__(self, runs: dict[str, Future]):
        self.runs = runs

    def __call__(self, test_name: str) -> str:
        return self.runs[test_name].result()

    def wait_all(self) -> None:
        wait(self.runs.values())


@pytest.mark.slow
def test_bench_policies_quick(quick_output):
    out = quick_output("test_bench_policies_quick")
    assert "ratio vtransfer/reference:" in out
    assert "top-layer epoch after the first / all epoch:" in out
    assert "peak memory (RSS):" in out
    for policy in ("scratch", "top-layer", "top-3", "temporal", "all"):
        assert any(line.startswith(policy) for line in out.splitlines()), policy


@pytest.mark.slow
def test_bench_memory_quick(quick_output):
    out = quick_output("test_bench_memory_quick")
    assert "main-process RSS growth" in out and "decoded disk cache" in out
    assert "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_budget_quick_runs_with_and_without_the_budget_and_compares_the_results(quick_output):
    out = quick_output("test_bench_budget_quick_runs_with_and_without_the_budget_and_compares_the_results")
    assert "same test accuracies with and without --max-memory 1G: yes" in out
    assert "peak anon MiB" in out and "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_scale_curve_quick_prints_the_table_slopes_targets_and_extrapolation(quick_output):
    out = quick_output("test_bench_scale_curve_quick_prints_the_table_slopes_targets_and_extrapolation")
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
def test_bench_transfer_quick_prints_the_table_and_the_baseline(quick_output):
    out = quick_output("test_bench_transfer_quick_prints_the_table_and_the_baseline")
    assert "motion+LR" in out and "flowhist+LR" in out and "chance" in out and "best pretrained policy: top-layer" in out
    for policy in ("scratch", "top-layer"):
        assert any(line.startswith(policy) for line in out.splitlines()), policy
    assert "peak memory (RSS):" in out


@pytest.mark.slow
def test_bench_contention_quick_times_the_compare_step_alone_and_beside_busy_processes(quick_output):
    quick_output.wait_all()  # it times a run alone and beside busy processes of its own: none of the pool's beside it
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
def test_bench_peft_quick_prints_every_policy_against_all(quick_output):
    out = quick_output("test_bench_peft_quick_prints_every_policy_against_all")
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny")]
    assert [r[1] for r in rows] == ["all", "lora", "adapter", "bitfit", "attentive-probe"]
    assert rows[0][-1] == "1.00" and rows[0][-3] == "1.00"  # all against itself
    shares = {r[1]: float(r[3].rstrip("%")) for r in rows}
    assert shares["all"] == 100.0 and all(shares[p] < 100.0 for p in shares if p != "all")


@pytest.mark.slow
def test_bench_motion_quick_builds_the_arrow_of_time_and_runs_both_streams(quick_output):
    out = quick_output("test_bench_motion_quick_builds_the_arrow_of_time_and_runs_both_streams")
    assert "8 videos x 2 directions" in out
    table = out.split("test video accuracy on the arrow of time (chance 50%)")[1]
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:4]}
    assert set(rows) == {"rgb", "flow"} and all(v.endswith("%") for v in rows.values())
    assert "motion+LR" in table and "flowhist+LR" in table and "flowhist/clip+LR (8 frames" in table


@pytest.mark.slow
def test_bench_frame_cache_quick_prints_sizes_codecs_and_epochs(quick_output):
    out = quick_output("test_bench_frame_cache_quick_prints_sizes_codecs_and_epochs")
    assert out.count("raw/jpeg") == 2 and "jpeg opencv (the cache)" in out
    assert "loader only:" in out and "ratio jpeg/raw:" in out
    assert "peak memory (RSS):" in out
