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

Transport: a bounded thread pool (``concurrency`` requests in flight); each request attempt has one
wall-clock deadline of ``timeout`` seconds covering connect, headers and body; a reply body over
``max_body`` bytes (8 MiB) is a failure, read no further; redirects are failures, never followed (the API
key goes to the configured host only). Up to ``retries`` retries with exponential backoff
``backoff · 2^attempt`` (capped at ``max_backoff``) on transport failures — connection refused or
dropped, deadline passed, HTTP 408 / 429 / 5xx, a body that is not JSON; when such an answer carries
``Retry-After`` (seconds or an HTTP date) the retry waits that long instead, and a request asked to wait
longer than ``timeout`` fails at once. Any other failure is not retried. A chat whose request fails for
good is NaN with the reason (the reward contract); the batch goes on. ``details["endpoint"]`` counts
this call's requests, retries and failed requests; ``EndpointJudge.stats`` counts them over its
lifetime.

Select it with ``get_reward("qwen-vl", path="http://HOST:PORT/v1")`` (``--reward-paths
qwen-vl=http://HOST:PORT/v1`` in the trainer) or ``$MTEDITLAB_JUDGE_URL``; options ride on the URL's
query (``…/v1?mode=thinking&votes=4&sub_scores=if+cc``, see :data:`URL_OPTIONS`). The API key comes
from ``$MTEDITLAB_JUDGE_API_KEY`` (else ``$OPENAI_API_KEY``); the served model name from ``model=``,
else ``$MTEDITLAB_JUDGE_ID``, else the first one the endpoint lists at ``/models`` (a failed listing is
answered from memory for :data:`MODEL_RETRY_S` seconds, so the other chats fail at once).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
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
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import PIL.Image

from mteditlab.rewards.base import EditSample, RewardModel, RewardOutput
from mteditlab.rewards.pairwise import PairwiseJudge
from mteditlab.rewards.parsing import ScoreParseError, average_votes, digit_expectation, parse_score
from mteditlab.rewards.prompts import DIRECT_PREFILL, build_messages
from mteditlab.rewards.qwen_vl import JUDGE_ID_ENV, check_judge_options, judge_jobs, judge_output

JUDGE_URL_ENV = "MTEDITLAB_JUDGE_URL"
API_KEY_ENVS = ("MTEDITLAB_JUDGE_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DIGITS = frozenset("0123456789")
MAX_BODY = 8 << 20  # default cap on a reply body (bytes)
MODEL_RETRY_S = 30.0  # how long a failed /models listing is answered from memory
ERROR_TEXT_BYTES = 4096  # read of an error reply's body, for its message
CHUNK = 1 << 16  # read size of a reply body


class EndpointError(Exception):
    """A request that did not give a usable reply; ``str(err)`` is the reason, ``retry_after`` the
    seconds the server asked to wait before retrying (None: not said)."""

    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.retryable, self.retry_after = retryable, retry_after


def is_endpoint_url(path: str | None) -> bool:
    """Whether a reward path names an HTTP(S) endpoint rather than a local model."""
    return bool(path) and urllib.parse.urlsplit(str(path)).scheme in ("http", "https")


class ChatClient:
    """Sends JSON to ``{base_url}/{route}`` with one deadline per attempt, a body cap and bounded
    retries (see the module docstring); never follows a redirect.

    ``stats``: ``requests`` (attempts sent), ``retries`` and ``failed_requests`` (given up), guarded
    by a lock so the pool's threads can share one client.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, max_backoff: float = 30.0, max_body: int = MAX_BODY):
        if retries < 0 or timeout <= 0 or backoff < 0 or max_body < 1:
            raise ValueError("retries must be >= 0, timeout > 0, backoff >= 0 and max_body >= 1")
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._connect, self._path = functools.partial(connection, parts.hostname, parts.port), parts.path
        self.api_key = api_key if api_key is not None else next(
            (os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_body = max_body
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
                too_late = err.retry_after is not None and err.retry_after > self.timeout
                if not err.retryable or attempt == self.retries or too_late:
                    self._count("failed_requests")
                    note = (f" (asked to retry after {err.retry_after:g} s, beyond the {self.timeout:g} s timeout)"
                            if too_late else f" (after {attempt + 1} attempts)" if attempt else "")
                    raise EndpointError(f"{err}{note}", err.retryable) from None
                backoff = min(self.backoff * 2 ** attempt, self.max_backoff)
                wait = backoff if err.retry_after is None else err.retry_after
            self._count("retries")
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _once(self, route: str, payload: dict | None) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "mteditlab"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        response, body = self._exchange("GET" if data is None else "POST", route, data, headers)
        status = response.status
        if 300 <= status < 400:
            raise EndpointError(f"HTTP {status} redirect to {response.getheader('Location')} (not followed)", False)
        if not 200 <= status < 300:
            retry_after = retry_after_seconds(response.getheader("Retry-After")) if status in RETRY_STATUS else None
            raise EndpointError(f"HTTP {status}: {_error_text(body) or response.reason}", status in RETRY_STATUS,
                                retry_after)
        try:
            reply = json.loads(body)
        except ValueError:
            raise EndpointError(f"malformed JSON reply: {bytes(body[:60])!r}", True) from None
        if not isinstance(reply, dict):
            raise EndpointError(f"reply is a JSON {type(reply).__name__}, not an object", False)
        return reply

    def _exchange(self, method: str, route: str, data: bytes | None,
                  headers: dict) -> tuple[http.client.HTTPResponse, bytes | bytearray]:
        """``(response, body)`` of one attempt, within its deadline (:class:`_Watchdog`); a success
        body over ``max_body`` bytes is an :class:`EndpointError`, another status's body is read up to
        :data:`ERROR_TEXT_BYTES`."""
        connection = self._connect(timeout=self.timeout)
        watchdog = _Watchdog(connection, self.timeout)
        phase = "connection failed"
        try:
            connection.connect()
            watchdog.hold(connection.sock)
            phase = "connection dropped"
            connection.request(method, f"{self._path}/{route}", body=data, headers=headers)
            response = connection.getresponse()
            body = self._capped_body(response) if 200 <= response.status < 300 else response.read(ERROR_TEXT_BYTES)
        except (OSError, http.client.HTTPException) as err:
            if watchdog.expired.is_set() or isinstance(err, TimeoutError):
                raise EndpointError(f"timed out after {self.timeout:g} s", True) from None
            raise EndpointError(f"{phase}: {type(err).__name__}: {err}", True) from None
        finally:
            watchdog.cancel()
            connection.close()
        if watchdog.expired.is_set():  # the body ended because the watchdog shut the socket
            raise EndpointError(f"timed out after {self.timeout:g} s", True)
        return response, body

    def _capped_body(self, response: http.client.HTTPResponse) -> bytearray:
        """The body read in chunks; :class:`EndpointError` (not retried) once it is over ``max_body``
        bytes, or announced to be."""
        too_large = EndpointError(f"reply body over the {self.max_body}-byte cap (max_body)", False)
        declared = response.getheader("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_large
        body = bytearray()
        while chunk := response.read(min(CHUNK, self.max_body + 1 - len(body))):
            body += chunk
            if len(body) > self.max_body:
                raise too_large
        return body


class _Watchdog:
    """One attempt's deadline, ``seconds`` from now: then ``expired`` is set and the connection's socket
    (and the one :meth:`hold` kept, which http.client lets go of once a reply will close the
    connection) is shut, waking whatever connect, send or read is blocked on it."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float):
        self.connection, self.held, self.expired = connection, None, threading.Event()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.start()

    def hold(self, sock: socket.socket) -> None:
        """Keep the connected socket; ``TimeoutError`` when the deadline passed while connecting."""
        self.held = sock
        if self.expired.is_set():
            raise TimeoutError

    def _expire(self) -> None:
        self.expired.set()  # before reading the sockets: hold() then sees it or has stored its socket
        for sock in {self.connection.sock, self.held} - {None}:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def retry_after_seconds(value: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for: delay-seconds (a non-negative decimal number) or an
    HTTP date (0 once past); None when absent or unreadable."""
    value = (value or "").strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)
    return max(when.timestamp() - time.time(), 0.0)


def _error_text(body: bytes) -> str:
    """The server's error message (OpenAI's ``{"error": {"message": …}}`` or ``{"message": …}``), else
    the start of the body ("" when empty)."""
    text = body.decode("utf-8", "replace")
    try:
        reply = json.loads(text)
        error = reply.get("error", reply) if isinstance(reply, dict) else reply
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or text)[:200]
    except ValueError:
        return text[:200]


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


def reply_content(choice: object) -> object:
    """``choice["message"]["content"]``; None when the choice holds no message."""
    message = choice.get("message") if isinstance(choice, dict) else None
    return message.get("content") if isinstance(message, dict) else None


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
        self.client = ChatClient(base_url, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff,
                                 max_backoff=max_backoff, max_body=max_body)
        self.mode, self.votes, self.scale, self.temperature, self.prefill = mode, votes, scale, temperature, prefill
        self.max_tokens = max_tokens or (256 if mode == "thinking" else 1 if prefill else 16)
        self.top_logprobs, self.min_score_mass, self.overall = top_logprobs, min_score_mass, overall
        self.concurrency = concurrency
        self._model = model or os.environ.get(JUDGE_ID_ENV) or None
        self._model_lock = threading.Lock()
        self._model_failure: tuple[float, str] | None = None  # (when, reason) of the last failed listing

    @property
    def stats(self) -> dict[str, int]:
        """Requests, retries and failed requests over this judge's lifetime."""
        return dict(self.client.stats)

    def served_model(self) -> str:
        """The model name sent with each request (see the module docstring): listed once, then kept; a
        failed listing raises its :class:`EndpointError` again, without asking, for
        :data:`MODEL_RETRY_S` seconds."""
        with self._model_lock:
            if self._model is None:
                if self._model_failure and time.monotonic() - self._model_failure[0] < MODEL_RETRY_S:
                    raise EndpointError(self._model_failure[1], False)
                try:
                    listing = self.client.request("models").get("data")
                    if not (isinstance(listing, list) and listing and isinstance(listing[0], dict)
                            and isinstance(listing[0].get("id"), str)):
                        raise EndpointError("the endpoint lists no model at /models; pass model=", False)
                except EndpointError as err:
                    self._model_failure = (time.monotonic(), str(err))
                    raise
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
            replies = [reply_content(c) for c in choices]
            value, error, failed = average_votes(replies, functools.partial(parse_vote, scale=scale))
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
    "timeout": float, "backoff": float, "max_backoff": float, "max_body": int, "prefill": _bool, "pairwise": _bool,
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
