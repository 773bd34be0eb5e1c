"""FLUX.1 Kontext [dev] behind the editor protocol (diffusers ``FluxKontextPipeline``)."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from mteditlab.editors.base import register_editor
from mteditlab.editors.hub import EditCondition, PipelineEditor


@register_editor("kontext")
class KontextEditor(PipelineEditor):
    """FLUX.1 Kontext: the context image is VAE-encoded and packed as extra tokens after the target's.

    Chain-safe sizes: the context image and the output both take the input's size rounded down to
    the model's multiple (16) — what the pipeline does with ``height=h, width=w, max_area=h*w,
    _auto_resize=False``, never its default 1024² output or its preferred-resolution resize.
    The distilled guidance embedding gets ``guidance_scale`` (the pipeline's default, 3.5); there
    is no true CFG, so one transformer call per step, in the app and in RL alike.
    """

    default_steps = 28  # FluxKontextPipeline's default
    default_model_id = "black-forest-labs/FLUX.1-Kontext-dev"
    model_id_env = "MTEDITLAB_KONTEXT_ID"
    pipeline_classes = ("FluxKontextPipeline",)
    data_resolution = "kontext"   # Kontext's preferred sizes
    # Flow-GRPO's LoRA targets for Kontext: attention projections of both streams and the feed-forwards.
    lora_target_modules = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")

    def __init__(self, pipe, *, device: str | torch.device | None = None, guidance_scale: float = 3.5,
                 max_sequence_length: int = 512):
        super().__init__(pipe, device=device)
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> EditCondition:
        """T5 token embeddings + CLIP pooled embedding of each text, the packed context-image latents,
        the position ids of ``[target | context]`` tokens and the guidance value."""
        pipe, batch = self.pipe, len(images)
        height, width = self.output_size(images)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=list(texts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        context = self._latents(images, height, width)
        rows, cols = height // self.multiple_of, width // self.multiple_of
        target_ids = pipe._prepare_latent_image_ids(batch, rows, cols, self.device, prompt_embeds.dtype)
        context_ids = target_ids.clone()
        context_ids[:, 0] = 1  # the context image sits on its own "frame" of the 3-axis RoPE
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([batch], self.guidance_scale, device=self.device, dtype=torch.float32)
        return EditCondition(context, height, width, dict(
            encoder_hidden_states=prompt_embeds, pooled_projections=pooled, txt_ids=text_ids,
            img_ids=torch.cat([target_ids, context_ids]), guidance=guidance))

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.pipe._encode_vae_image(pixels, generator=None)  # mode, shifted and scaled
        return self.pipe._pack_latents(latents, *latents.shape)

    def _vae_decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.pipe.vae
        latents = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
