"""Tests for vtransfer.utils.denormals: denormal floats flushed to zero on every thread torch computes on.

A matrix product of a denormal matrix (1e-39 everywhere) with a normal one is
split by MKL across torch's OpenMP threads: with the flags set on every
thread, every row of the product is exactly 0; with them set on the calling
thread alone (``torch.set_flush_denormal``), the rows the other thread
computed are not. Each case runs in a fresh process, as a run starts: the
test session's own thread pools (one intra-op thread, other tests' OpenMP
teams) are not what a run has.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vtransfer.utils.denormals import ENV_VAR

_SCRIPT = """
import json, sys, torch
import sklearn.linear_model  # loads scikit-learn's own copy of GNU OpenMP beside torch's, as a run does
from vtransfer.utils.runtime import configure_threads, thread_settings
a = torch.full((256, 256), 1e-39)
ones = torch.ones(256, 256)
def nonzero_rows():
    return int(((a @ ones).abs().sum(1) > 0).sum())
torch.set_num_threads(2)
out = {"kept": nonzero_rows()}
torch.set_flush_denormal(True)  # torch's own call: the calling thread alone
out["this_thread"] = nonzero_rows()
torch.set_flush_denormal(False)
for n in (1, 2):  # a run has used its thread pools before it configures them
    torch.set_num_threads(n)
    nonzero_rows()
configure_threads(2)
out["configured"] = nonzero_rows()
out["said"] = thread_settings()["denormals"]
print(json.dumps(out))
"""


def _run(env_extra: dict[str, str], monkeypatch) -> dict:
    for key, value in env_extra.items():
        monkeypatch.setenv(key, value)
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _x86_only():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero flags")


def test_a_configured_run_flushes_on_every_thread(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    out = _run({"OMP_NUM_THREADS": "2"}, monkeypatch)
    assert out["kept"] == 256  # 256 x 1e-39 in every row
    assert 0 < out["this_thread"] < 256  # what torch's call alone leaves: the other thread's rows
    assert out["configured"] == 0
    assert out["said"] == "denormal floats flushed to zero on this thread and torch's OpenMP threads (2 in all)"


def test_the_environment_keeps_denormals(monkeypatch):
    out = _run({"OMP_NUM_THREADS": "2", ENV_VAR: "keep"}, monkeypatch)
    assert out["configured"] == 256
    assert out["said"] == f"denormal floats kept ({ENV_VAR}=keep)"
