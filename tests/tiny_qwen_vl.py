"""Tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL judges built in memory (nothing downloaded).

* tokenizer: ``Qwen2Tokenizer`` (Qwen's byte-level BPE and pre-tokenizer, so every digit is its own
  token) over a small BPE vocabulary trained here on the judge's prompt texts, plus the chat
  template's special tokens;
* processor: the image-only variant of the real processor class (no torchvision needed) with the
  PIL image processor; every image is resized to 4×4 patches (4 image tokens after the 2×2 merge);
* model: the real ``*ForConditionalGeneration`` class of the architecture, from a config dict
  (text: 2 layers, width 32; vision: 2 blocks, width 32).
"""

from __future__ import annotations

import contextlib
import json

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from mteditlab.rewards import prompts
from mteditlab.rewards.base import EditSample
from mteditlab.rewards.qwen_vl import image_only_processor_class

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's template, reduced to text and image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048,
                   rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
# arch -> transformers class names (config, model, processor), image patch size, vision config, text overrides
ARCHS = {
    "qwen2_vl": (("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"), 14,
                 dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2), {}),
    "qwen2_5_vl": (("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"), 14,
                   dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2,
                        window_size=56, fullatt_block_indexes=[1]), {}),
    "qwen3_vl": (("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"), 16,
                 dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2,
                      num_position_embeddings=16, deepstack_visual_indexes=[0]),
                 dict(head_dim=8, rope_parameters={**TEXT_CONFIG["rope_parameters"], "mrope_interleaved": True})),
}


def _corpus() -> list[str]:
    return [prompts.SYSTEM, prompts.DIRECT_FORMAT, prompts.THINKING_FORMAT, prompts.SOURCE_LABEL,
            prompts.EDITED_LABEL, *prompts.RUBRICS.values(),
            "Earlier instructions of this session, oldest first: Current instruction: What the user means, "
            "made explicit: add a red circle, make the blue square green, move it to the left. Score: 7"]


def build_tokenizer(vocab_size: int = 1000):
    """A ``Qwen2Tokenizer`` over a byte-level BPE vocabulary trained on the prompt texts."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    bpe_model = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(vocab=bpe_model["vocab"], merges=[tuple(m) for m in bpe_model["merges"]],
                          unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          additional_special_tokens=SPECIAL_TOKENS[1:])


def build_processor(arch: str = "qwen2_5_vl", tokenizer=None):
    """Image-only processor of ``arch``'s processor class; every image becomes 4×4 patches
    (4 image tokens after the 2×2 merge)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    (_, _, processor_name), patch, _, _ = ARCHS[arch]
    pixels = (4 * patch) ** 2
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=pixels, max_pixels=pixels)
    return image_only_processor_class(getattr(transformers, processor_name))(
        image_processor, tokenizer or build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build_model(arch: str, tokenizer, *, config: dict | None = None, seed: int = 0):
    """Random-weight model of ``arch`` from ``config`` (default: the tiny dicts above), its special
    token ids taken from ``tokenizer``."""
    import transformers

    (config_name, model_name, _), patch, vision, text = ARCHS[arch]
    ids = tokenizer.convert_tokens_to_ids
    config = config or dict(
        text_config=dict(TEXT_CONFIG, **text, vocab_size=len(tokenizer), bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(vision, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()


def judge_samples() -> list[EditSample]:
    """Three turns to judge: a recolour with history and intent, an RGBA output, a referential undo."""
    red, green, blue = (Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200)))
    return [
        EditSample(red, green, "make it green", history=["add a red square", "make it bigger"],
                   intent="make the big square green"),
        EditSample(blue, Image.new("RGBA", (32, 32), (0, 0, 0, 255)), "remove the blue circle"),
        EditSample(green, red, "undo that", history=["make the square green"]),
    ]


@contextlib.contextmanager
def served_tiny_judge(arch: str = "qwen2_5_vl"):
    """A tiny random-weight Qwen-VL answering chat completions on 127.0.0.1 (:mod:`tests.chat_server`):
    yields ``(server, vocab)``, ``vocab`` being what ``top_logprobs`` must be to see every token."""
    from tests.chat_server import ChatServer, TinyVLMResponder

    tokenizer = build_tokenizer()
    model, processor = build_model(arch, tokenizer), build_processor(arch, tokenizer)
    vocab = len(processor.tokenizer)
    with ChatServer(TinyVLMResponder(model, processor, max_logprobs=vocab)) as server:
        yield server, vocab
