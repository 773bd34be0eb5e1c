"""``mini``: the world's learned intent reconstructor — a small image-conditioned T5 trained from scratch.

    reconstructor = build_reconstructor("mini")            # checkpoints/mini/intent; "mini:DIR" for another
    reconstructor.reconstruct([IntentQuery(...), ...])     # one Reconstruction per query, in order

Contract: for each query the model reads the image the turn edits and the text history, and writes the
canonical explicit intent of the world ("make the red circle at the top left bigger"), greedily. It
never raises on a bad answer: a generation that is empty, holds an unknown word, does not end within
``max_intent_tokens`` or is not an intent of the world's grammar (:func:`is_canonical`) comes back as
``Reconstruction(None, failure=REASON, details={"text": RAW})``.

Model (:class:`MiniIntentModel`; sizes in :func:`model_config`):

* **Image** (:class:`ImageEncoder`): the image, box-resized to 32×32 in [-1, 1], goes through a small
  conv stem at full resolution; the features are average-pooled over each of the world's nine grid cells
  (2×2 sub-regions per cell, so shape survives pooling) into nine tokens, plus one whole-image token,
  each with a learned position embedding and a LayerNorm. These ten tokens are prepended to the
  encoder's input embeddings.
* **Text**: a word-level tokenizer over the world's vocabulary (:func:`build_tokenizer`, saved with the
  checkpoint). The encoder text (:func:`encoder_text`) is the last ``history_turns`` earlier turns as
  ``<said> INSTRUCTION <meant> INTENT`` (``<none>`` for a turn without an intent), then
  ``<now> NEW INSTRUCTION``; truncated from the left.
* **Seq2seq**: ``T5ForConditionalGeneration`` (relative positions, tied embeddings) built from a config
  dict. Loss (``training/intent.py``): token cross-entropy of the gold intent followed by ``</s>``,
  teacher-forced.

A checkpoint directory holds ``config.json`` (this model's config: the T5 dict, the image encoder and
the text limits), ``model.safetensors`` and the tokenizer files. Train one with
``python -m training.intent``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from mteditlab.world import BACKGROUNDS, CELLS, COLOURS, SHAPES, SIZES
from mteditlab.world.edits import DIRECTIONS
from mteditlab.world.scene import GRID, cell_bounds
from mteditlab.world.verifier import to_array

from .base import IntentQuery, Reconstruction, Reconstructor, ReconstructorError, register_reconstructor

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "mini" / "intent"
RESOLUTION = 32
PAD, EOS, UNK, SAID, MEANT, NOW, NONE = "<pad>", "</s>", "<unk>", "<said>", "<meant>", "<now>", "<none>"
SPECIALS = [PAD, EOS, UNK, SAID, MEANT, NOW, NONE]   # ids 0..6; T5 wants pad = 0 = decoder start, eos = 1
MODEL_TYPE = "mteditlab-mini-intent"


# ---- the world's vocabulary and the tokenizer --------------------------------------------------

def world_vocabulary(num_sessions: int = 2000) -> list[str]:
    """Every word the world says: its constants plus the words of ``num_sessions`` 10-turn ``train``
    sessions (instructions and intents; every phrasing template shows up long before that)."""
    from mteditlab.world import generate_session

    words = set()
    for text in [*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *CELLS, *DIRECTIONS, "bigger", "smaller"]:
        words.update(text.split())
    for index in range(num_sessions):
        for turn in generate_session("train", index, 10).turns:
            words.update(turn.instruction.lower().split())
            words.update(turn.intent.lower().split())
    return sorted(words)


def build_tokenizer(words: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast``: lower-cased, punctuation dropped, ``</s>`` appended."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.add_special_tokens(SPECIALS)
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                            normalizers.Replace(Regex(r"[^\w\s]"), " ")])
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   additional_special_tokens=[SAID, MEANT, NOW, NONE], truncation_side="left")


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer.truncation_side = "left"
    return tokenizer


def encoder_text(instructions: Sequence[str], intents: Sequence[str | None], history_turns: int) -> str:
    """The encoder's text for the last of ``instructions``; ``intents`` are those of the earlier turns
    (aligned from the newest; missing ones count as ``None``). Only the newest ``history_turns`` earlier
    turns are shown: in the world a referential instruction points at the previous turn only."""
    parts = []
    earlier = instructions[:-1]
    intents = [None] * (len(earlier) - len(intents)) + list(intents)[len(intents) - len(earlier):]
    shown = max(0, len(earlier) - history_turns)
    for instruction, intent in zip(earlier[shown:], intents[shown:]):
        parts += [SAID, instruction, MEANT, intent if intent else NONE]
    parts += [NOW, instructions[-1]]
    return " ".join(parts)


# ---- the world's intent grammar ------------------------------------------------------------------

def _alternatives(words) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


_CELL = _alternatives(CELLS)
_REF = rf"the (?:{_alternatives(COLOURS)}) (?:{_alternatives(SHAPES)}) (?:at the (?:{_alternatives(c for c in CELLS if c != 'center')})|in the center)"
_CANONICAL = re.compile("|".join([
    rf"change the background to (?:{_alternatives(BACKGROUNDS)})",
    rf"add a (?:{_alternatives(SIZES)}) (?:{_alternatives(COLOURS)}) (?:{_alternatives(SHAPES)}) "
    rf"(?:at the (?:{_alternatives(c for c in CELLS if c != 'center')})|in the center)",
    rf"remove {_REF}",
    rf"make {_REF} (?:{_alternatives([*COLOURS, 'bigger', 'smaller'])})",
    rf"move {_REF} to the (?:{_CELL})",
    rf"swap {_REF} and {_REF}",
]))


def is_canonical(text: str) -> bool:
    """Whether ``text`` has the form of one of the world's explicit intents (``intent_text``'s forms)."""
    return _CANONICAL.fullmatch(" ".join(text.split())) is not None


# ---- the model --------------------------------------------------------------------------------------

def model_config(size: str = "small", vocab_size: int = 128) -> dict:
    """The config dict of a model size: ``small`` (the shipped one, 1.53M parameters) or ``tiny`` (tests)."""
    t5 = {"small": dict(d_model=128, d_kv=32, d_ff=384, num_layers=3, num_decoder_layers=3, num_heads=4),
          "tiny": dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)}[size]
    channels = {"small": [24, 48], "tiny": [8, 16]}[size]
    t5.update(vocab_size=vocab_size, dropout_rate=0.0, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
              tie_word_embeddings=True)
    return {"model_type": MODEL_TYPE, "t5": t5, "image_channels": channels, "cell_pool": 2,
            "resolution": RESOLUTION, "history_turns": 1, "max_text_tokens": 128, "max_intent_tokens": 24}


def cell_pooling(resolution: int, sub: int) -> torch.Tensor:
    """``[GRID² · sub², resolution²]`` averaging weights: each cell's box split into ``sub × sub`` parts."""
    weights = torch.zeros(GRID * GRID, sub, sub, resolution, resolution)
    for cell in range(GRID * GRID):
        y0, y1, x0, x1 = cell_bounds(cell, resolution)
        ys, xs = np.array_split(np.arange(y0, y1), sub), np.array_split(np.arange(x0, x1), sub)
        for i, rows in enumerate(ys):
            for j, cols in enumerate(xs):
                weights[cell, i, j, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 1.0 / (len(rows) * len(cols))
    return weights.reshape(GRID * GRID * sub * sub, resolution * resolution)


class ImageEncoder(nn.Module):
    """``[B, 3, R, R]`` in [-1, 1] → ``[B, GRID² + 1, d_model]``: nine cell tokens and one whole-image token."""

    def __init__(self, d_model: int, channels: Sequence[int], resolution: int = RESOLUTION, cell_pool: int = 2):
        super().__init__()
        layers, cin = [], 3
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GELU()]
            cin = cout
        self.stem = nn.Sequential(*layers)
        self.register_buffer("pool", cell_pooling(resolution, cell_pool), persistent=False)
        self.cell_proj = nn.Linear(cin * cell_pool * cell_pool, d_model)
        self.whole_proj = nn.Linear(cin + 3, d_model)
        self.position = nn.Embedding(GRID * GRID + 1, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.stem(pixels).flatten(2)                                    # [B, C, R²]
        batch, channels = features.shape[:2]
        cells = (features @ self.pool.T).view(batch, channels, GRID * GRID, -1)    # [B, C, 9, sub²]
        cells = self.cell_proj(cells.permute(0, 2, 1, 3).reshape(batch, GRID * GRID, -1))
        whole = self.whole_proj(torch.cat([features.mean(2), pixels.flatten(2).mean(2)], 1))[:, None]
        return self.norm(torch.cat([cells, whole], 1) + self.position.weight)


class MiniIntentModel(nn.Module):
    """The image encoder plus a T5 whose encoder input is ``[image tokens ; text embeddings]``."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        self.config = config
        self.t5 = T5ForConditionalGeneration(T5Config(**config["t5"]))
        self.image = ImageEncoder(config["t5"]["d_model"], config["image_channels"], config["resolution"],
                                  config["cell_pool"])

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor):
        """Encoder states and mask over ``[image tokens ; text]``, and the image tokens themselves."""
        from transformers.modeling_outputs import BaseModelOutput

        image = self.image(pixels)
        embeds = torch.cat([image, self.t5.get_input_embeddings()(input_ids)], 1)
        mask = torch.cat([attention_mask.new_ones(image.shape[:2]), attention_mask], 1)
        states = self.t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return BaseModelOutput(last_hidden_state=states), mask, image

    def forward(self, input_ids, attention_mask, pixels, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean token cross-entropy of ``labels`` (``-100`` = padding), teacher-forced; and the image
        tokens ``[B, GRID² + 1, d_model]`` (for training-only auxiliary losses)."""
        encoded, mask, image = self.encode(input_ids, attention_mask, pixels)
        return self.t5(encoder_outputs=encoded, attention_mask=mask, labels=labels).loss, image

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixels) -> torch.Tensor:
        """Greedy decoding: ``[B, ≤ 1 + max_intent_tokens]`` ids, starting with the decoder-start token."""
        encoded, mask, _ = self.encode(input_ids, attention_mask, pixels)
        return self.t5.generate(encoder_outputs=encoded, attention_mask=mask, do_sample=False, num_beams=1,
                                max_new_tokens=self.config["max_intent_tokens"])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_model(self, str(path / "model.safetensors"))  # drops the tied copies of the embedding

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MiniIntentModel":
        from safetensors.torch import load_model

        path = Path(path)
        model = cls(json.loads((path / "config.json").read_text()))
        load_model(model, str(path / "model.safetensors"))
        return model.eval()


def images_to_tensor(images: Sequence[Image.Image], resolution: int = RESOLUTION) -> torch.Tensor:
    """PIL images → ``[B, 3, R, R]`` in [-1, 1] (box-resized to ``resolution`` when needed)."""
    pixels = np.stack([to_array(image, resolution) for image in images]) * 2 - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


# ---- the reconstructor -------------------------------------------------------------------------------

@register_reconstructor("mini")
class MiniReconstructor(Reconstructor):
    """The learned reconstructor. ``path``: a checkpoint directory (default ``checkpoints/mini/intent``)."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 128):
        path = Path(path or DEFAULT_CHECKPOINT)
        if not ((path / "config.json").is_file() and (path / "model.safetensors").is_file()):
            raise ReconstructorError(f"No mini intent reconstructor checkpoint at {path}. Train one with "
                                     "`python -m training.intent` (it writes checkpoints/mini/intent), or build "
                                     "'mini:DIR' with a directory holding config.json, model.safetensors and "
                                     "the tokenizer files.")
        self.model = MiniIntentModel.from_pretrained(path)
        self.tokenizer = load_tokenizer(path)
        self.batch_size = batch_size

    @classmethod
    def from_model(cls, model: MiniIntentModel, tokenizer, batch_size: int = 128) -> "MiniReconstructor":
        """Wrap an in-memory model (training's evaluation) without a checkpoint."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        return self

    def inputs(self, instruction_lists, intent_lists, pixels: torch.Tensor) -> dict:
        """Model inputs for a batch (shared with training so both see the same text)."""
        config = self.model.config
        texts = [encoder_text(i, t, config["history_turns"]) for i, t in zip(instruction_lists, intent_lists)]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=config["max_text_tokens"],
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "pixels": pixels}

    def _decode(self, ids: torch.Tensor) -> Reconstruction:
        ids = ids[1:].tolist()                                     # drop the decoder-start token
        ended = self.tokenizer.eos_token_id in ids
        ids = ids[: ids.index(self.tokenizer.eos_token_id)] if ended else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=False).strip()
        details = {"text": text}
        if not ended:
            return Reconstruction(None, f"no end of intent within {len(ids)} tokens", details)
        if not text:
            return Reconstruction(None, "empty intent", details)
        if self.tokenizer.unk_token_id in ids or any(t in text for t in SPECIALS):
            return Reconstruction(None, f"intent with an unknown or special token: {text!r}", details)
        if not is_canonical(text):
            return Reconstruction(None, f"not an intent of the world's grammar: {text!r}", details)
        return Reconstruction(text, None, details)

    def reconstruct(self, queries: list[IntentQuery]) -> list[Reconstruction]:
        results = []
        self.model.eval()
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start:start + self.batch_size]
            pixels = images_to_tensor([q.image for q in chunk], self.model.config["resolution"])
            inputs = self.inputs([q.instructions for q in chunk], [q.intents for q in chunk], pixels)
            results += [self._decode(row) for row in self.model.generate(**inputs)]
        return results
