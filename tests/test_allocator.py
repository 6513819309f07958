"""The malloc tuning (issue 23): applied on glibc by every entry point, opt-out honoured, a reason elsewhere."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vtransfer.utils import allocator

ON_GLIBC = allocator.glibc_version() is not None
REPO = Path(__file__).resolve().parents[1]

# Allocates and frees a 100 MiB array 8 times after the CLI's start-up, and prints the minor page faults of each
# round. With glibc's defaults every round maps fresh pages, which the kernel zero-fills on first touch.
FAULTS = """
import json, resource, sys
from vtransfer.cli import prepare_process
prepare_process()
import numpy as np
from vtransfer.utils.allocator import malloc_tuning
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(100 * 2**20, dtype=np.uint8)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "tuning": malloc_tuning().as_dict()}))
"""


@pytest.fixture(autouse=True)
def _keep_this_process_record(monkeypatch):
    """Tests that force a new tuning (with fakes) leave this process's own record as it was."""
    monkeypatch.setattr(allocator, "_done", allocator.malloc_tuning())


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV_VAR and k not in allocator.USER_MALLOC_VARIABLES}
    return {**env, **extra}


def _run_faults(env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-c", FAULTS], check=False, capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("value", ["default", "off", "DEFAULT"])
def test_the_opt_out_keeps_glibcs_defaults(value, monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: pytest.fail("mallopt called despite the opt-out"))
    t = allocator.tune_malloc({allocator.ENV_VAR: value}, force=True)
    assert not t.active and t.applied == {}
    assert f"{allocator.ENV_VAR}={value}" in t.reason
    assert t.describe().startswith("malloc: unchanged (")


def test_a_mistyped_value_also_keeps_the_defaults_and_says_so(monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: pytest.fail("mallopt called for an unknown value"))
    t = allocator.tune_malloc({allocator.ENV_VAR: "defualt"}, force=True)
    assert not t.active and "'defualt' is not one of" in t.reason


@pytest.mark.parametrize("env", [{"MALLOC_TOP_PAD_": "1"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}])
def test_glibc_variables_the_user_set_are_left_to_glibc(env, monkeypatch):
    monkeypatch.setattr(allocator, "_mallopt", lambda: pytest.fail("mallopt called over the user's own settings"))
    t = allocator.tune_malloc(env, force=True)
    assert not t.active and "set by the user" in t.reason


def test_off_glibc_it_does_nothing_and_says_why(monkeypatch):
    def no_confstr(name):
        raise ValueError("unrecognized configuration name")  # what macOS and musl builds answer

    monkeypatch.setattr(allocator.os, "confstr", no_confstr)
    assert allocator.glibc_version() is None
    monkeypatch.setattr(allocator, "_mallopt", lambda: pytest.fail("mallopt called off glibc"))
    t = allocator.tune_malloc({}, force=True)
    assert not t.active and t.reason.startswith("not glibc")


def test_it_never_raises(monkeypatch):
    def broken():
        raise OSError("no libc here")

    monkeypatch.setattr(allocator, "glibc_version", lambda: "glibc 2.36")
    monkeypatch.setattr(allocator, "_mallopt", broken)
    t = allocator.tune_malloc({}, force=True)
    assert not t.active and t.reason == "not applied: OSError: no libc here"


def test_a_refused_setting_is_reported(monkeypatch):
    monkeypatch.setattr(allocator, "glibc_version", lambda: "glibc 2.36")
    monkeypatch.setattr(allocator, "_mallopt", lambda: lambda param, value: 0 if param == -2 else 1)
    t = allocator.tune_malloc({}, force=True)
    assert "M_TOP_PAD" not in t.applied and t.applied and t.reason == "mallopt refused M_TOP_PAD"


def test_it_applies_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "glibc_version", lambda: "glibc 2.36")
    monkeypatch.setattr(allocator, "_mallopt", lambda: lambda param, value: calls.append(param) or 1)
    first = allocator.tune_malloc({}, force=True)
    assert allocator.tune_malloc({}) is first is allocator.malloc_tuning()
    assert len(calls) == len(allocator.MALLOC_SETTINGS)
    assert first.applied == allocator.MALLOC_SETTINGS
    assert json.loads(json.dumps(first.as_dict()))["applied"] == allocator.MALLOC_SETTINGS


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
def test_mallopt_accepts_every_setting_on_glibc():
    mallopt = allocator._mallopt()
    assert all(mallopt(allocator.MALLOPT_PARAMS[k], v) == 1 for k, v in allocator.MALLOC_SETTINGS.items())


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
def test_the_cli_start_up_keeps_large_blocks_instead_of_mapping_fresh_pages():
    default = _run_faults(_clean_env(**{allocator.ENV_VAR: "default"}))
    tuned = _run_faults(_clean_env())
    assert default["tuning"]["applied"] == {} and "VTRANSFER_MALLOC=default" in default["tuning"]["reason"]
    assert tuned["tuning"]["applied"] == allocator.MALLOC_SETTINGS
    # Every round of the default faults its pages in again; tuned, rounds 2..8 reuse the first round's memory.
    assert min(default["faults"][1:]) > 200, default
    assert sum(tuned["faults"][1:]) < 0.1 * sum(default["faults"][1:]), (tuned, default)


def test_the_python_api_applies_it_when_first_imported():
    """vtransfer.api calls tune_malloc() at module level, after its imports (checked in the source: importing it
    loads torch, seconds); and where this session already imported it, the tuning ran."""
    tree = ast.parse((REPO / "vtransfer" / "api.py").read_text())
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "tune_malloc"]
    assert len(calls) == 1
    if "vtransfer.api" in sys.modules:
        assert allocator.malloc_tuning() is not None


def test_the_cli_start_up_says_what_it_did_on_any_platform():
    code = ("from vtransfer.cli import prepare_process; prepare_process(); "
            "from vtransfer.utils.allocator import malloc_tuning; print(malloc_tuning().describe())")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=_clean_env(),
                       cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    expected = "malloc: M_MMAP_MAX=0 " if ON_GLIBC else "malloc: unchanged (not glibc"
    assert r.stdout.startswith(expected), r.stdout
