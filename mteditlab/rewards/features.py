"""Image features of a world image, measured against its own parsed-and-re-rendered scene.

The verifier reads an image into a scene (:func:`mteditlab.world.parse_image`); re-rendering that
scene gives the *clean* image the editor should have drawn if it meant that scene. The residual
``image − render(parse(image))`` then isolates what is not content: blur, noise, a background tint.

* ``quality`` = ``1 − min(1, RMS(residual) / QUALITY_RMS_SCALE)`` over all pixels and channels
  (values in [0, 1] units). 1 = pixel-exact render of the scene it shows. Reference points at
  32×32 (40 train scenes): a clean render 0.999 (uint8 rounding); mild blur (Gaussian σ 0.6 px)
  0.88–0.96; a background tint of norm 24/255 (``mteditlab.simulation.TINTS``) ≈ 0.8; junk in a cell
  (an ``UNKNOWN`` read) lower still.
* ``tint`` = ``min(1, ‖median residual over pure-background pixels‖₂ / TINT_SCALE)``: how far the
  background colour is from the nearest palette background (0 = on the palette; a 24/255 tint
  ≈ 0.38). Pure-background pixels are those the re-rendered scene leaves uncovered by any object.
* ``sharpness`` = ``min(1, E(image) / E(render))`` with ``E`` the mean squared finite-difference
  gradient: 1 for a crisp image, lower for a blurred one (σ 0.6 px ≈ 0.57; 1 when the scene has no
  edges).

Parsing costs ~8 ms at 32×32; :func:`parse_cached` memoises it by pixel content, so scoring a
multi-turn rollout (each output is the next turn's input) parses every image once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
from PIL import Image

from mteditlab.world import DEFAULT_RESOLUTION, Obj, Scene, parse_image, render_array
from mteditlab.world.verifier import to_array

QUALITY_RMS_SCALE = 0.25
TINT_SCALE = 0.25
IMAGE_FEATURES: tuple[str, ...] = ("quality", "tint", "sharpness")
_CACHE_SIZE = 4096
_cache: OrderedDict[str, Scene] = OrderedDict()


def _key(array: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def parse_cached(image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION) -> Scene:
    """:func:`parse_image`, memoised by pixel content (LRU of 4096 scenes)."""
    array = image if isinstance(image, np.ndarray) else to_array(image, resolution)
    key = _key(array)
    scene = _cache.get(key)
    if scene is None:
        scene = parse_image(array, resolution)
        _cache[key] = scene
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return scene


def background_transmission(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """``[H, W]`` share of each pixel's colour that comes from the background (1 = no object).

    The renderer composites objects over the background, so a pixel is linear in the background
    colour; rendering the same cells on two backgrounds recovers the coefficient exactly."""
    cells = _known(scene.cells)
    white = render_array(Scene("white", cells), resolution)
    black = render_array(Scene("black", cells), resolution)
    return ((white - black)[..., 0] / ((245 - 20) / 255)).clip(0, 1)


def _known(cells: tuple) -> tuple:
    """Cells with unreadable (``UNKNOWN``) ones rendered as empty."""
    return tuple(c if isinstance(c, Obj) else None for c in cells)


def clean_render(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> tuple[Scene, np.ndarray]:
    """The scene without its unreadable cells, and its render: what a clean image of ``scene`` is."""
    clean_scene = Scene(scene.background, _known(scene.cells))
    return clean_scene, render_array(clean_scene, resolution)


def _gradient_energy(array: np.ndarray) -> float:
    return float((np.diff(array, axis=0) ** 2).mean() + (np.diff(array, axis=1) ** 2).mean())


def image_features(image: Image.Image | np.ndarray, resolution: int = DEFAULT_RESOLUTION,
                   scene: Scene | None = None) -> dict[str, float]:
    """``{"quality", "tint", "sharpness"}`` in [0, 1] (see the module docstring)."""
    array = image if isinstance(image, np.ndarray) else to_array(image, resolution)
    scene = scene if scene is not None else parse_cached(array, resolution)
    clean_scene, clean = clean_render(scene, resolution)
    residual = array - clean
    rms = float(np.sqrt((residual ** 2).mean()))
    transmission = background_transmission(clean_scene, resolution)
    background = transmission > 0.999
    tint = float(np.linalg.norm(np.median(residual[background], axis=0))) if background.any() else 0.0
    reference = _gradient_energy(clean)
    sharpness = min(1.0, _gradient_energy(array) / reference) if reference > 1e-9 else 1.0
    return {"quality": 1.0 - min(1.0, rms / QUALITY_RMS_SCALE),
            "tint": min(1.0, tint / TINT_SCALE),
            "sharpness": float(sharpness)}


def differentiable_quality(pixels):
    """``quality`` of a batch of float pixels ``[B, 3, r, r]`` in [−1, 1] as a tensor ``[B]`` with
    gradients to the pixels: each image is parsed as its uint8 rendering would be, and the clean
    render of that scene is held fixed while the residual is measured against it."""
    import torch

    x = (pixels.clamp(-1, 1) + 1) / 2
    arrays = (x.detach().permute(0, 2, 3, 1).cpu().numpy() * 255).round() / 255
    clean = [clean_render(parse_cached(a.astype(np.float32), x.shape[-1]), x.shape[-1])[1] for a in arrays]
    clean = torch.from_numpy(np.stack(clean)).float().permute(0, 3, 1, 2).to(x.device)
    rms = ((x - clean) ** 2).flatten(1).mean(1).sqrt()
    return 1 - (rms / QUALITY_RMS_SCALE).clamp(max=1)
