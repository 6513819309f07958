"""``benchmarks/bench_step.py --quick`` runs and prints its ratios and peak RSS.

Speed targets are checked by running the script in full mode, not here: on a
shared machine a timed assertion could only be flaky. This test checks that
the script runs end to end and reports what it promises.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_step.py"
NUM = r"[0-9]+(?:\.[0-9]+)?"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="module")
def quick_output() -> str:
    """stdout of one ``--quick`` run (one thread: the CI machine's cores are shared)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"bench_step.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("backbone", ["slowfusion", "i3d", "vivit"])
def test_prints_fp32_bf16_ratio_and_mfu_per_backbone(quick_output: str, backbone: str) -> None:
    pattern = (
        rf"^{backbone} tiny: fp32 {NUM} m?s, bf16 {NUM} m?s, ratio ({NUM})x, "
        rf"MFU fp32 ({NUM})% bf16 ({NUM})%"
    )
    m = re.search(pattern, quick_output, re.MULTILINE)
    assert m, f"no ratio line for {backbone} in:\n{quick_output}"
    assert float(m.group(1)) > 0


@pytest.mark.parametrize("backbone", ["slowfusion", "i3d"])
def test_prints_channels_last_ratio_for_cnns(quick_output: str, backbone: str) -> None:
    pattern = rf"^{backbone} tiny channels_last_3d: fp32 {NUM} m?s \(contiguous/channels_last ({NUM})x\)"
    assert re.search(pattern, quick_output, re.MULTILINE), quick_output


@pytest.mark.parametrize("backbone", ["slowfusion", "i3d"])
def test_prints_channels_last_inference_ratio_for_cnns(quick_output: str, backbone: str) -> None:
    pattern = (rf"^{backbone} tiny inference fp32: contiguous {NUM} m?s, channels_last_3d {NUM} m?s "
               rf"\(contiguous/channels_last ({NUM})x\)")
    m = re.search(pattern, quick_output, re.MULTILINE)
    assert m and float(m.group(1)) > 0, quick_output


def test_vivit_has_no_channels_last_line(quick_output: str) -> None:
    assert "vivit tiny channels_last_3d" not in quick_output


def test_prints_matmul_peak_and_conv3d_ratios(quick_output: str) -> None:
    peak = re.search(rf"^matmul peak 1024x1024: fp32 ({NUM}) GFLOP/s, bf16 ({NUM}) GFLOP/s", quick_output, re.M)
    assert peak and float(peak.group(1)) > 0 and float(peak.group(2)) > 0, quick_output
    assert re.search(rf"^conv3d fwd\+bwd .*ratio fp32/bf16 {NUM}x; channels_last_3d ratio", quick_output, re.M)


def test_last_line_is_peak_rss(quick_output: str) -> None:
    last = quick_output.strip().splitlines()[-1]
    m = re.fullmatch(rf"peak memory \(RSS\): ({NUM}) MiB", last)
    assert m, last
    assert 10 < float(m.group(1)) < 64 * 1024  # a real process size in MiB, not KiB or bytes


def test_rejects_unknown_size() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "huge"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--sizes: unknown size 'huge'" in proc.stderr


# -- the shared helpers in benchmarks/_common.py ---------------------------------------


@pytest.fixture(scope="module")
def common():
    """``benchmarks/_common.py`` imported as a module."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return _common


def test_time_interleaved_runs_round_robin_and_takes_the_median(common, monkeypatch) -> None:
    calls: list[str] = []
    clock = iter([0.0, 1.0, 1.0, 3.0, 3.0, 4.0, 4.0, 9.0, 9.0, 10.0, 10.0, 10.5])
    monkeypatch.setitem(common.CLOCKS, "wall", lambda: next(clock))
    out = common.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeat=3
    )
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, alternating
    assert out == {"a": 1.0, "b": 2.0}  # a: 1, 1, 1 -> 1; b: 2, 5, 0.5 -> 2


def test_peak_rss_grows_with_a_large_allocation() -> None:
    code = (
        "import _common\n"
        "before = _common.peak_rss_mib()\n"
        # Linux keeps ru_maxrss across fork+exec, so the child starts at pytest's peak: allocate past it.
        "block = bytearray(int(before + 200) * 1024 * 1024)\n"
        "block[::4096] = b'x' * len(block[::4096])\n"  # touch every page so it is resident
        "print(before, _common.peak_rss_mib(), _common.rss_line())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    before, after, label = proc.stdout.split(" ", 2)
    assert 150 <= float(after) - float(before) <= 320  # MiB, so ru_maxrss units were converted right
    assert label.startswith("peak memory (RSS): ")


def test_base_parser_has_quick_and_threads(common) -> None:
    args = common.base_parser("x").parse_args(["--quick", "--threads", "3"])
    assert args.quick is True and args.threads == 3
    assert common.base_parser("x").parse_args([]).threads is None
