"""Test-session setup shared by every test module, and the fixtures many of them need.

Fixtures:

* ``home``: an empty, offline ``VTRANSFER_HOME`` for one test (``tmp_path/vthome``).
* ``demo_datasets``: ``demo_datasets(name, **make_demo_options)``, a make-demo folder built once per session
  for each set of options. Shared: read it, never write into it (copy it with ``shutil.copytree`` first).
* ``demo_dataset``: the small one most end-to-end tests train on (:data:`DEMO`).
* ``no_decoding``: any video opened for reading while the test runs fails the test.
* torch computes on one thread for the whole session (a module that wants more sets it for itself).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

# A suite started in the background of a non-interactive shell (`script &`) inherits SIGINT ignored, and so would
# every vtransfer process a test starts: Python then never raises KeyboardInterrupt, and the Ctrl-C tests
# (test_interrupts, test_crash_safety) would fail for how the suite was launched, not for what vtransfer does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: The shared small demo dataset: the six target classes (3 appearance, 3 motion), 4 videos each, 16 frames at 48x48.
DEMO = dict(class_set="target", videos_per_class=4, frames=16, size=48, seed=3)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread: the tiny models gain nothing from more, and the suite shares its CPUs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """``VTRANSFER_HOME`` (weights cache, source registry) in the test's own tmp_path, not yet created; offline."""
    path = tmp_path / "vthome"
    monkeypatch.setenv("VTRANSFER_HOME", str(path))
    monkeypatch.setenv("VTRANSFER_OFFLINE", "1")
    return path


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="session")
def demo_datasets(tmp_path_factory):
    """``demo_datasets(name="data", **options)``: the folder ``make_demo`` writes with ``options``, named ``name``.

    Each set of options is encoded once per session (another name gets a copy). The folders are shared by every
    test that asks for the same options: a test that changes its dataset copies it first. The session ends with
    an error naming any shared folder that a test changed.
    """
    from vtransfer.data.demo import make_demo

    encoded: dict[tuple, Path] = {}
    named: dict[tuple, Path] = {}
    listings: dict[Path, dict] = {}

    def demo(name: str = "data", **options) -> Path:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
        if (key, name) not in named:
            root = tmp_path_factory.mktemp("demo") / name
            if key in encoded:
                shutil.copytree(encoded[key], root)
            else:
                make_demo(root, **options)
                encoded[key] = root
            named[key, name] = root
            listings[root] = _listing(root)
        return named[key, name]

    yield demo
    changed = [str(root) for root, listing in listings.items() if _listing(root) != listing]
    assert not changed, f"a test changed the shared demo dataset(s) {changed}; copy one before changing it"


@pytest.fixture(scope="session")
def demo_dataset(demo_datasets) -> Path:
    """The shared small demo dataset (:data:`DEMO`), in a folder named ``data``. Read-only: copy it to change it."""
    return demo_datasets("data", **DEMO)


class VideoOpened(BaseException):
    """Raised by ``no_decoding``. Not an Exception: code that records a bad video and goes on cannot swallow it."""


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if a video is opened for reading while it runs (to decode it or to read its header).

    Every read goes through PyAV's ``av.open`` (``vtransfer.data.decode``), which is patched; writing videos
    (make-demo) is left alone. The in-memory frame caches that ``compare-policies`` shares between runs are
    emptied, so frames an earlier test decoded are not served without decoding. The opened paths are checked
    again when the test ends, in case something caught the error.
    """
    import av

    from vtransfer.data import clips

    opened: list[str] = []
    real_open = av.open

    def guarded_open(file, mode=None, *args, **kwargs):
        if mode is None or str(mode).startswith("r"):
            opened.append(str(file))
            raise VideoOpened(f"a video was opened for reading: {file}")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(av, "open", guarded_open)
    monkeypatch.setattr(clips, "_READERS", {})
    yield opened
    assert not opened, f"videos were opened for reading: {opened}"
