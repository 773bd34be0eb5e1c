"""Tiny random-weight editing pipelines, built from config dicts, fully offline.

The architectures are the real ones (``FluxKontextPipeline``, ``QwenImageEditPlusPipeline``,
``QwenImageEditPipeline``); only the sizes are tiny. Tokenizers are built in memory from small
vocabularies (nothing is downloaded), and the schedulers use the released models' dynamic-shift
settings so σ grids depend on the image size exactly as they do for the real checkpoints.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from mteditlab.rewards.qwen_vl import image_only_processor_class

# Scheduler configs of the released checkpoints (dynamic shifting; Qwen also stretches to 0.02).
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
QWEN_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)

FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=[4, 4, 8],
)
FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[4, 8], layers_per_block=1,
    latent_channels=2, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0609, scaling_factor=1.5035,
)
CLIP_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
    hidden_act="gelu", layer_norm_eps=1e-5, max_position_embeddings=77,
)
T5_TEXT = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)

QWEN_TRANSFORMER = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
)
QWEN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
QWEN_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
# The VL path sees at most a 56×56 image (4 merged vision tokens) whatever the input size.
QWEN_VL_IMAGE = dict(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, temporal_patch_size=2, merge_size=2)


# ---- tokenizers built in memory ---------------------------------------------------------------
def clip_tokenizer() -> CLIPTokenizer:
    """CLIP BPE over single characters (``</w>`` marks a word end); 77 positions as FLUX expects."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = list(chars) + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer over characters (ids 0–2 are pad, eos, unk, as in T5)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE without merges (one token per byte) plus Qwen's chat and vision tokens."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}  # alphabet() order varies
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_SPECIALS[1:]})
    tokenizer.add_tokens(QWEN_VL_SPECIALS[:1], special_tokens=True)
    return tokenizer


# ---- pipelines --------------------------------------------------------------------------------
def _eval(pipe):
    """Inference mode, as ``from_pretrained`` leaves a pipeline (fresh modules train, with dropout)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def tiny_kontext() -> FluxKontextPipeline:
    """A random-weight ``FluxKontextPipeline`` (VAE downsamples ×2, so sizes round to multiples of 4)."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
    vae = AutoencoderKL(**FLUX_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **CLIP_TEXT))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **T5_TEXT))
    return _eval(FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer))


def tiny_qwen_edit(plus: bool = True) -> QwenImageEditPlusPipeline | QwenImageEditPipeline:
    """A random-weight ``QwenImageEditPlusPipeline`` (or ``QwenImageEditPipeline`` with ``plus=False``)."""
    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**QWEN_TRANSFORMER)
    vae = AutoencoderKLQwenImage(**QWEN_VAE)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[1], window_size=28),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>")))
    # the video processor needs torchvision, which does not import here
    processor = image_only_processor_class(Qwen2VLProcessor)(Qwen2VLImageProcessorPil(**QWEN_VL_IMAGE), tokenizer)
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return _eval(pipeline_class(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae,
                                text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                                transformer=transformer))


def save_as_published(pipe, path: Path) -> Path:
    """Save ``pipe`` as its published repository lays it out: a tiny Qwen-Image-Edit's image-only
    processor (used because torchvision does not import here) is declared in ``model_index.json``
    as the ``transformers`` ``Qwen2VLProcessor`` the real repositories name."""
    pipe.save_pretrained(path)
    index = Path(path) / "model_index.json"
    config = json.loads(index.read_text())
    if "processor" in config:
        config["processor"] = ["transformers", "Qwen2VLProcessor"]
        index.write_text(json.dumps(config, indent=2))
    return Path(path)
