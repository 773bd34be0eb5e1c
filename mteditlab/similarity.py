"""Image similarity to a reference in a vision model's embedding space (DINO, CLIP): the semantic
distance MagicBrush-style benchmarks report beside L1.

    similarity = ImageSimilarity("path/to/dinov2-base")      # a local folder: model + image processor
    similarity(outputs, references)                          # cosine similarities, one per pair

The folder is what ``save_pretrained`` writes for a transformers vision model and its image processor
(``Dinov2Model``, ``CLIPModel``, ``CLIPVisionModel``, ...); nothing is downloaded. The embedding is the
model's image features where it has them (CLIP's ``get_image_features``), else its pooled output (DINO's
CLS token); similarity = cos(e(output), e(reference)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


class ImageSimilarity:
    """Cosine similarity of two images' embeddings under the vision model saved at ``path``."""

    def __init__(self, path: str | Path):
        from transformers import AutoImageProcessor, AutoModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no model here; give a local folder holding a vision model and its "
                                    "image processor (save_pretrained of e.g. facebook/dinov2-base or "
                                    "openai/clip-vit-base-patch32)")
        self.name = path.name
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def embed(self, images: Sequence[Image.Image]):
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            if hasattr(self.model, "get_image_features"):
                features = self.model.get_image_features(pixel_values=pixels)
                features = getattr(features, "pooler_output", features)
            else:
                features = self.model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def __call__(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> np.ndarray:
        """cos(e(image_i), e(reference_i)) for each pair."""
        return (self.embed(images) * self.embed(references)).sum(-1).numpy().astype(float)
