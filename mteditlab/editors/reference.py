"""Reference editors that check the harness: ``oracle`` renders the true target, ``identity`` returns
its input unchanged."""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from mteditlab.world import DEFAULT_RESOLUTION, parse_image, parse_instruction, render

from .base import Editor, register_editor


@register_editor("identity")
class IdentityEditor(Editor):
    """Returns its input: instruction following ≈ 0, content consistency = 1."""

    world = True

    def edit_batch(self, images: Sequence[Image.Image], instructions: Sequence[str], **_) -> list[Image.Image]:
        return [image.copy() for image in images]


@register_editor("oracle")
class OracleEditor(Editor):
    """Reads the scene from the image, parses the (reconstructed) instruction with the world's grammar
    and renders the exact result. Text it cannot parse leaves the image unchanged."""

    world = True

    def __init__(self, resolution: int = DEFAULT_RESOLUTION):
        self.resolution = resolution

    def edit_batch(self, images: Sequence[Image.Image], instructions: Sequence[str], *,
                   intents: Sequence[str | None] | None = None, **_) -> list[Image.Image]:
        intents = intents or [None] * len(images)
        outputs = []
        for image, text, intent in zip(images, instructions, intents):
            scene = parse_image(image, self.resolution)
            edit = parse_instruction(intent or text, scene)
            outputs.append(render(edit.apply(scene), self.resolution) if edit else image.copy())
        return outputs
