"""Write the example session dataset beside this file: ``sessions.jsonl`` plus ``images/``.

Two sessions are world scenes rendered at 256 px with their exact intents and reference outputs
(the true target of each turn); two are drawn with PIL — a landscape (320×192) and a still life
(192×256) — with instructions only, or some explicit intents. Run ``python -m examples.sessions.make_sessions`` from the repository root.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from mteditlab.world import generate_session, render

HERE = Path(__file__).resolve().parent
RESOLUTION = 256


def world_session(index: int, turns: int, name: str) -> dict:
    session = generate_session("train", index, turns)
    paths = [save(render(scene, RESOLUTION), f"{name}_{k}.png") for k, scene in enumerate(session.scenes)]
    return {"id": name, "source": paths[0], "instructions": [t.instruction for t in session.turns],
            "intents": [t.intent for t in session.turns], "references": paths[1:], "origin": "world"}


def landscape() -> Image.Image:
    image = Image.new("RGB", (320, 192))
    draw = ImageDraw.Draw(image)
    for y in range(120):  # sky: a vertical gradient
        draw.line([(0, y), (319, y)], fill=(70 + y // 2, 130 + y // 3, 230))
    draw.ellipse([230, 24, 278, 72], fill=(250, 220, 60))
    draw.polygon([(0, 192), (0, 120), (90, 95), (200, 125), (320, 110), (320, 192)], fill=(60, 150, 70))
    draw.rectangle([60, 130, 100, 165], fill=(170, 60, 50))
    draw.polygon([(55, 130), (80, 110), (105, 130)], fill=(110, 40, 40))
    return image


def still_life() -> Image.Image:
    image = Image.new("RGB", (192, 256), (235, 225, 205))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 170, 191, 255], fill=(140, 100, 70))
    draw.rectangle([40, 110, 90, 170], fill=(200, 40, 40))
    draw.arc([80, 120, 110, 155], -90, 90, fill=(200, 40, 40), width=6)
    draw.ellipse([120, 140, 160, 180], fill=(60, 110, 200))
    return image


def save(image: Image.Image, name: str) -> str:
    (HERE / "images").mkdir(exist_ok=True)
    image.save(HERE / "images" / name, optimize=True)
    return f"images/{name}"


def main() -> None:
    records = [
        world_session(3, 3, "world-3"),
        world_session(11, 2, "world-11"),
        {"id": "landscape", "source": save(landscape(), "landscape.png"),
         "instructions": ["make the sun orange", "add a second house next to the red one", "make it night"],
         "origin": "drawn"},
        {"id": "still-life", "source": save(still_life(), "still_life.png"),
         "instructions": ["make the mug blue", "remove the ball", "make it bigger"],
         "intents": [None, "remove the blue ball", "make the blue mug bigger"], "origin": "drawn"},
    ]
    with (HERE / "sessions.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
