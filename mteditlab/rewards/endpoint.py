"""``qwen-vl`` served by an inference engine: a judge behind an OpenAI-compatible chat-completions
endpoint (``vllm serve``, ``python -m sglang.launch_server``).

The chats are the in-process judge's (``prompts.build_messages``), with each image sent as a base64
PNG data URL (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}}``).

* **direct** mode — one request per chat, ``temperature`` 0, ``logprobs`` with ``top_logprobs = k``.
  With ``prefill`` (default) the last message is the assistant's ``"Score: "`` sent with
  ``continue_final_message`` (vLLM / SGLang), so the first generated position is the score digit;
  without it, the first generated token that is a digit. With ``p_d = exp(logprob)`` of the digit
  alternatives ``d = 0..scale`` at that position (absent from the top ``k``: 0), the score is
  ``parsing.digit_expectation``: ``Σ d·p_d / Σ p_d / scale``, failed when ``Σ p_d < min_score_mass``.
  The server must allow ``k`` (vLLM: ``--max-logprobs``).
* **thinking** mode — one request per chat with ``n = votes`` choices (``temperature``; greedy when
  ``votes == 1``), each reply parsed by ``parsing.parse_score`` and averaged over the ones that parse
  (``parsing.average_votes``).

Transport: a bounded thread pool (``concurrency`` requests in flight), a ``timeout`` per socket
operation, and up to ``retries`` retries with exponential backoff ``backoff · 2^attempt`` (capped at
``max_backoff``) on transport failures — connection refused or dropped, timeout, HTTP 408 / 429 / 5xx,
a body that is not JSON. Any other HTTP error is not retried. A chat whose request fails for good is
NaN with the reason (the reward contract); the batch goes on. ``details["endpoint"]`` counts this
call's requests, retries and failed requests; ``EndpointJudge.stats`` counts them over its lifetime.

Select it with ``get_reward("qwen-vl", path="http://HOST:PORT/v1")`` (``--reward-paths
qwen-vl=http://HOST:PORT/v1`` in the trainer) or ``$MTEDITLAB_JUDGE_URL``; options ride on the URL's
query (``…/v1?mode=thinking&votes=4&sub_scores=if+cc``, see :data:`URL_OPTIONS`). The API key comes
from ``$MTEDITLAB_JUDGE_API_KEY`` (else ``$OPENAI_API_KEY``); the served model name from ``model=``,
else ``$MTEDITLAB_JUDGE_ID``, else the first one the endpoint lists at ``/models``.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import PIL.Image

from mteditlab.rewards.base import EditSample, RewardModel, RewardOutput
from mteditlab.rewards.pairwise import PairwiseJudge
from mteditlab.rewards.parsing import average_votes, digit_expectation, parse_score
from mteditlab.rewards.prompts import DIRECT_PREFILL, build_messages
from mteditlab.rewards.qwen_vl import JUDGE_ID_ENV, check_judge_options, judge_jobs, judge_output

JUDGE_URL_ENV = "MTEDITLAB_JUDGE_URL"
API_KEY_ENVS = ("MTEDITLAB_JUDGE_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DIGITS = frozenset("0123456789")


class EndpointError(Exception):
    """A request that did not give a usable reply; ``str(err)`` is the reason."""

    def __init__(self, reason: str, retryable: bool):
        super().__init__(reason)
        self.retryable = retryable


def is_endpoint_url(path: str | None) -> bool:
    """Whether a reward path names an HTTP(S) endpoint rather than a local model."""
    return bool(path) and urllib.parse.urlsplit(str(path)).scheme in ("http", "https")


class ChatClient:
    """POSTs JSON to ``{base_url}/chat/completions`` with bounded retries (see the module docstring).

    ``stats``: ``requests`` (attempts sent), ``retries`` and ``failed_requests`` (given up), guarded
    by a lock so the pool's threads can share one client.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, max_backoff: float = 30.0):
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("retries must be >= 0, timeout > 0 and backoff >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else next(
            (os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.stats = {"requests": 0, "retries": 0, "failed_requests": 0}
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def request(self, route: str, payload: dict | None = None) -> dict:
        """The JSON reply of ``route`` (POST with ``payload``, GET without), retried as documented;
        raises :class:`EndpointError` naming the last reason and the attempts made."""
        for attempt in range(self.retries + 1):
            try:
                self._count("requests")
                return self._once(route, payload)
            except EndpointError as err:
                if not err.retryable or attempt == self.retries:
                    self._count("failed_requests")
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise EndpointError(f"{err}{tries}", err.retryable) from None
            self._count("retries")
            time.sleep(min(self.backoff * 2 ** attempt, self.max_backoff))
        raise AssertionError("unreachable")

    def _once(self, route: str, payload: dict | None) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.base_url}/{route}", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            raise EndpointError(f"HTTP {err.code}: {_error_text(err)}", err.code in RETRY_STATUS) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise EndpointError(f"timed out after {self.timeout:g} s", True) from None
            raise EndpointError(f"connection failed: {err.reason}", True) from None
        except (TimeoutError, socket.timeout):
            raise EndpointError(f"timed out after {self.timeout:g} s", True) from None
        except (http.client.HTTPException, ConnectionError) as err:
            raise EndpointError(f"connection dropped: {type(err).__name__}: {err}", True) from None
        try:
            reply = json.loads(body)
        except ValueError:
            raise EndpointError(f"malformed JSON reply: {body[:60]!r}", True) from None
        if not isinstance(reply, dict):
            raise EndpointError(f"reply is a JSON {type(reply).__name__}, not an object", False)
        return reply


def _error_text(err: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI's ``{"error": {"message": …}}`` or ``{"message": …}``), else
    the start of the body."""
    try:
        body = err.read().decode("utf-8", "replace")
    except OSError:
        return err.reason or ""
    try:
        reply = json.loads(body)
        error = reply.get("error", reply) if isinstance(reply, dict) else reply
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or body)[:200]
    except ValueError:
        return body[:200] or str(err.reason)


def image_data_url(image: PIL.Image.Image) -> str:
    """``data:image/png;base64,…`` of the image in RGB."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(messages: list[dict], images: Sequence[PIL.Image.Image]) -> list[dict]:
    """The chat-template messages of ``prompts`` with each ``{"type": "image"}`` replaced, in order, by
    an ``image_url`` part holding the next of ``images`` as a data URL."""
    pending = iter(images)
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "image_url", "image_url": {"url": image_data_url(next(pending))}}
                       if part["type"] == "image" else part for part in content]
        out.append({**message, "content": content})
    if next(pending, None) is not None:
        raise ValueError("more images than image slots in the chat")
    return out


def score_position(tokens: list[dict], prefill: bool) -> dict:
    """The ``logprobs.content`` entry holding the score digit: the first one when the prompt was
    prefilled with ``"Score: "``, else the first whose token is a digit."""
    if not tokens:
        raise EndpointError("reply has no logprobs (the server must support logprobs / top_logprobs)", False)
    if prefill:
        return tokens[0]
    for entry in tokens:
        if entry.get("token", "").strip() in DIGITS:
            return entry
    raise EndpointError("no digit token in the reply", False)


def digit_probs(entry: dict, scale: int) -> list[float]:
    """``p_d`` for ``d = 0..scale``: the probability of the alternatives at ``entry`` whose token is
    the digit ``d`` (surrounding spaces ignored; variants summed), 0 for digits not listed."""
    probs = [0.0] * (scale + 1)
    alternatives = entry.get("top_logprobs") or [entry]
    for alt in alternatives:
        token, logprob = str(alt.get("token", "")).strip(), alt.get("logprob")
        if len(token) == 1 and token.isdigit() and int(token) <= scale and logprob is not None:
            probs[int(token)] += math.exp(float(logprob))
    return probs


class EndpointJudge(RewardModel):
    """The ``qwen-vl`` judge over an OpenAI-compatible endpoint (see the module docstring).

    ``scale``, ``mode``, ``votes``, ``sub_scores``, ``overall``, ``min_score_mass``, ``temperature``
    as in :class:`~mteditlab.rewards.qwen_vl.QwenVLJudge`; ``max_tokens`` defaults to 1 (direct,
    prefilled), 16 (direct) or 256 (thinking); ``top_logprobs`` is ``k``; ``concurrency`` the requests
    in flight; ``timeout``, ``retries``, ``backoff``, ``max_backoff`` go to :class:`ChatClient`.
    """

    name = "qwen-vl"

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 mode: str = "direct", votes: int = 1, scale: int = 9, temperature: float = 0.7,
                 max_tokens: int | None = None, top_logprobs: int = 20, prefill: bool = True,
                 min_score_mass: float = 0.5, sub_scores: Sequence[str] | None = None, overall: str = "mean",
                 concurrency: int = 16, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 max_backoff: float = 30.0):
        self.sub_scores = check_judge_options(mode, votes, scale, overall, sub_scores)
        if concurrency < 1 or top_logprobs < 1:
            raise ValueError("concurrency and top_logprobs must be >= 1")
        self.client = ChatClient(base_url, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff,
                                 max_backoff=max_backoff)
        self.mode, self.votes, self.scale, self.temperature, self.prefill = mode, votes, scale, temperature, prefill
        self.max_tokens = max_tokens or (256 if mode == "thinking" else 1 if prefill else 16)
        self.top_logprobs, self.min_score_mass, self.overall = top_logprobs, min_score_mass, overall
        self.concurrency = concurrency
        self._model = model or os.environ.get(JUDGE_ID_ENV) or None
        self._model_lock = threading.Lock()

    @property
    def stats(self) -> dict[str, int]:
        """Requests, retries and failed requests over this judge's lifetime."""
        return dict(self.client.stats)

    def served_model(self) -> str:
        """The model name sent with each request (see the module docstring); listed once, then kept."""
        with self._model_lock:
            if self._model is None:
                listing = self.client.request("models").get("data") or []
                if not listing or "id" not in listing[0]:
                    raise EndpointError("the endpoint lists no model at /models; pass model=", False)
                self._model = listing[0]["id"]
            return self._model

    def payload(self, messages: list[dict], images: Sequence[PIL.Image.Image], *, seed: int) -> dict:
        """The chat-completions request body for one chat (module docstring)."""
        body = {"model": self.served_model(), "messages": openai_messages(messages, images),
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
            replies = [(c.get("message") or {}).get("content") for c in choices]
            value, error, failed = average_votes(replies, functools.partial(parse_score, scale=scale))
            return value, error, (replies, failed)
        except EndpointError as err:
            return math.nan, str(err), failed_extra
        except Exception as err:  # noqa: BLE001 - a malformed reply is a reported failure, never a crash
            return math.nan, f"unusable reply: {type(err).__name__}: {err}", failed_extra

    def run(self, chats: Sequence[Callable[[], tuple]]) -> list[tuple]:
        """Call each chat thunk on the bounded pool; results in order."""
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(chats), 1))) as pool:
            return list(pool.map(lambda chat: chat(), chats))

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


def _bool(text: str) -> bool:
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(f"not a boolean: {text!r}")
    return text.lower() in ("1", "true", "yes")


URL_OPTIONS: dict[str, Callable[[str], object]] = {
    "model": str, "mode": str, "overall": str, "votes": int, "scale": int, "max_tokens": int,
    "top_logprobs": int, "concurrency": int, "retries": int, "temperature": float, "min_score_mass": float,
    "timeout": float, "backoff": float, "max_backoff": float, "prefill": _bool, "pairwise": _bool,
    "group_size": int, "sub_scores": lambda text: tuple(s for s in re.split(r"[\s,+]+", text) if s),
}


def split_url(url: str, overrides: dict | None = None) -> tuple[str, dict]:
    """``(base URL, options)`` from a URL whose query holds :data:`URL_OPTIONS`; ``overrides`` win.
    Unknown options raise ``ValueError``."""
    parts = urllib.parse.urlsplit(url)
    options = {}
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key not in URL_OPTIONS:
            raise ValueError(f"unknown judge URL option {key!r}; known: {', '.join(sorted(URL_OPTIONS))}")
        options[key] = URL_OPTIONS[key](values[-1])
    base = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
    return base, {**options, **(overrides or {})}
