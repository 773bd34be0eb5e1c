"""A local OpenAI-compatible chat-completions server for tests (stdlib ``http.server`` in a thread).

``ChatServer(respond)`` serves ``respond(route, body, headers) -> reply`` on 127.0.0.1, where a reply is
a dict (200 JSON), ``(status, dict)``, raw ``bytes`` (200, unparsed), :data:`DROP` (close the
connection without answering) or ``("sleep", seconds, reply)``. ``TinyVLMResponder`` answers with a
real transformers Qwen-VL (the tiny random-weight ones of ``tests/tiny_qwen_vl.py``): it decodes the
data-URL images, applies the chat template (``continue_final_message`` as vLLM does), generates and
returns ``logprobs`` / ``top_logprobs`` from the raw logits, refusing more than ``max_logprobs``
alternatives as vLLM's ``--max-logprobs`` does.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

DROP = object()


class ChatServer:
    """Serves ``respond`` until :meth:`close`; ``url`` is the ``…/v1`` base; ``requests`` logs
    ``(route, body, headers)`` of every request received."""

    def __init__(self, respond):
        self.respond, self.requests, self._lock = respond, [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

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
                status, payload = reply if isinstance(reply, tuple) else (200, reply)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
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

    @torch.no_grad()
    def generate(self, body: dict) -> list[dict]:
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
