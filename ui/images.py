"""Safe image loading for uploads, and the in-process image bank.

``load_upload`` turns whatever a user sends into a plain 8-bit RGB image or raises
:class:`ImageInputError` with a message fit for the UI:

* not an image / a format Pillow cannot read  -> "not an image"
* a truncated or corrupt file                 -> "truncated or corrupt"
* a decompression bomb (too many pixels, checked from the header before decoding)
* grayscale, palette, 16-bit and float modes  -> converted (16-bit scaled, not clipped)
* transparency (RGBA, LA, palette with tRNS)  -> composited over white
* EXIF orientation                            -> applied
* animations                                  -> first frame

``prepare_source`` then centre-crops to a square and resizes to the editors' working size.

The :class:`ImageBank` keeps every image of the live sessions as PNG bytes keyed by sha256, so
the per-user ``gr.State`` holds only hashes (small, deep-copyable).  An image that leaves its
memory before the label store has it waits on disk for as long as a live session refers to it,
and only that long: no image a live session refers to is lost, and the disk holds no others.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import struct
import tempfile
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000          # per frame; a 40 MP photo is fine, a 20k×20k bomb is not
DISPLAY_SIZE = 256


class ImageInputError(ValueError):
    """The input is not an image the app can use; ``str(error)`` is shown to the user."""


def _read(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.path.getsize(path)
            if size > MAX_FILE_BYTES:
                raise ImageInputError(f"The file is {size / 2**20:.1f} MB; the limit is "
                                      f"{MAX_FILE_BYTES // 2**20} MB.")
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ImageInputError(f"Could not read the uploaded file ({exc.strerror}).") from None
    else:
        raise ImageInputError(f"Expected an image file, got {type(source).__name__}.")
    if len(data) > MAX_FILE_BYTES:
        raise ImageInputError(f"The file is larger than {MAX_FILE_BYTES // 2**20} MB.")
    if not data:
        raise ImageInputError("The file is empty.")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; 16-bit / float scaled by their range, alpha over white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            top = 65535.0
        elif mode == "F":
            top = 1.0 if np.nanmax(array, initial=0) <= 1.0 else 255.0
        else:  # 32-bit int: 16-bit PNGs decode to "I" in some Pillow versions
            top = 65535.0 if np.nanmax(array, initial=0) > 255 else 255.0
        array = np.clip(np.nan_to_num(array) / top * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(array, "L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "L" and "transparency" in image.info:
        image = image.convert("LA")
    elif mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_upload(source) -> Image.Image:
    """Decode an uploaded image safely (see the module docstring); returns RGB."""
    data = _read(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            width, height = opened.size
            if width < 1 or height < 1:
                raise ImageInputError("The image has no pixels.")
            if width * height > MAX_PIXELS:
                raise ImageInputError(
                    f"The image is {width}×{height} = {width * height / 1e6:.0f} megapixels; "
                    f"the limit is {MAX_PIXELS / 1e6:.0f} (decompression bombs are refused).")
            opened.seek(0)
            opened.load()
            image = ImageOps.exif_transpose(opened) or opened
            image.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError("The image declares far more pixels than allowed "
                              "(a decompression bomb?); it was refused.") from None
    except UnidentifiedImageError:
        raise ImageInputError("This file is not an image (or not a format the app can read: "
                              "use PNG, JPEG, WebP, GIF, BMP or TIFF).") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        text = str(exc)
        if "truncated" in text or isinstance(exc, (EOFError, IndexError)) or "broken" in text:
            raise ImageInputError("The image file is truncated or corrupt; upload it again.") \
                from None
        raise ImageInputError(f"The image could not be decoded ({text or type(exc).__name__}).") \
            from None
    return to_rgb(image)


def prepare_source(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` (BOX when shrinking: exact for world
    renders that were upscaled by an integer factor)."""
    image = to_rgb(image)
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        method = Image.Resampling.BOX if image.width >= size else Image.Resampling.LANCZOS
        image = image.resize((size, size), method)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """The label store's canonical PNG of the RGB pixels, so that the bank's sha256 is the
    store's (``LabelStore.put_image`` of these bytes returns the same hash)."""
    from labeling.blobs import canonical_png

    return canonical_png(to_rgb(image))[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def for_display(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """Upscale small images with NEAREST (crisp pixels) to about ``size``; big ones as they are."""
    if image.width >= size:
        return image
    factor = max(1, size // image.width)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


class ImageBank:
    """Thread-safe content-addressed PNG cache (sha256 of the canonical PNG -> bytes), its memory
    LRU-bounded by ``max_bytes``.

    A 32×32 world image is ~0.3–1 kB, so the default 512 MB bound is never reached by the mini
    editor; with megapixel backends the oldest images leave memory first.  ``fallback`` (the
    label store's ``image_bytes``) is where an image that left memory is read again.  An image
    it cannot return yet (an arena turn is stored only when someone votes in its session) that
    a *holder* refers to (:meth:`hold`; the arena's holders are its live sessions) is written
    to the bank's spill directory on disk before it leaves memory, and read from there, until no
    holder refers to it: with a fallback the bank loses no image a holder refers to, and its
    disk holds only such images.  Without a fallback it is a plain LRU cache.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, fallback=None):
        self.max_bytes = max_bytes
        self.fallback = fallback
        self._data: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._spill: tempfile.TemporaryDirectory | None = None   # made on the first spill
        self._spilled: set[str] = set()
        self._held: dict[object, frozenset[str]] = {}             # holder -> the shas it refers to
        self._holders: collections.Counter[str] = collections.Counter()   # sha -> holders

    @property
    def spill_dir(self) -> str | None:
        """The directory of the images waiting on disk (None until the first one)."""
        return None if self._spill is None else self._spill.name

    def put(self, image: Image.Image, holder=None) -> str:
        """Add ``image``; returns its sha256.  ``holder``: one more image it refers to (see
        :meth:`hold`), from before the image can leave memory."""
        data = png_bytes(image)
        sha = sha256(data)
        with self._lock:
            if holder is not None:
                self._refer(holder, self._held.get(holder, frozenset()) | {sha})
            if sha in self._data:
                self._data.move_to_end(sha)
                return sha
            self._data[sha] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._data) > 1:
                old_sha, old = self._data.popitem(last=False)
                self._bytes -= len(old)
                self._keep(old_sha, old)
        return sha

    def hold(self, holder, shas) -> None:
        """Say which images ``holder`` (any hashable) refers to now: exactly ``shas`` (none: it
        lets go of all).  An image no holder refers to any more leaves the spill directory."""
        with self._lock:
            self._refer(holder, frozenset(shas))

    def _refer(self, holder, shas: frozenset[str]) -> None:
        """:meth:`hold` under the lock."""
        before = self._held.pop(holder, frozenset())
        if shas:
            self._held[holder] = shas
        self._holders.update(shas - before)
        self._holders.subtract(before - shas)
        for sha in before - shas:
            if self._holders[sha] <= 0:
                del self._holders[sha]
                if sha in self._spilled:
                    self._spilled.discard(sha)
                    os.unlink(os.path.join(self._spill.name, sha))

    def _keep(self, sha: str, data: bytes) -> None:
        """Write an image leaving memory to the spill directory when a holder refers to it and
        the fallback does not return it.  Runs under the lock, so no reader finds it in neither
        place."""
        if (self.fallback is None or sha in self._spilled or not self._holders[sha]
                or self._fallback_has(sha)):
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="mteditlab-bank-")
        with open(os.path.join(self._spill.name, sha), "wb") as fh:
            fh.write(data)
        self._spilled.add(sha)

    def _fallback_has(self, sha: str) -> bool:
        try:
            self.fallback(sha)
        except Exception:  # noqa: BLE001 - whatever the reason, it cannot return the image
            return False
        return True

    def get_bytes(self, sha: str) -> bytes:
        with self._lock:
            data = self._data.get(sha)
            if data is not None:
                self._data.move_to_end(sha)
                return data
            if sha in self._spilled:
                with open(os.path.join(self._spill.name, sha), "rb") as fh:
                    return fh.read()
        if self.fallback is not None:
            return self.fallback(sha)
        raise KeyError(f"image {sha[:12]} is no longer in memory")

    def get(self, sha: str) -> Image.Image:
        with Image.open(io.BytesIO(self.get_bytes(sha))) as image:
            image.load()
            return image.convert("RGB")

    def __contains__(self, sha: str) -> bool:
        """Whether the bank returns ``sha`` without asking the fallback."""
        with self._lock:
            return sha in self._data or sha in self._spilled




class DisplayFiles:
    """Display-size PNG files of bank images, written once and atomically.

    The UI hands gradio *file paths*, not PIL images: gradio re-encodes a returned PIL image and
    rewrites its cache file in place on every response (``write_bytes``), so a browser fetching
    an image that another response is rewriting at that moment (the same source thumbnail is in
    every response of a session, and equal images are shared between users) can get a broken
    file.  The files are written once, atomically, and never change, so the app serves their
    folder as a gradio static path (``ui/build.py``): gradio neither copies nor hashes them."""

    def __init__(self, bank: ImageBank, directory: str | os.PathLike):
        self.bank = bank
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)

    def path(self, sha: str, size: int = DISPLAY_SIZE) -> str:
        target = os.path.join(self.directory, f"{sha[:32]}-{size}.png")
        if not os.path.exists(target):
            image = for_display(self.bank.get(sha), size)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    image.save(fh, format="PNG")
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        return target
