"""A local OpenAI-compatible chat-completions server for tests and benchmarks (stdlib ``http.server``
in a thread), able to misbehave as a hostile or broken server would.

``ChatServer(respond)`` serves ``respond(route, body, headers) -> reply`` on 127.0.0.1, where a reply is
a dict (200 JSON), ``(status, dict)``, raw ``bytes`` (200, unparsed), a :class:`Reply` (any status,
headers and body, streamed), :data:`DROP` (close the connection without answering) or
``("sleep", seconds, reply)``. Hostile replies: :func:`redirect`, :func:`trickle`, :func:`endless`,
:func:`flood`, :func:`retry_later`; hostile responders: :func:`rate_limited`, :func:`failing_every`.

``TinyVLMResponder`` answers with a real transformers Qwen-VL (the tiny random-weight ones of
``tests/tiny_qwen_vl.py``): it decodes the data-URL images, applies the chat template
(``continue_final_message`` as vLLM does), generates and returns ``logprobs`` / ``top_logprobs`` from
the raw logits, refusing more than ``max_logprobs`` alternatives as vLLM's ``--max-logprobs`` does.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Iterable

from PIL import Image

if TYPE_CHECKING:
    import torch

DROP = object()


@dataclass
class Reply:
    """A reply written as told: ``status``, extra ``headers``, then ``body`` — bytes, or byte chunks (an
    iterable, possibly endless) each written after ``pause`` seconds. Content-Length is ``length``, else
    the size of a bytes body; without one the body ends when the server closes the connection."""

    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    pause: float = 0.0
    length: int | None = None


class ChatServer:
    """Serves ``respond`` until :meth:`close`; ``url`` is the ``…/v1`` base; ``requests`` logs
    ``(route, body, headers)`` of every request received, ``bytes_received`` counts every byte read
    from clients (request lines, headers and bodies)."""

    def __init__(self, respond):
        self.respond, self.requests, self.bytes_received, self._lock = respond, [], 0, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                self.rfile = _CountingReader(self.rfile, server)

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def _answer(self, body):
                route = self.path.removeprefix("/v1/")
                with server._lock:
                    server.requests.append((route, body, dict(self.headers)))
                reply = server.respond(route, body, dict(self.headers))
                while isinstance(reply, tuple) and reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = reply[2]
                if reply is DROP:
                    self.close_connection = True
                    return
                try:
                    self._write(as_reply(reply))
                except ConnectionError:  # the client gave up (deadline, size cap)
                    self.close_connection = True

            def _write(self, reply: Reply):
                length = len(reply.body) if reply.length is None and isinstance(reply.body, bytes) else reply.length
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if length is None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                for chunk in [reply.body] if isinstance(reply.body, bytes) else reply.body:
                    time.sleep(reply.pause)
                    self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def chats(self) -> list[dict]:
        """Bodies of the chat-completions requests received so far."""
        with self._lock:
            return [body for route, body, _ in self.requests if route == "chat/completions"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _CountingReader:
    """A request stream that adds what is read from it to ``server.bytes_received``."""

    def __init__(self, stream, server: ChatServer):
        self.stream, self.server = stream, server

    def _counted(self, data: bytes) -> bytes:
        with self.server._lock:
            self.server.bytes_received += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        return self._counted(self.stream.read(size))

    def readline(self, size: int = -1) -> bytes:
        return self._counted(self.stream.readline(size))

    def __getattr__(self, name):
        return getattr(self.stream, name)


def as_reply(reply) -> Reply:
    """The :class:`Reply` of a dict, ``(status, dict)`` or ``bytes`` reply."""
    if isinstance(reply, Reply):
        return reply
    status, payload = reply if isinstance(reply, tuple) else (200, reply)
    return Reply(status, payload if isinstance(payload, bytes) else json.dumps(payload).encode())


def redirect(url: str, status: int = 302) -> Reply:
    """A redirect to ``url``."""
    return Reply(status, headers={"Location": url})


def trickle(reply, pause: float) -> Reply:
    """``reply`` with its body sent one byte every ``pause`` seconds (Content-Length announced)."""
    whole = as_reply(reply)
    return Reply(whole.status, [whole.body[k:k + 1] for k in range(len(whole.body))], whole.headers, pause,
                 len(whole.body))


def endless(pause: float, chunk: bytes = b" " * 64) -> Reply:
    """A 200 reply whose body (JSON whitespace, no length) never ends: ``chunk`` every ``pause`` seconds."""
    return Reply(body=itertools.repeat(chunk), pause=pause)


def flood(size: int, *, declared: bool = True, piece: int = 1 << 16) -> Reply:
    """A valid direct-mode reply ("7" at p = 1) padded with logprob entries to about ``size`` bytes,
    streamed ``piece`` bytes at a time (never held whole); ``declared``: announce its length, else the
    body ends when the connection closes."""
    head, tail = json.dumps(completion([text_choice("7", logprobs=[])])).split('"content": []')
    head, tail = (head + '"content": [').encode(), (']' + tail).encode()
    entry = json.dumps({"token": "7", "logprob": 0.0, "top_logprobs": [{"token": "7", "logprob": 0.0}]}).encode()
    count = max(1, (size - len(head) - len(tail)) // (len(entry) + 1))
    per_piece = max(1, piece // (len(entry) + 1))

    def pieces():
        yield head
        for start in range(0, count, per_piece):
            k = min(per_piece, count - start)
            yield b",".join([entry] * k) + (b"," if start + k < count else b"")
        yield tail

    length = len(head) + len(tail) + count * (len(entry) + 1) - 1
    return Reply(body=pieces(), length=length if declared else None)


def retry_later(retry_after: str, status: int = 429) -> Reply:
    """A rate-limit answer with the header ``Retry-After: retry_after``."""
    return Reply(status, json.dumps(error(status, "rate limited")[1]).encode(), {"Retry-After": retry_after})


def rate_limited(seconds: float, reply):
    """A responder answering :func:`retry_later` (``Retry-After: seconds``) until ``seconds`` after its
    first request, then ``reply``; ``asked`` lists the times of the requests."""
    asked = []

    def respond(route, body, headers):
        asked.append(time.monotonic())
        return retry_later(f"{seconds:g}") if asked[-1] - asked[0] < seconds else reply

    respond.asked = asked
    return respond


def failing_every(k: int, reply):
    """A responder answering HTTP 500 to every ``k``-th request, ``reply`` to the others."""
    count = itertools.count(1)
    return lambda *request: error(500, "engine hiccup") if next(count) % k == 0 else reply


def decode_data_url(url: str) -> Image.Image:
    header, _, data = url.partition(",")
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def split_images(messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """Chat-template messages (``{"type": "image"}`` parts) and the images of the data URLs, in order."""
    images, out = [], []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    images.append(decode_data_url(part["image_url"]["url"]))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        out.append({**message, "content": content})
    return out, images


def digit_logprobs(probs: dict[str, float]) -> list[dict]:
    """A ``logprobs.content`` list of one position whose alternatives are ``probs`` (token: p)."""
    top = [{"token": t, "logprob": math.log(p)} for t, p in probs.items()]
    return [{**top[0], "top_logprobs": top}]


def digit_reply(probs: dict[str, float]) -> dict:
    """A direct-mode reply whose score position has the alternatives ``probs``."""
    return completion([text_choice(next(iter(probs)), logprobs=digit_logprobs(probs))])


def completion(choices: list[dict], model: str = "tiny") -> dict:
    return {"id": "cmpl-test", "object": "chat.completion", "model": model, "choices": choices}


def text_choice(text: str, index: int = 0, logprobs: list[dict] | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
            "logprobs": None if logprobs is None else {"content": logprobs}}


def error(status: int, message: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "BadRequestError", "code": status}}


class TinyVLMResponder:
    """Chat completions from a transformers VLM and its processor (module docstring)."""

    def __init__(self, model, processor, *, name: str = "tiny-qwen-vl", max_logprobs: int = 20):
        self.model, self.processor, self.name, self.max_logprobs = model, processor, name, max_logprobs
        self._lock = threading.Lock()  # one generate at a time, as one engine would batch them

    def __call__(self, route: str, body: dict | None, headers: dict):
        if route == "models":
            return {"object": "list", "data": [{"id": self.name, "object": "model"}]}
        if body.get("model") != self.name:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        if body.get("logprobs") and body.get("top_logprobs", 0) > self.max_logprobs:
            return error(400, f"Requested top logprobs of {body['top_logprobs']} exceeds the maximum allowed "
                              f"value of {self.max_logprobs} (--max-logprobs)")
        with self._lock:
            return completion(self.generate(body), self.name)

    def prompt(self, body: dict):
        messages, images = split_images(body["messages"])
        prefill = ""
        if body.get("continue_final_message"):
            prefill = messages.pop()["content"]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill
        return self.processor(text=[text], images=images or None, return_tensors="pt")

    def generate(self, body: dict) -> list[dict]:
        import torch  # only the tiny-VLM answers need it

        inputs = self.prompt(body)
        tokenizer, n = self.processor.tokenizer, body.get("n", 1)
        sampled = body.get("temperature", 1.0) > 0
        torch.manual_seed(body.get("seed", 0))
        out = self.model.generate(
            **inputs, max_new_tokens=body.get("max_tokens", 16), do_sample=sampled, num_return_sequences=n,
            temperature=body["temperature"] if sampled else None, top_k=0 if sampled else None,
            top_p=1.0 if sampled else None, output_logits=True, return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id)
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        logprobs = torch.stack(out.logits, 1).float().log_softmax(-1)  # [n, steps, vocab]
        choices = []
        for row in range(n):
            tokens = [t for t in new[row].tolist() if t != tokenizer.pad_token_id]
            entries = None
            if body.get("logprobs"):
                entries = [self.entry(tokenizer, token, logprobs[row, step], body.get("top_logprobs", 0))
                           for step, token in enumerate(tokens)]
            choices.append(text_choice(tokenizer.decode(tokens, skip_special_tokens=True), row, entries))
        return choices

    @staticmethod
    def entry(tokenizer, token: int, logprobs: torch.Tensor, k: int) -> dict:
        top = logprobs.topk(k) if k else None
        return {"token": tokenizer.decode([token]), "logprob": float(logprobs[token]),
                "top_logprobs": [] if top is None else [
                    {"token": tokenizer.decode([i]), "logprob": float(v)}
                    for v, i in zip(top.values.tolist(), top.indices.tolist())]}
