"""``judge``: the world's small learned judge — the offline stand-in for a VLM judge.

A ~0.5M-parameter network scores one editing turn from its (source, edited) images and its text:

* **Images**: both resized to 32×32 (box filter), in [-1, 1], channel-concatenated with their
  difference: ``[source ; edited ; edited − source]`` (9 channels). The image tokens are the world's
  nine grid cells: one shared small CNN reads a 12×12 crop around each cell into a token (plus a
  learned cell-position embedding). (An earlier version used 64 tokens of a plain 8×8 CNN map; it
  could not tell *which* object an edit hit — see the model card.)
* **Text**: token-level states of the packaged MiniLM encoder (the mini editor's
  :class:`~mteditlab.editors.mini.TextEncoder`, frozen), one *segment* per string, each tagged with a
  learned segment embedding: segment 0 = this turn's instruction, 1 = the reconstructed intent (when
  given and not just the history joined), 2.. = earlier instructions, newest first (at most
  :data:`MAX_HISTORY`). Encoding each string on its own avoids the encoder's 32-token truncation of a
  long joined history.
* **Fusion**: four query tokens (one per sub-score) are prepended to the nine cell tokens; each block
  runs self-attention over queries + cells, cross-attention from them to the text tokens, and an MLP.
  Query ``j`` is read out by its own linear head and a sigmoid. In training only, each cell token also
  predicts auxiliary per-cell targets (:data:`CELL_HEADS`: does the edit act here, did the cell change,
  did an earlier turn set it, is that broken) — dense supervision that teaches grounding.

Outputs: ``if``, ``cc``, ``ga``, ``quality`` in [0, 1]. ``ga`` (earlier constraints still hold) is NaN
for a sample without history, as the protocol says. ``overall`` follows the protocol's rule (``mean``
by default). The judge is deterministic: ``seed`` is accepted and unused.

Failures are reported, never numbers: a source or edited that is not a PIL image (or cannot be read as
RGB), an empty or non-string instruction, a history that is not a list of strings, non-finite logits.

It was trained (``python -m training.judge``) on verifier-labelled pairs of ``train`` sessions and is
**deliberately an imperfect proxy** — see ``checkpoints/mini/judge/MODEL_CARD.md`` for its agreement
with the exact verifier and where it errs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

from mteditlab.rewards.base import (CC, GA, IF, OVERALL_RULES, QUALITY, EditSample, RewardModel, RewardOutput,
                                   register_reward)
from mteditlab.world.scene import GRID, cell_bounds

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "mini" / "judge"
TRAIN_COMMAND = "python -m training.judge"
HEADS: tuple[str, ...] = (IF, CC, GA, QUALITY)  # order of the network's outputs
# per-cell auxiliary targets used in training: the edit acts on the cell; the cell's content changed;
# an earlier turn set the cell (a GA constraint); that constraint is broken in the edited image
CELL_HEADS: tuple[str, ...] = ("touched", "changed", "constrained", "violated")
RESOLUTION = 32
MAX_HISTORY = 8
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def default_config() -> dict:
    return dict(width=96, heads=4, blocks=3, mlp_ratio=2, text_dim=384, max_history=MAX_HISTORY,
                resolution=RESOLUTION)


# ---- the network --------------------------------------------------------------------------------
def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.cross_attn(self.norm2(x), text, text, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


def cell_crop_index(resolution: int = RESOLUTION, crop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row / column pixel indices ``[9, crop]`` of a ``crop``-pixel square centred on each cell of the
    world's 3×3 grid (clamped to the image; neighbouring crops overlap by a pixel or two)."""
    crop = crop or resolution // GRID + 2
    rows, cols = [], []
    for cell in range(GRID * GRID):
        y0, y1, x0, x1 = cell_bounds(cell, resolution)
        ys = min(max(round((y0 + y1) / 2 - crop / 2), 0), resolution - crop)
        xs = min(max(round((x0 + x1) / 2 - crop / 2), 0), resolution - crop)
        rows.append(torch.arange(ys, ys + crop))
        cols.append(torch.arange(xs, xs + crop))
    return torch.stack(rows), torch.stack(cols)


class JudgeNet(nn.Module):
    """(images ``[B, 9, r, r]``, text ``[B, L, 384]``, segments ``[B, L]``, mask ``[B, L]``) → logits
    ``[B, 4]`` in :data:`HEADS` order (and, with ``cells=True``, per-cell auxiliary logits ``[B, 9, 4]``
    in :data:`CELL_HEADS` order).

    Image tokens are the world's nine grid cells: a shared CNN reads a square crop around each cell
    (12×12 at 32×32: a 4×4 stride-2 stem, 12 → 6 → 3, flattened) into one token, plus a learned cell-position embedding."""

    def __init__(self, width: int = 96, heads: int = 4, blocks: int = 3, mlp_ratio: int = 2, text_dim: int = 384,
                 max_history: int = MAX_HISTORY, resolution: int = RESOLUTION):
        super().__init__()
        self.config = dict(width=width, heads=heads, blocks=blocks, mlp_ratio=mlp_ratio, text_dim=text_dim,
                           max_history=max_history, resolution=resolution)
        rows, cols = cell_crop_index(resolution)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        crop = rows.shape[1]
        self.cell_encoder = nn.Sequential(*_conv(9, 48, 2, kernel=4), *_conv(48, 64, 2), nn.Flatten(),
                                          nn.Linear(64 * math.ceil(crop / 4) ** 2, width))
        self.pos = nn.Parameter(torch.randn(1, GRID * GRID, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(1, len(HEADS), width) * 0.02)
        self.text_proj = nn.Linear(text_dim, width)
        self.segment = nn.Embedding(2 + max_history, width)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head_weight = nn.Parameter(torch.zeros(len(HEADS), width))
        self.head_bias = nn.Parameter(torch.zeros(len(HEADS)))
        self.cell_head = nn.Linear(width, len(CELL_HEADS))

    def forward(self, images: torch.Tensor, text: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor,
                cells: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, c = images.shape[:2]
        crops = images[:, :, self.rows[:, :, None], self.cols[:, None, :]]  # [B, C, 9, k, k]
        crops = crops.transpose(1, 2).reshape(b * GRID * GRID, c, *crops.shape[-2:])
        tokens = self.cell_encoder(crops).view(b, GRID * GRID, -1) + self.pos
        x = torch.cat([self.queries.expand(b, -1, -1), tokens], dim=1)
        t = self.text_proj(text) + self.segment(segments)
        for block in self.blocks:
            x = block(x, t, ~mask)
        x = self.norm(x)
        logits = (x[:, : len(HEADS)] * self.head_weight).sum(-1) + self.head_bias
        return (logits, self.cell_head(x[:, len(HEADS):])) if cells else logits


# ---- inputs -------------------------------------------------------------------------------------
def image_array(image: PIL.Image.Image, resolution: int = RESOLUTION) -> np.ndarray:
    """PIL image → uint8 ``[r, r, 3]`` (RGB, box-resized like the verifier does)."""
    image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), PIL.Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def pair_tensor(source: np.ndarray | torch.Tensor, edited: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, r, r, 3]`` source and edited → float ``[B, 9, r, r]``: source, edited, difference."""
    s = torch.as_tensor(source).float().permute(0, 3, 1, 2) / 127.5 - 1
    e = torch.as_tensor(edited).float().permute(0, 3, 1, 2) / 127.5 - 1
    return torch.cat([s, e, e - s], dim=1)


def text_segments(instruction: str, history: Sequence[str] = (), intent: str | None = None,
                  max_history: int = MAX_HISTORY) -> list[tuple[int, str]]:
    """``(segment id, string)`` pairs the judge reads: the instruction (0), the intent (1) unless it is
    absent, equal to the instruction or just the history joined with "; " (the ``concat`` intent mode:
    the history is read separately), then up to ``max_history`` earlier instructions, newest first
    (segment ``1 + age``)."""
    history = list(history)
    segments = [(0, instruction)]
    if intent and intent != instruction and intent != "; ".join(history + [instruction]):
        segments.append((1, intent))
    for age, text in enumerate(reversed(history[-max_history:]), start=1):
        segments.append((1 + age, text))
    return segments


def text_batch(encoder, segment_lists: Sequence[list[tuple[int, str]]]) -> tuple[torch.Tensor, ...]:
    """Padded ``(states [B, L, 384], segment ids [B, L], mask [B, L])`` from the encoder's per-string
    token states (``encoder.cache`` filled by calling it once on the missing strings)."""
    missing = sorted({t for segs in segment_lists for _, t in segs if t not in encoder.cache})
    if missing:
        encoder(missing)
    rows = [[(sid, encoder.cache[t]) for sid, t in segs] for segs in segment_lists]
    lengths = [sum(len(s) for _, s in row) for row in rows]
    length, dim = max(lengths), rows[0][0][1].shape[-1]
    states = torch.zeros(len(rows), length, dim)
    segments = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        at = 0
        for sid, s in row:
            states[i, at:at + len(s)] = s.float()
            segments[i, at:at + len(s)] = sid
            at += len(s)
        mask[i, :at] = True
    return states, segments, mask


def _check_sample(sample) -> str | None:
    """Why ``sample`` cannot be judged, or None."""
    if not isinstance(sample, EditSample):
        return f"not an EditSample (got {type(sample).__name__})"
    for name in ("source", "edited"):
        image = getattr(sample, name)
        if not isinstance(image, PIL.Image.Image):
            return f"{name} is not a PIL image (got {type(image).__name__})"
        if min(image.size) < 1:
            return f"{name} is an empty image"
    if not isinstance(sample.instruction, str) or not sample.instruction.strip():
        return "no instruction (empty or not a string)"
    if not isinstance(sample.history, (list, tuple)) or not all(isinstance(h, str) for h in sample.history):
        return "history is not a list of strings"
    if sample.intent is not None and not isinstance(sample.intent, str):
        return f"intent is not a string (got {type(sample.intent).__name__})"
    return None


# ---- the reward model ---------------------------------------------------------------------------
@register_reward("judge")
class MiniJudge(RewardModel):
    """The learned ``judge`` of the world (see the module docstring).

    ``overall``: the protocol's rule for ``RewardOutput.overall`` (``"mean"`` or ``"viescore"``).
    ``batch_size``: samples per forward pass.
    """

    sub_scores = (IF, CC, QUALITY, GA)

    def __init__(self, net: JudgeNet, text_encoder=None, *, overall: str = "mean", batch_size: int = 256,
                 device: str | torch.device = "cpu", info: dict | None = None):
        if overall not in OVERALL_RULES:
            raise ValueError(f"overall must be one of {OVERALL_RULES}, got {overall!r}")
        if text_encoder is None:
            from mteditlab.editors.mini import TextEncoder
            text_encoder = TextEncoder(device)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.text_encoder = text_encoder
        self.overall, self.batch_size = overall, batch_size
        self.resolution = net.config["resolution"]
        self.max_history = net.config["max_history"]
        self.info = info or {}

    @classmethod
    def create(cls, **options) -> MiniJudge:
        return cls.from_pretrained(**options)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs) -> MiniJudge:
        """Load the judge from ``path`` (default ``checkpoints/mini/judge``); a missing checkpoint
        raises ``FileNotFoundError`` naming the training command."""
        from safetensors.torch import load_file

        path = Path(path or DEFAULT_CHECKPOINT)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"No mini judge checkpoint at {path} (expected {CONFIG_NAME} and {WEIGHTS_NAME}). "
                f"Train one with `{TRAIN_COMMAND} --out {path}`.")
        config = json.loads((path / CONFIG_NAME).read_text())
        net = JudgeNet(**config["model"])
        net.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return cls(net, info=config.get("info"), **kwargs)

    def save_pretrained(self, path: str | Path, info: dict | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"model": self.net.config, "heads": list(HEADS), "info": info or self.info}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        return path

    # -- raw predictions (used by training and evaluation) --
    def logits(self, sources: np.ndarray, editeds: np.ndarray, segment_lists: Sequence[list[tuple[int, str]]],
               cells: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, 4]`` (:data:`HEADS` order) for uint8 image arrays ``[B, r, r, 3]`` (with
        ``cells``: also the per-cell auxiliary logits ``[B, 9, 4]``)."""
        images = pair_tensor(sources, editeds).to(self.device)
        states, segments, mask = (t.to(self.device) for t in text_batch(self.text_encoder, segment_lists))
        return self.net(images, states, segments, mask, cells=cells)

    def differentiable_probs(self, sources: np.ndarray, edited: torch.Tensor,
                             segment_lists: Sequence[list[tuple[int, str]]]) -> torch.Tensor:
        """Probabilities ``[B, 4]`` (:data:`HEADS` order) with gradients to ``edited``: float pixels
        ``[B, 3, H, W]`` in [−1, 1] (area-resized to the judge's resolution), ``sources`` uint8 arrays
        ``[B, r, r, 3]``. What direct reward fine-tuning back-propagates through."""
        if edited.shape[-1] != self.resolution or edited.shape[-2] != self.resolution:
            edited = F.interpolate(edited, size=(self.resolution, self.resolution), mode="area")
        pixels = ((edited.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1)      # the uint8 scale pair_tensor reads
        return torch.sigmoid(self.logits(sources, pixels, segment_lists).float())

    @torch.no_grad()
    def predict(self, sources: np.ndarray, editeds: np.ndarray,
                segment_lists: Sequence[list[tuple[int, str]]]) -> np.ndarray:
        """Probabilities ``[B, 4]`` (:data:`HEADS` order), batched; NaN rows where logits are not finite."""
        self.net.eval()
        out = []
        for start in range(0, len(segment_lists), self.batch_size):
            end = start + self.batch_size
            logits = self.logits(sources[start:end], editeds[start:end], segment_lists[start:end]).float()
            probs = torch.sigmoid(logits).double().cpu().numpy()
            probs[~np.isfinite(logits.cpu().numpy()).all(1)] = np.nan
            out.append(probs)
        return np.concatenate(out) if out else np.zeros((0, len(HEADS)))

    def score(self, samples: Sequence[EditSample], *, seed: int = 0) -> RewardOutput:
        """Score a batch through the protocol. Deterministic; ``seed`` is unused (no sampling).
        ``details["probs"]``: ``[N, 4]`` raw head probabilities, order ``if, cc, ga, quality`` (NaN rows
        for failed items; ``ga`` is predicted even without history, where its score is NaN)."""
        n = len(samples)
        failures: list[str | None] = [_check_sample(s) for s in samples]
        sources, editeds, ok = [], [], []
        for i, sample in enumerate(samples):
            if failures[i] is not None:
                continue
            try:
                src, edt = image_array(sample.source, self.resolution), image_array(sample.edited, self.resolution)
            except Exception as error:  # a PIL image that cannot be read (truncated file, odd mode, ...)
                failures[i] = f"unreadable image: {type(error).__name__}: {error}"
                continue
            sources.append(src)
            editeds.append(edt)
            ok.append(i)
        probs = np.full((n, len(HEADS)), np.nan)
        if ok:
            segs = [text_segments(samples[i].instruction, samples[i].history, samples[i].intent, self.max_history)
                    for i in ok]
            probs[ok] = self.predict(np.stack(sources), np.stack(editeds), segs)
            for i in ok:
                if not np.isfinite(probs[i]).all():
                    failures[i] = "non-finite logits"
                    probs[i] = np.nan
        scores = {name: probs[:, HEADS.index(name)].copy() for name in self.sub_scores}
        for i, sample in enumerate(samples):
            if failures[i] is None and not sample.history:
                scores[GA][i] = np.nan  # no earlier turn: global awareness does not apply
        return RewardOutput.from_scores(scores, failures, rule=self.overall, details={"probs": probs})
