"""``qwen-vl`` served by an inference engine: a judge behind an OpenAI-compatible chat-completions
endpoint (``vllm serve``, ``python -m sglang.launch_server``).

The chats are the in-process judge's (``prompts.build_messages``), with each image sent as a base64
PNG data URL (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}}``).

* **direct** mode — one request per chat, ``temperature`` 0, ``logprobs`` with ``top_logprobs = k``.
  With ``prefill`` (default) the last message is the assistant's ``"Score: "`` sent with
  ``continue_final_message`` (vLLM / SGLang), so the first generated position is the score digit;
  without it, the first generated token that is a digit. With ``p_d = exp(logprob)`` of the digit
  alternatives ``d = 0..scale`` at that position (absent from the top ``k``: 0; only tokens that are one
  ASCII digit and logprobs that are finite numbers ``<= 0`` count, anything else is ignored), the score is
  ``parsing.digit_expectation``: ``Σ d·p_d / Σ p_d / scale``, failed when ``Σ p_d < min_score_mass``.
  The server must allow ``k`` (vLLM: ``--max-logprobs``).
* **thinking** mode — one request per chat with ``n = votes`` choices (``temperature``; greedy when
  ``votes == 1``), each reply parsed by ``parsing.parse_score`` and averaged over the ones that parse
  (``parsing.average_votes``); a reply that is not text is a failed vote.

Transport: :mod:`mteditlab.chat_client` (``concurrency`` requests in flight, one deadline of ``timeout``
seconds per attempt, a body cap, bounded retries with backoff, redirects never followed). A chat whose
request fails for good is NaN with the reason (the reward contract); the batch goes on.
``details["endpoint"]`` counts this call's requests, retries and failed requests; ``EndpointJudge.stats``
counts them over its lifetime.

Select it with ``get_reward("qwen-vl", path="http://HOST:PORT/v1")`` (``--reward-paths
qwen-vl=http://HOST:PORT/v1`` in the trainer) or ``$MTEDITLAB_JUDGE_URL``; options ride on the URL's
query (``…/v1?mode=thinking&votes=4&sub_scores=if+cc``, see :data:`URL_OPTIONS`). The API key comes
from ``$MTEDITLAB_JUDGE_API_KEY`` (else ``$OPENAI_API_KEY``); the served model name from ``model=``,
else ``$MTEDITLAB_JUDGE_ID``, else the first one the endpoint lists at ``/models`` (a failed listing is
answered from memory for ``chat_client.MODEL_RETRY_S`` seconds, so the other chats fail at once).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Callable, Sequence

import PIL.Image

from mteditlab.chat_client import (MAX_BODY, ChatClient, EndpointError, is_endpoint_url, openai_messages,
                                   parse_bool, reply_content, retry_after_seconds, run_concurrently, url_options)
from mteditlab.rewards.base import EditSample, RewardModel, RewardOutput
from mteditlab.rewards.pairwise import PairwiseJudge
from mteditlab.rewards.parsing import ScoreParseError, average_votes, digit_expectation, parse_score
from mteditlab.rewards.prompts import DIRECT_PREFILL, build_messages
from mteditlab.rewards.qwen_vl import JUDGE_ID_ENV, check_judge_options, judge_jobs, judge_output

JUDGE_URL_ENV = "MTEDITLAB_JUDGE_URL"
API_KEY_ENVS = ("MTEDITLAB_JUDGE_API_KEY", "OPENAI_API_KEY")
DIGITS = frozenset("0123456789")
__all__ = ["JUDGE_URL_ENV", "EndpointError", "EndpointJudge", "MAX_BODY", "is_endpoint_url", "retry_after_seconds",
           "score_position", "served_judge", "split_url"]


def ascii_digit(token: object) -> int | None:
    """The digit of a token that is one ASCII digit once surrounding whitespace is stripped, else None
    (``"７"``, ``"²"`` and non-strings are not digits)."""
    text = token.strip() if isinstance(token, str) else None
    return int(text) if text in DIGITS else None


def probability(logprob: object) -> float | None:
    """``exp(logprob)`` of a finite real number ``<= 0`` (a JSON boolean is not a number), else None."""
    number = isinstance(logprob, (int, float)) and not isinstance(logprob, bool)
    return math.exp(logprob) if number and math.isfinite(logprob) and logprob <= 0 else None


def score_position(tokens: list[dict], prefill: bool) -> dict:
    """The ``logprobs.content`` entry holding the score digit: the first one when the prompt was
    prefilled with ``"Score: "``, else the first whose token is an ASCII digit."""
    if not tokens:
        raise EndpointError("reply has no logprobs (the server must support logprobs / top_logprobs)", False)
    if prefill:
        return tokens[0]
    for entry in tokens:
        if isinstance(entry, dict) and ascii_digit(entry.get("token")) is not None:
            return entry
    raise EndpointError("no digit token in the reply", False)


def digit_probs(entry: dict, scale: int) -> list[float]:
    """``p_d`` for ``d = 0..scale``: the summed probability of the alternatives at ``entry`` (its
    ``top_logprobs``, else the entry itself) whose token is the digit ``d`` (:func:`ascii_digit`), 0 for
    digits not listed. An alternative that is not an object, or whose logprob is not a
    :func:`probability`, is ignored."""
    probs = [0.0] * (scale + 1)
    alternatives = entry.get("top_logprobs") if isinstance(entry, dict) else None
    for alt in alternatives if isinstance(alternatives, list) and alternatives else [entry]:
        if isinstance(alt, dict):
            digit, p = ascii_digit(alt.get("token")), probability(alt.get("logprob"))
            if digit is not None and digit <= scale and p is not None:
                probs[digit] += p
    return probs



def parse_vote(content: object, scale: int) -> float:
    """``parsing.parse_score`` of one thinking-mode vote; content that is not text (a list of parts, a
    number) is a :class:`~mteditlab.rewards.parsing.ScoreParseError`, a failed vote."""
    if content is not None and not isinstance(content, str):
        raise ScoreParseError(f"reply is a JSON {type(content).__name__}, not text")
    return parse_score(content, scale)


class EndpointJudge(RewardModel):
    """The ``qwen-vl`` judge over an OpenAI-compatible endpoint (see the module docstring).

    ``scale``, ``mode``, ``votes``, ``sub_scores``, ``overall``, ``min_score_mass``, ``temperature``
    as in :class:`~mteditlab.rewards.qwen_vl.QwenVLJudge`; ``max_tokens`` defaults to 1 (direct,
    prefilled), 16 (direct) or 256 (thinking); ``top_logprobs`` is ``k``; ``concurrency`` the requests
    in flight; ``timeout``, ``retries``, ``backoff``, ``max_backoff``, ``max_body`` go to
    :class:`ChatClient`.
    """

    name = "qwen-vl"

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 mode: str = "direct", votes: int = 1, scale: int = 9, temperature: float = 0.7,
                 max_tokens: int | None = None, top_logprobs: int = 20, prefill: bool = True,
                 min_score_mass: float = 0.5, sub_scores: Sequence[str] | None = None, overall: str = "mean",
                 concurrency: int = 16, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 max_backoff: float = 30.0, max_body: int = MAX_BODY):
        self.sub_scores = check_judge_options(mode, votes, scale, overall, sub_scores)
        if concurrency < 1 or top_logprobs < 1:
            raise ValueError("concurrency and top_logprobs must be >= 1")
        self.client = ChatClient(base_url, model=model or os.environ.get(JUDGE_ID_ENV) or None, api_key=api_key,
                                 key_envs=API_KEY_ENVS, timeout=timeout, retries=retries, backoff=backoff,
                                 max_backoff=max_backoff, max_body=max_body)
        self.mode, self.votes, self.scale, self.temperature, self.prefill = mode, votes, scale, temperature, prefill
        self.max_tokens = max_tokens or (256 if mode == "thinking" else 1 if prefill else 16)
        self.top_logprobs, self.min_score_mass, self.overall = top_logprobs, min_score_mass, overall
        self.concurrency = concurrency

    @property
    def stats(self) -> dict[str, int]:
        """Requests, retries and failed requests over this judge's lifetime."""
        return dict(self.client.stats)

    def payload(self, messages: list[dict], images: Sequence[PIL.Image.Image], *, seed: int) -> dict:
        """The chat-completions request body for one chat (module docstring)."""
        body = {"model": self.client.served_model(), "messages": openai_messages(messages, images),
                "max_tokens": self.max_tokens, "seed": seed}
        if self.mode == "direct":
            body.update(temperature=0.0, logprobs=True, top_logprobs=self.top_logprobs, n=1)
            if self.prefill:
                body["messages"].append({"role": "assistant", "content": DIRECT_PREFILL})
                body.update(continue_final_message=True, add_generation_prompt=False)
        else:
            body.update(n=self.votes, temperature=self.temperature if self.votes > 1 else 0.0)
        return body

    def judge_chat(self, messages: list[dict], images: Sequence[PIL.Image.Image], *, scale: int,
                   seed: int) -> tuple[float, str | None, object]:
        """``(value, error, extra)`` of one chat answered on ``0..scale`` (``extra``: score-token mass
        in direct mode, ``(replies, failed votes)`` in thinking mode); never raises."""
        failed_extra = math.nan if self.mode == "direct" else ([], self.votes)
        try:
            reply = self.client.request("chat/completions", self.payload(messages, images, seed=seed))
            choices = reply.get("choices")
            if not choices:
                raise EndpointError(f"reply without choices: {json.dumps(reply)[:120]}", False)
            if self.mode == "direct":
                content = (choices[0].get("logprobs") or {}).get("content") or []
                probs = digit_probs(score_position(content, self.prefill), scale)
                return digit_expectation(probs, self.min_score_mass)
            replies = [reply_content(c) for c in choices]
            value, error, failed = average_votes(replies, functools.partial(parse_vote, scale=scale))
            return value, error, (replies, failed)
        except EndpointError as err:
            return math.nan, str(err), failed_extra
        except Exception as err:  # noqa: BLE001 - a malformed reply is a reported failure, never a crash
            return math.nan, f"unusable reply: {type(err).__name__}: {err}", failed_extra

    def run(self, chats: Sequence[Callable[[], tuple]]) -> list[tuple]:
        """Call each chat thunk on the bounded pool; results in order."""
        return run_concurrently(chats, self.concurrency)

    def score(self, samples: Sequence[EditSample], *, seed: int = 0) -> RewardOutput:
        """Judge every applicable (sample, sub-score) chat concurrently; request ``j`` carries the seed
        ``seed · 1000003 + j``. ``details``: as the in-process judge's, plus ``endpoint`` (this call's
        ``requests``, ``retries`` and ``failed_requests``)."""
        before = self.stats
        jobs = judge_jobs(samples, self.sub_scores)
        chats = [functools.partial(
            self.judge_chat, build_messages(samples[i], crit, mode=self.mode, scale=self.scale),
            (samples[i].source, samples[i].edited), scale=self.scale, seed=seed * 1_000_003 + j)
            for j, (i, crit) in enumerate(jobs)]
        judged = self.run(chats)
        endpoint = {k: v - before[k] for k, v in self.stats.items()}
        return judge_output(len(samples), self.sub_scores, jobs, judged, mode=self.mode, rule=self.overall,
                            details={"endpoint": endpoint})


def served_judge(url: str, **kwargs) -> RewardModel:
    """The judge served at ``url``: an :class:`EndpointJudge`, or with ``pairwise`` a
    :class:`~mteditlab.rewards.pairwise.PairwiseJudge` over one; options from the URL's query
    (:data:`URL_OPTIONS`), ``kwargs`` overriding them.
    ``served_judge("http://h:8000/v1?mode=thinking&votes=4")``."""
    base, options = split_url(url, kwargs)
    pairwise, group_size = options.pop("pairwise", False), options.pop("group_size", None)
    if group_size is not None and not pairwise:
        raise ValueError("group_size applies to the pairwise judge only (add pairwise=1)")
    judge = EndpointJudge(base, **options)
    return PairwiseJudge(judge, group_size=group_size) if pairwise else judge


URL_OPTIONS: dict[str, Callable[[str], object]] = {
    "model": str, "mode": str, "overall": str, "votes": int, "scale": int, "max_tokens": int,
    "top_logprobs": int, "concurrency": int, "retries": int, "temperature": float, "min_score_mass": float,
    "timeout": float, "backoff": float, "max_backoff": float, "max_body": int, "prefill": parse_bool,
    "pairwise": parse_bool, "group_size": int,
    "sub_scores": lambda text: tuple(s for s in re.split(r"[\s,+]+", text) if s),
}


def split_url(url: str, overrides: dict | None = None) -> tuple[str, dict]:
    """``(base URL, options)`` from a URL whose query holds :data:`URL_OPTIONS`; ``overrides`` win.
    Unknown options raise ``ValueError``."""
    return url_options(url, URL_OPTIONS, overrides, what="judge")
