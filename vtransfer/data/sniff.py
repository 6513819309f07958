"""Recognise video files by their first bytes, not only by their extension.

The scanner calls :func:`classify_file` on every file it meets. It reads at
most a few kilobytes, never decodes, and answers either "this is a video
container" or "skip it, because ...". Whether the video inside can really be
decoded is for ``vtransfer check`` (which probes every file) to find out.

Rules, in order:

1. names starting with ``.`` are skipped ("hidden file");
2. empty files are skipped ("zero-byte file");
3. content that matches a known video container is accepted, whatever the
   extension (a ``.bin`` that holds an MP4 is a video);
4. content that is recognisably something else -- text, an image, audio, a
   document or an archive -- is skipped ("not a video (text file)"), even when
   the extension says ``.mp4``;
5. unrecognised binary content is accepted when the extension is a video
   extension (raw streams and rare containers are left for the decoder to
   judge) and skipped otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Extensions treated as video when the content is not recognised either way.
VIDEO_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".qt", ".3gp", ".3g2", ".f4v",
        ".avi", ".divx", ".mkv", ".webm", ".mk3d",
        ".mpg", ".mpeg", ".m2v", ".vob", ".ts", ".mts", ".m2ts",
        ".flv", ".ogv", ".ogg", ".wmv", ".asf", ".y4m", ".ivf",
        ".h264", ".264", ".h265", ".hevc", ".rm", ".rmvb",
    }
)

_HEAD_BYTES = 4096

# ISO-BMFF major brands that mean "audio only" (iTunes audio / audiobooks).
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}
# QuickTime files may start with atoms other than 'ftyp'.
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


@dataclass(frozen=True)
class Sniffed:
    """What :func:`classify_file` found.

    Attributes:
        container: short container name (``"mp4"``, ``"avi"``, ...) or ``None``
            when the content was not recognised as a video container.
        skip_reason: why the file should be skipped, or ``None`` to keep it.
    """

    container: str | None
    skip_reason: str | None

    @property
    def is_video(self) -> bool:
        """True when the file should be kept as a video."""
        return self.skip_reason is None


def _read_head(path: Path, size: int = _HEAD_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def container_from_bytes(head: bytes) -> str | None:
    """Name the video container whose magic bytes start ``head``, or ``None``."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AUDIO_BRANDS:
            return None
        if brand == b"qt  ":
            return "mov"
        if brand.startswith(b"3g"):
            return "3gp"
        return "mp4"
    if len(head) >= 8 and head[4:8] in _QUICKTIME_ATOMS:
        return "mov"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX", b"AMV "):
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm" if b"webm" in head[:64] else "matroska"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg-ps"
    if head[:4] == b"\x00\x00\x01\xb3":
        return "mpeg-video"
    if _is_mpeg_ts(head):
        return "mpegts"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:16] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11\xa6\xd9\x00\xaa\x00\x62\xce\x6c":
        return "asf"
    if head[:9] == b"YUV4MPEG2":
        return "y4m"
    if head[:4] == b"DKIF":
        return "ivf"
    if head[:4] == b".RMF":
        return "realmedia"
    if _is_annexb_h264(head):
        return "h264"
    return None


def _is_mpeg_ts(head: bytes) -> bool:
    """188-byte transport packets (sync byte 0x47 at 0, 188, ...), or 192-byte M2TS packets."""
    for packet, offset in ((188, 0), (192, 4)):
        positions = [p for p in (offset, offset + packet, offset + 2 * packet) if p < len(head)]
        if len(positions) >= 2 and all(head[p] == 0x47 for p in positions):
            return True
    return False


def _is_annexb_h264(head: bytes) -> bool:
    """A raw H.264 stream: a start code followed by an SPS (7) or access-unit delimiter (9)."""
    for start in (b"\x00\x00\x00\x01", b"\x00\x00\x01"):
        if head.startswith(start) and len(head) > len(start):
            nal_type = head[len(start)] & 0x1F
            forbidden_bit = head[len(start)] & 0x80
            return not forbidden_bit and nal_type in (7, 9)
    return False


def non_video_kind(head: bytes) -> str | None:
    """Name what ``head`` recognisably is when it is not a video ("text file", "PNG image", ...)."""
    signatures: tuple[tuple[bytes, str], ...] = (
        (b"\x89PNG\r\n\x1a\n", "PNG image"),
        (b"\xff\xd8\xff", "JPEG image"),
        (b"GIF87a", "GIF image"),
        (b"GIF89a", "GIF image"),
        (b"BM", "BMP image"),
        (b"II*\x00", "TIFF image"),
        (b"MM\x00*", "TIFF image"),
        (b"%PDF", "PDF document"),
        (b"PK\x03\x04", "zip archive"),
        (b"\x1f\x8b", "gzip archive"),
        (b"7z\xbc\xaf\x27\x1c", "7z archive"),
        (b"Rar!", "rar archive"),
        (b"ID3", "audio file (MP3)"),
        (b"fLaC", "audio file (FLAC)"),
        (b"\x7fELF", "executable"),
    )
    for magic, kind in signatures:
        if head.startswith(magic):
            # "BM" is short; require the BMP header's reserved zero bytes too.
            if kind == "BMP image" and (len(head) < 10 or head[6:10] != b"\x00\x00\x00\x00"):
                continue
            return kind
    if head[:4] == b"RIFF":
        form = head[8:12]
        if form == b"WAVE":
            return "audio file (WAV)"
        if form == b"WEBP":
            return "WebP image"
    if len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in _AUDIO_BRANDS:
        return "audio file (M4A)"
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] & 0x06) != 0:
        return "audio file (MP3)"
    if _looks_like_text(head):
        return "text file"
    return None


def _looks_like_text(head: bytes) -> bool:
    """No NUL bytes and decodes as UTF-8 (ignoring a character cut at the end), or is mostly printable."""
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        if e.start >= len(head) - 3:
            return True
    printable = sum(1 for b in head if b in (9, 10, 13) or 32 <= b < 127)
    return printable / len(head) > 0.95


def sniff_container(path: str | os.PathLike) -> str | None:
    """Return the video container that ``path``'s content announces, or ``None``.

    Recognised: MP4/MOV/M4V/3GP (``ftyp`` box or QuickTime atoms), AVI (RIFF),
    Matroska/WebM (EBML), MPEG-TS/M2TS, MPEG-PS, FLV, OGG, ASF/WMV, Y4M, IVF,
    RealMedia and raw H.264. Unreadable or empty files give ``None``.
    """
    try:
        return container_from_bytes(_read_head(Path(path)))
    except OSError:
        return None


def is_hidden(name: str) -> bool:
    """True for dot-files (``.DS_Store``, ``._clip.mp4``, ``.nfs...``)."""
    return name.startswith(".")


def classify_file(path: str | os.PathLike) -> Sniffed:
    """Decide whether the scanner keeps ``path`` as a video (see the module docstring for the rules)."""
    path = Path(path)
    if is_hidden(path.name):
        return Sniffed(None, "hidden file")
    try:
        size = path.stat().st_size
        if size == 0:
            return Sniffed(None, "zero-byte file")
        head = _read_head(path)
    except OSError as e:
        return Sniffed(None, f"cannot read file ({e.strerror or e})")
    container = container_from_bytes(head)
    if container is not None:
        return Sniffed(container, None)
    kind = non_video_kind(head)
    if kind is not None:
        return Sniffed(None, f"not a video ({kind})")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return Sniffed(None, None)
    return Sniffed(None, f"not a video (unrecognised content, extension {path.suffix or 'none'!r})")
