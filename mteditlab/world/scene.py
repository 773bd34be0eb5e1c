"""Scenes of the editing world and their deterministic anti-aliased renderer.

A scene is a background colour plus at most one object per cell of a 3×3 grid; an object is
(shape, colour, size). Rendering supersamples 4× and box-filters down, so edges are anti-aliased
and the same scene always gives the same pixels at a given resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "gray": (170, 170, 170),
    "black": (20, 20, 20),
    "beige": (225, 205, 165),
}
SIZES = {"small": 0.6, "large": 0.9}  # object extent as a fraction of the cell
GRID = 3
CELLS = ("top left", "top middle", "top right",
         "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right")
DEFAULT_RESOLUTION = 32
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str

    def describe(self, with_size: bool = False) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


class _Unknown:
    """A cell the verifier could not read (the editor drew something that is no object of the world)."""

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __eq__(self, other) -> bool:  # an unreadable cell never matches anything, itself included
        return False

    __hash__ = object.__hash__


UNKNOWN = _Unknown()
Cell = Obj | None | _Unknown


@dataclass(frozen=True)
class Scene:
    background: str
    cells: tuple  # GRID*GRID entries of Obj | None (| UNKNOWN in parsed scenes)

    @classmethod
    def empty(cls, background: str = "white") -> "Scene":
        return cls(background, (None,) * GRID * GRID)

    def with_cell(self, index: int, value: Cell) -> "Scene":
        cells = list(self.cells)
        cells[index] = value
        return replace(self, cells=tuple(cells))

    def objects(self) -> list[tuple[int, Obj]]:
        return [(i, o) for i, o in enumerate(self.cells) if isinstance(o, Obj)]

    def empty_cells(self) -> list[int]:
        return [i for i, o in enumerate(self.cells) if o is None]

    def key(self) -> str:
        """Canonical text form (used for hashing scenes into splits)."""
        parts = [self.background] + ["-" if o is None else f"{o.size}/{o.colour}/{o.shape}" for o in self.cells]
        return "|".join(parts)


def neighbour(cell: int, direction: str) -> int | None:
    """The adjacent cell in ``direction`` (left/right/up/down), or None at the border."""
    row, col = divmod(cell, GRID)
    row += {"up": -1, "down": 1}.get(direction, 0)
    col += {"left": -1, "right": 1}.get(direction, 0)
    return row * GRID + col if 0 <= row < GRID and 0 <= col < GRID else None


def cell_bounds(cell: int, resolution: int) -> tuple[int, int, int, int]:
    """Pixel box ``(y0, y1, x0, x1)`` of a cell at ``resolution``."""
    row, col = divmod(cell, GRID)
    edges = [round(k * resolution / GRID) for k in range(GRID + 1)]
    return edges[row], edges[row + 1], edges[col], edges[col + 1]


@lru_cache(maxsize=512)
def _shape_mask(shape: str, size: str, cell: int, resolution: int) -> np.ndarray:
    """Coverage in [0, 1] of one object at full resolution (anti-aliased by supersampling)."""
    n = resolution * _SUPERSAMPLE
    cell_px = n / GRID
    row, col = divmod(cell, GRID)
    cy, cx = (row + 0.5) * cell_px, (col + 0.5) * cell_px
    r = SIZES[size] * cell_px / 2
    y, x = np.mgrid[0:n, 0:n] + 0.5
    dy, dx = (y - cy) / r, (x - cx) / r
    if shape == "circle":
        mask = dx**2 + dy**2 <= 0.9**2
    elif shape == "square":
        mask = (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    elif shape == "triangle":  # apex up, base at the bottom
        mask = (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return mask.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean((1, 3))


def render_array(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Float RGB array in [0, 1], shape ``[resolution, resolution, 3]``."""
    image = np.empty((resolution, resolution, 3), dtype=np.float32)
    image[:] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) / 255
    for cell, obj in scene.objects():
        alpha = _shape_mask(obj.shape, obj.size, cell, resolution)[..., None]
        image = image * (1 - alpha) + alpha * (np.asarray(COLOURS[obj.colour], dtype=np.float32) / 255)
    return image


def render(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> Image.Image:
    """The scene as an RGB PIL image."""
    return Image.fromarray(np.round(render_array(scene, resolution) * 255).astype(np.uint8), "RGB")
