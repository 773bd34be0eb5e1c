"""An OpenAI-compatible chat-completions endpoint (``vllm serve``, ``python -m sglang.launch_server``):
the transport the served judge (:mod:`mteditlab.rewards.endpoint`) and the served intent reconstructor
(:mod:`mteditlab.reconstructors.served`) share.

Transport (:class:`ChatClient`): each request attempt has one wall-clock deadline of ``timeout``
seconds covering connect, headers and body; a reply body over ``max_body`` bytes (8 MiB) is a failure,
read no further; redirects are failures, never followed (the API key goes to the configured host only).
Up to ``retries`` retries with exponential backoff ``backoff · 2^attempt`` (capped at ``max_backoff``)
on transport failures — connection refused or dropped, deadline passed, HTTP 408 / 429 / 5xx, a body
that is not JSON; when such an answer carries ``Retry-After`` (seconds or an HTTP date) the retry waits
that long instead, and a request asked to wait longer than ``timeout`` fails at once. Any other failure
is not retried. The API key is the first of ``key_envs`` set in the environment (or ``api_key``); the
model name is ``model``, else the first one the endpoint lists at ``/models``.
:func:`run_concurrently` runs a batch's requests on a bounded thread pool; images travel as base64
PNG data URLs (:func:`openai_messages`); :func:`url_options` reads options from a URL's query.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import functools
import http.client
import io
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import PIL.Image

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
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
    """Whether a path names an HTTP(S) endpoint rather than a local model."""
    return bool(path) and urllib.parse.urlsplit(str(path)).scheme in ("http", "https")


class ChatClient:
    """Sends JSON to ``{base_url}/{route}`` with one deadline per attempt, a body cap and bounded
    retries (see the module docstring); never follows a redirect.

    ``stats``: ``requests`` (attempts sent), ``retries`` and ``failed_requests`` (given up), guarded
    by a lock so the pool's threads can share one client.
    """

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 key_envs: Sequence[str] = ("OPENAI_API_KEY",), timeout: float = 120.0, retries: int = 3,
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
            (os.environ[k] for k in key_envs if os.environ.get(k)), None)
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.max_body = max_body
        self.stats = {"requests": 0, "retries": 0, "failed_requests": 0}
        self._lock = threading.Lock()
        self._model, self._model_lock = model, threading.Lock()
        self._model_failure: tuple[float, str] | None = None  # (when, reason) of the last failed listing

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def served_model(self) -> str:
        """The model name to send: the one given, else the first the endpoint lists at ``/models``
        (listed once, then kept); a failed listing raises its :class:`EndpointError` again, without
        asking, for :data:`MODEL_RETRY_S` seconds."""
        with self._model_lock:
            if self._model is None:
                if self._model_failure and time.monotonic() - self._model_failure[0] < MODEL_RETRY_S:
                    raise EndpointError(self._model_failure[1], False)
                try:
                    listing = self.request("models").get("data")
                    if not (isinstance(listing, list) and listing and isinstance(listing[0], dict)
                            and isinstance(listing[0].get("id"), str)):
                        raise EndpointError("the endpoint lists no model at /models; pass model=", False)
                except EndpointError as err:
                    self._model_failure = (time.monotonic(), str(err))
                    raise
                self._model = listing[0]["id"]
            return self._model

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
    """Chat-template messages with each ``{"type": "image"}`` part replaced, in order, by an
    ``image_url`` part holding the next of ``images`` as a data URL."""
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


def reply_content(choice: object) -> object:
    """``choice["message"]["content"]``; None when the choice holds no message."""
    message = choice.get("message") if isinstance(choice, dict) else None
    return message.get("content") if isinstance(message, dict) else None


def run_concurrently(calls: Sequence[Callable[[], object]], concurrency: int) -> list:
    """Each thunk of ``calls`` on a pool of at most ``concurrency`` threads; results in order."""
    with ThreadPoolExecutor(max_workers=min(concurrency, max(len(calls), 1))) as pool:
        return list(pool.map(lambda call: call(), calls))


def parse_bool(text: str) -> bool:
    """``1 / 0 / true / false / yes / no`` (any case) of a URL option."""
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ValueError(f"not a boolean: {text!r}")
    return text.lower() in ("1", "true", "yes")


def url_options(url: str, known: dict[str, Callable[[str], object]], overrides: dict | None = None,
                what: str = "endpoint") -> tuple[str, dict]:
    """``(base URL, options)`` from a URL whose query holds options of ``known`` (name → parser);
    ``overrides`` win. An unknown option raises ``ValueError`` naming the known ones."""
    parts = urllib.parse.urlsplit(url)
    options = {}
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key not in known:
            raise ValueError(f"unknown {what} URL option {key!r}; known: {', '.join(sorted(known))}")
        options[key] = known[key](values[-1])
    base = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
    return base, {**options, **(overrides or {})}
