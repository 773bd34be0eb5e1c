"""Qwen-Image-Edit behind the editor protocol (diffusers ``QwenImageEditPlusPipeline`` for
Qwen-Image-Edit-2509, ``QwenImageEditPipeline`` for the original Qwen-Image-Edit)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from mteditlab.editors.base import register_editor
from mteditlab.editors.hub import EditCondition, PipelineEditor

AREAS_ENV = "MTEDITLAB_QWEN_EDIT_AREAS"


@register_editor("qwen-edit")
class QwenEditEditor(PipelineEditor):
    """Qwen-Image-Edit: Qwen2.5-VL reads the instruction with the image; the VAE latents of the
    image are packed as extra tokens after the target's.

    The output takes the input's size rounded down to the model's multiple (16). As in the
    pipelines, the VL encoder sees the image resized to ``condition_area`` pixels and the context
    latents come from the image resized to ``context_area`` pixels (the pipeline's values by
    default: 384² and 1024² for the Plus pipeline, 1024² for both in the original one; the
    environment variable ``MTEDITLAB_QWEN_EDIT_AREAS=CONDITION,CONTEXT`` in pixels overrides them
    wherever the editor is built: app, benchmark, trainer).

    No true CFG: one transformer call per step with the positive prompt only — in the RL path (the
    policy is the conditional model, as in Flow-GRPO / DiffusionNFT) and therefore in the app too;
    this matches the pipeline called without ``negative_prompt``, not its ``true_cfg_scale=4`` recipe.
    """

    default_steps = 50  # the pipelines' default
    default_model_id = "Qwen/Qwen-Image-Edit-2509"
    model_id_env = "MTEDITLAB_QWEN_EDIT_ID"
    pipeline_classes = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")
    data_resolution = "qwen-edit"   # Qwen-Image-Edit's area
    # attention projections of the image and text streams (Flow-GRPO's attention-only set)
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, pipe, *, device: str | torch.device | None = None, condition_area: int | None = None,
                 context_area: int | None = None):
        from diffusers import QwenImageEditPlusPipeline
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

        super().__init__(pipe, device=device)
        self.plus = isinstance(pipe, QwenImageEditPlusPipeline)
        one_megapixel = 1024 * 1024  # QwenImageEditPipeline's size for both the VL and the VAE paths
        env = os.environ.get(AREAS_ENV, "").split(",")
        self.condition_area = (condition_area or int(env[0] or 0) or
                               (edit_plus.CONDITION_IMAGE_SIZE if self.plus else one_megapixel))
        self.context_area = (context_area or (int(env[1] or 0) if len(env) > 1 else 0) or
                             (edit_plus.VAE_IMAGE_SIZE if self.plus else one_megapixel))

    @classmethod
    def pipeline_components(cls, root: Path) -> dict:
        """Without torchvision, the pipeline's ``Qwen2VLProcessor`` cannot be built (its video
        processor needs torchvision): load the image-only variant from ``root/processor`` instead."""
        from transformers import Qwen2VLProcessor
        from transformers.utils import is_torchvision_available

        from mteditlab.rewards.qwen_vl import image_only_processor_class

        if is_torchvision_available():
            return {}
        return {"processor": image_only_processor_class(Qwen2VLProcessor).from_pretrained(root / "processor")}

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> EditCondition:
        """Qwen2.5-VL states of (image, instruction) — padded across the batch with a mask — the packed
        context latents, and the ``img_shapes`` (target, context) the transformer's RoPE needs."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

        pipe = self.pipe
        height, width = self.output_size(images)
        ratio = images[0].width / images[0].height
        condition_width, condition_height = edit_plus.calculate_dimensions(self.condition_area, ratio)
        context_width, context_height = edit_plus.calculate_dimensions(self.context_area, ratio)
        states = []
        for image, text in zip(images, texts):
            image = pipe.image_processor.resize(image, condition_height, condition_width)
            embeds, _ = pipe.encode_prompt(prompt=[text], image=[image] if self.plus else image, device=self.device)
            states.append(embeds[0])
        prompt_embeds = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        lengths = torch.tensor([len(state) for state in states], device=self.device)
        mask = (torch.arange(prompt_embeds.shape[1], device=self.device) < lengths[:, None]).long()
        context = self._latents(images, context_height, context_width)
        patch = pipe.vae_scale_factor * 2
        img_shapes = [[(1, height // patch, width // patch), (1, context_height // patch, context_width // patch)]]
        return EditCondition(context, height, width, dict(
            encoder_hidden_states=prompt_embeds, encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=img_shapes * len(images)))

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.pipe._encode_vae_image(pixels.unsqueeze(2), generator=None)  # [B, C, 1, h, w], normalised
        batch, channels, _, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def _vae_decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean  # the pipeline's exact arithmetic
        return vae.decode(latents, return_dict=False)[0][:, :, 0]
