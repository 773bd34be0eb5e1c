"""``qwen-vl``: a Qwen-VL chat model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL via the Auto classes) as judge.

Each (sample, sub-score) is one chat (``prompts.build_messages``): SOURCE image, EDITED image,
context, rubric, answer format; all chats of a call are batched (left padding).

* **direct** mode — one forward pass, no sampling. The assistant turn is prefilled with
  ``"Score: "``; with ``p_k`` the next-token probability of the digit token ``k`` (Qwen tokenizers
  give every digit its own token), ``m = Σ_{k=0..scale} p_k`` and
  ``score = Σ_k k · p_k / m / scale`` (Edit-R1's expected value, normalised to [0, 1]).
  A sub-score fails when the logits are not finite or ``m < min_score_mass`` (the judge was not
  answering with a score).
* **thinking** mode — generate a short rationale ending in ``Score: N`` (``parsing.parse_score``).
  ``votes == 1``: greedy decoding; ``votes = n > 1``: n sampled replies (``temperature``, no top-k /
  top-p), seeded by ``score(..., seed=)``, averaged over the votes that parse; failed votes are
  excluded and counted (``details["failed_votes"]``); a sub-score fails when all its votes fail.

``overall``: :func:`~mteditlab.rewards.base.combine_overall` with ``overall="mean"`` (mean of the
available sub-scores, default) or ``"viescore"`` (``sqrt(min(if, cc, ga) · quality)``).
``ga`` is scored only for samples with history (NaN, not a failure, otherwise).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np
import torch

from mteditlab.rewards.base import GA, OVERALL_RULES, SUB_SCORES, EditSample, RewardModel, RewardOutput, register_reward
from mteditlab.rewards.parsing import average_votes, digit_expectation, parse_score
from mteditlab.rewards.prompts import DIRECT_PREFILL, build_messages

DEFAULT_JUDGE_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
JUDGE_ID_ENV = "MTEDITLAB_JUDGE_ID"
MODES = ("direct", "thinking")


@register_reward("qwen-vl")
class QwenVLJudge(RewardModel):
    """VLM judge over a loaded transformers model and its processor (see the module docstring).

    ``scale``: scores are integers ``0..scale`` (``scale <= 9`` in direct mode: one digit token).
    ``sub_scores``: the sub-scores to judge (default all four; each costs one chat per sample).
    ``batch_size``: chats per forward / generate call.
    """

    def __init__(self, model, processor, *, mode: str = "direct", votes: int = 1, max_new_tokens: int = 256,
                 scale: int = 9, temperature: float = 0.7, batch_size: int = 8, min_score_mass: float = 0.5,
                 sub_scores: Sequence[str] | None = None, overall: str = "mean"):
        self.sub_scores = check_judge_options(mode, votes, scale, overall, sub_scores)
        self.model, self.processor = model.eval(), processor
        self.mode, self.votes, self.max_new_tokens, self.scale = mode, votes, max_new_tokens, scale
        self.temperature, self.batch_size, self.min_score_mass, self.overall = (
            temperature, batch_size, min_score_mass, overall)
        self.score_token_ids = digit_token_ids(processor.tokenizer)[: scale + 1]

    @classmethod
    def create(cls, **options) -> RewardModel:
        """``model_id`` (or ``path``); a URL there, or without one in ``$MTEDITLAB_JUDGE_URL``, selects
        the served judge (:func:`~mteditlab.rewards.endpoint.served_judge`), else ``from_pretrained``."""
        from mteditlab.rewards.endpoint import JUDGE_URL_ENV, is_endpoint_url, served_judge  # it builds on this module

        if "path" in options:
            options["model_id"] = options.pop("path")
        location = options.get("model_id") or os.environ.get(JUDGE_URL_ENV)
        if is_endpoint_url(location):
            options.pop("model_id", None)
            return served_judge(location, **options)
        return cls.from_pretrained(**options)

    @classmethod
    def from_pretrained(cls, model_id: str | None = None, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype = "auto", processor_kwargs: dict | None = None,
                        **judge_kwargs) -> QwenVLJudge:
        """Load a judge from local files only: ``model_id`` (a hub id or a directory), else
        ``$MTEDITLAB_JUDGE_ID``, else :data:`DEFAULT_JUDGE_ID`. Weights not available locally raise a
        ``RuntimeError`` naming the id, ``HF_HOME`` and the ``hf download`` command — nothing is
        downloaded. ``processor_kwargs`` go to the processor (e.g. ``min_pixels``, ``max_pixels``);
        ``device`` defaults to CUDA when available."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        model_id = model_id or os.environ.get(JUDGE_ID_ENV) or DEFAULT_JUDGE_ID
        path = local_model_path(model_id)
        config = AutoConfig.from_pretrained(path)
        processor = processor_class_for(config).from_pretrained(path, **(processor_kwargs or {}))
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model, processor, **judge_kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, jobs: Sequence[tuple[EditSample, str]]):
        """Model inputs for a batch of (sample, sub-score) chats: chat template applied (plus the
        direct-mode prefill), the source and edited image of each chat in that order, left padding."""
        chats = [build_messages(sample, crit, mode=self.mode, scale=self.scale) for sample, crit in jobs]
        texts = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        if self.mode == "direct":
            texts = [text + DIRECT_PREFILL for text in texts]
        images = [image.convert("RGB") for sample, _ in jobs for image in (sample.source, sample.edited)]
        inputs = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        return inputs.to(self.device)

    @torch.no_grad()
    def score(self, samples: Sequence[EditSample], *, seed: int = 0) -> RewardOutput:
        """Judge every applicable (sample, sub-score) pair; see the module docstring for the formulas.
        Deterministic for given samples, ``seed`` and ``batch_size``; the global RNG is left as is.
        ``details``: ``score_mass`` (direct: probability on the score tokens), or ``replies`` and
        ``failed_votes`` (thinking), each keyed by sub-score, per item."""
        jobs = judge_jobs(samples, self.sub_scores)
        judged = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(jobs), self.batch_size):
                inputs = self.prepare([(samples[i], crit) for i, crit in jobs[start:start + self.batch_size]])
                judged += self._direct(inputs) if self.mode == "direct" else self._thinking(inputs)
        return judge_output(len(samples), self.sub_scores, jobs, judged, mode=self.mode, rule=self.overall)

    def _direct(self, inputs) -> list[tuple[float, str | None, float]]:
        """(score, error, score-token mass) per chat from the next-token distribution."""
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
        probs = logits.softmax(-1)[:, self.score_token_ids].double()
        return [digit_expectation(row, self.min_score_mass) for row in probs.tolist()]

    def _thinking(self, inputs) -> list[tuple[float, str | None, tuple[list[str], int]]]:
        """(mean valid vote, error, (replies, failed votes)) per chat."""
        sampled = self.votes > 1
        tokenizer = self.processor.tokenizer
        output = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, num_return_sequences=self.votes, do_sample=sampled,
            temperature=self.temperature if sampled else None, top_k=0 if sampled else None,
            top_p=1.0 if sampled else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        replies = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        parse = functools.partial(parse_score, scale=self.scale)
        results = []
        for start in range(0, len(replies), self.votes):  # generate repeats each chat `votes` times in a row
            chat_replies = replies[start:start + self.votes]
            value, error, failed = average_votes(chat_replies, parse)
            results.append((value, error, (chat_replies, failed)))
        return results


def check_judge_options(mode: str, votes: int, scale: int, overall: str,
                        sub_scores: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a judge's options (any backend); returns the sub-scores to judge (default all four)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if votes < 1 or (mode == "direct" and votes != 1):
        raise ValueError("votes must be >= 1, and 1 in direct mode (no sampling there)")
    if scale < 1 or (mode == "direct" and scale > 9):
        raise ValueError("scale must be >= 1, and <= 9 in direct mode (one digit token per score)")
    if overall not in OVERALL_RULES:
        raise ValueError(f"overall must be one of {OVERALL_RULES}, got {overall!r}")
    sub_scores = tuple(sub_scores or SUB_SCORES)
    if unknown := set(sub_scores) - set(SUB_SCORES):
        raise ValueError(f"unknown sub-scores {sorted(unknown)}; known: {SUB_SCORES}")
    return sub_scores


def judge_jobs(samples: Sequence[EditSample], sub_scores: Sequence[str]) -> list[tuple[int, str]]:
    """The (item, sub-score) chats to judge: every sub-score of every item, ``ga`` only with history."""
    return [(i, crit) for i, sample in enumerate(samples) for crit in sub_scores if crit != GA or sample.history]


def judge_output(n: int, sub_scores: Sequence[str], jobs: Sequence[tuple[int, str]], judged: Sequence[tuple],
                 *, mode: str, rule: str, details: dict | None = None) -> RewardOutput:
    """A :class:`RewardOutput` from one ``(value, error, extra)`` per job (``extra``: the score-token
    mass in direct mode, ``(replies, failed votes)`` in thinking mode). An item fails with the
    ``"crit: error"`` reasons of its failed chats. ``details`` gain ``score_mass`` (direct) or
    ``replies`` and ``failed_votes`` (thinking), keyed by sub-score, per item."""
    scores = {crit: np.full(n, np.nan) for crit in sub_scores}
    errors: list[list[str]] = [[] for _ in range(n)]
    details = dict(details or {})
    if mode == "direct":
        details["score_mass"] = {c: np.full(n, np.nan) for c in sub_scores}
    else:
        details["replies"] = {c: [[] for _ in range(n)] for c in sub_scores}
        details["failed_votes"] = {c: np.zeros(n, dtype=int) for c in sub_scores}
    for (i, crit), (value, error, extra) in zip(jobs, judged, strict=True):
        scores[crit][i] = value
        if error is not None:
            errors[i].append(f"{crit}: {error}")
        if mode == "direct":
            details["score_mass"][crit][i] = extra
        else:
            details["replies"][crit][i], details["failed_votes"][crit][i] = extra
    failures = ["; ".join(e) if e else None for e in errors]
    return RewardOutput.from_scores(scores, failures, rule=rule, details=details)


def digit_token_ids(tokenizer) -> list[int]:
    """Token ids of "0".."9"; raises if a digit is not a single token (the direct mode needs it)."""
    ids = []
    for digit in "0123456789":
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"digit {digit!r} is not a single token ({encoded}); direct scoring needs it")
        ids += encoded
    return ids


def local_model_path(model_id: str) -> str:
    """A local directory holding ``model_id``: the id itself when it is a directory, else its snapshot
    in the Hugging Face cache (local files only, never the network)."""
    if os.path.isdir(model_id):
        return model_id
    from huggingface_hub import constants, snapshot_download

    message = (
        f"The VLM judge weights {model_id!r} are not available locally (HF_HOME={constants.HF_HOME}). "
        f"Download them first:\n    hf download {model_id}\n"
        f"or set {JUDGE_ID_ENV} (or pass model_id) to a local directory holding the model."
    )
    try:
        path = snapshot_download(model_id, local_files_only=True)
    except (OSError, ValueError) as err:
        raise RuntimeError(message) from err
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(message)
    return path


def processor_class_for(config) -> type:
    """The processor class registered for ``config``; its image-only variant when torchvision (needed by
    the Qwen video processors) is not installed."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available

    cls = PROCESSOR_MAPPING[type(config)]
    return cls if is_torchvision_available() else image_only_processor_class(cls)


@functools.cache
def image_only_processor_class(base: type) -> type:
    """A subclass of a Qwen-VL processor class without the video processor (which requires
    torchvision); images and text work as in ``base``. Sub-processors are taken from ``__init__``'s
    signature, so this one loads and saves only the image processor and the tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(f"ImageOnly{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
