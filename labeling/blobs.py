"""The content-addressed image store beside the database.

Each image is stored once as ``<dir>/<sha[:2]>/<sha>.png``, where ``sha`` is the sha256 of a
canonical PNG re-encoding of its pixels (:func:`canonical_png`), so equal pixels give one file.
Files are written atomically (temp file, fsync, rename) and verified against their hash on
read.  Paths are only ever derived from a validated hex digest: no path a client sends is
opened.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from labeling.errors import StoreError

_SHA_RE = re.compile(r"[0-9a-f]{64}")


def check_sha(sha: Any) -> str:
    """``sha`` if it is a sha256 hex digest, else ValueError."""
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return sha


def canonical_png(image: bytes | bytearray | memoryview | Image.Image) -> tuple[bytes, Image.Image]:
    """Decode ``image`` and re-encode it as a metadata-free PNG; returns (png bytes, image)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as opened:
            opened.load()
            img = opened.copy()
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"expected PNG/JPEG bytes or a PIL image, got {type(image).__name__}")
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        has_alpha = "A" in img.mode or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    clean = Image.frombytes(img.mode, img.size, img.tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), clean


class ImageBlobs:
    """PNG files under ``root`` named by the sha256 of their canonical encoding."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        """Where the image ``sha`` lives (validated digest; the file may not exist)."""
        sha = check_sha(sha)
        return self.root / sha[:2] / f"{sha}.png"

    def put(self, image: bytes | bytearray | memoryview | Image.Image
            ) -> tuple[str, bytes, Image.Image]:
        """Store ``image`` once; returns (sha256, canonical png bytes, decoded image)."""
        png, img = canonical_png(image)
        sha = hashlib.sha256(png).hexdigest()
        target = self.path(sha)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(png)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return sha, png, img

    def read(self, sha: str) -> bytes:
        """The stored PNG for ``sha``, verified against its hash."""
        data = self.path(sha).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise StoreError(f"image {sha} is corrupt on disk")
        return data

    def image(self, sha: str) -> Image.Image:
        """The stored image for ``sha`` as a loaded PIL image."""
        with Image.open(io.BytesIO(self.read(sha))) as img:
            img.load()
            return img.copy()
