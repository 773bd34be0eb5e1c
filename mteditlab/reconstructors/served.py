"""``served:URL``: a vision-language model (Qwen-VL under vLLM or SGLang) behind an OpenAI-compatible
chat-completions endpoint reconstructs each intent.

One chat per query, greedy (``temperature`` 0, ``n`` 1): a system prompt (:data:`SYSTEM`), then one user
message interleaving images and text — the session's first image, the earlier instructions each with the
intent reconstructed for it, the image the new instruction applies to (turn 1: the first image is that
image), the new instruction and the answer's form (:data:`FORMAT`: one line, the explicit instruction
naming each object by colour, shape and position, as the world's intents do). The reply's first line is
the intent once a ``<think>`` block, a leading label ("Intent:", "**Answer:**", "- ") and quotes are
stripped (:func:`parse_intent`).

Transport: :mod:`mteditlab.chat_client` (bounded pool, per-attempt deadline, retries with backoff, body
cap). Options ride on the URL's query (:data:`URL_OPTIONS`: ``model``, ``timeout``, ``retries``,
``concurrency``, ``max_tokens``, ...): ``served:http://HOST:PORT/v1?model=qwen&timeout=30``. The API key
comes from ``$MTEDITLAB_INTENT_API_KEY`` (else ``$OPENAI_API_KEY``); the model from ``model=``, else
``$MTEDITLAB_INTENT_ID``, else the first the endpoint lists. A request that fails for good, a reply
without text or an empty or overlong answer gives ``intent=None`` with the reason; nothing raises.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable

from PIL import Image

from mteditlab.chat_client import (ChatClient, EndpointError, openai_messages, reply_content, run_concurrently,
                                   url_options)

from .base import IntentQuery, Reconstruction, Reconstructor, ReconstructorError, register_reconstructor

API_KEY_ENVS = ("MTEDITLAB_INTENT_API_KEY", "OPENAI_API_KEY")
MODEL_ENV = "MTEDITLAB_INTENT_ID"
MAX_CHARS = 300   # a longer answer is no one-line instruction
SYSTEM = ("You help an image editor follow a multi-turn editing session. A user's new instruction may refer "
          "back to earlier turns (\"make it bigger\", \"the one you just added\", \"change it back\"). Rewrite "
          "it as one explicit, self-contained instruction that means the same edit.")
FORMAT = ("Answer with one line and nothing else: the new instruction made explicit, naming each object it "
          "acts on by its colour, shape and position, as in \"make the red circle at the top left bigger\", "
          "\"move the blue square at the center to the bottom right\" or \"change the background to gray\".")
URL_OPTIONS: dict[str, Callable[[str], object]] = {
    "model": str, "timeout": float, "retries": int, "backoff": float, "max_backoff": float, "max_body": int,
    "concurrency": int, "max_tokens": int,
}
_THINK = re.compile(r"<think>.*?</think>", re.S)
_LABEL = re.compile(r"^(?:[-*>•]\s*|\d+[.)]\s*)?(?:\*\*)?(?:explicit |reconstructed |rewritten )?"
                    r"(?:intent|instruction|answer)(?:\*\*)?\s*:\s*(?:\*\*)?\s*|^(?:[-*>•]\s+)", re.I)


def parse_intent(content: object) -> str:
    """The intent in a reply (module docstring); ``ValueError`` naming what is wrong with it."""
    if not isinstance(content, str):
        raise ValueError(f"reply is {'missing' if content is None else 'a JSON ' + type(content).__name__}, "
                         "not text")
    lines = [line.strip() for line in _THINK.sub("", content).splitlines() if line.strip()]
    intent = _LABEL.sub("", lines[0]).strip().strip("\"'`“”").strip().rstrip(".").strip() if lines else ""
    if not intent:
        raise ValueError("empty reply")
    if len(intent) > MAX_CHARS:
        raise ValueError(f"a {len(intent)}-character answer is no one-line instruction")
    return intent


def messages(query: IntentQuery) -> tuple[list[dict], list[Image.Image]]:
    """The chat of one query (``{"type": "image"}`` parts) and its images, in order."""
    image = [{"type": "image"}]
    if query.intents:
        earlier = "\n".join(f"{j + 1}. \"{text}\"" + (f" (meant: \"{intent}\")" if intent else "")
                            for j, (text, intent) in enumerate(zip(query.instructions, query.intents)))
        parts = [{"type": "text", "text": "The session's first image:"}, *image,
                 {"type": "text", "text": f"Earlier instructions, oldest first:\n{earlier}\n"
                                          "The image as it is now, which the new instruction edits:"}, *image]
        images = [query.source, query.image]
    else:
        parts, images = [{"type": "text", "text": "The image to edit:"}, *image], [query.image]
    parts.append({"type": "text", "text": f"New instruction: \"{query.instructions[-1]}\"\n\n{FORMAT}"})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}], images


@register_reconstructor("served")
class ServedReconstructor(Reconstructor):
    """The endpoint at ``url`` (options on its query, module docstring), asked ``concurrency`` chats at a
    time; ``client.stats`` counts requests, retries and failed requests."""

    def __init__(self, url: str):
        try:
            base, options = url_options(url, URL_OPTIONS, what="reconstructor")
            self.concurrency, self.max_tokens = options.pop("concurrency", 16), options.pop("max_tokens", 64)
            if self.concurrency < 1 or self.max_tokens < 1:
                raise ValueError("concurrency and max_tokens must be >= 1")
            self.client = ChatClient(base, model=options.pop("model", None) or os.environ.get(MODEL_ENV) or None,
                                     key_envs=API_KEY_ENVS, **options)
        except ValueError as err:
            raise ReconstructorError(f"served:{url}: {err} (write served:http://HOST:PORT/v1?model=NAME)") from None

    def reconstruct(self, queries: list[IntentQuery]) -> list[Reconstruction]:
        return run_concurrently([lambda q=q: self.ask(q) for q in queries], self.concurrency)

    def ask(self, query: IntentQuery) -> Reconstruction:
        """One query's chat; never raises (a failure is ``intent=None`` with its reason)."""
        try:
            chat, images = messages(query)
            reply = self.client.request("chat/completions", {
                "model": self.client.served_model(), "messages": openai_messages(chat, images),
                "max_tokens": self.max_tokens, "temperature": 0.0, "n": 1, "seed": 0})
            choices = reply.get("choices")
            if not choices or not isinstance(choices, list):
                raise EndpointError(f"reply without choices: {json.dumps(reply)[:120]}", False)
            return Reconstruction(parse_intent(reply_content(choices[0])))
        except (EndpointError, ValueError) as err:
            return Reconstruction(None, failure=str(err))
        except Exception as err:  # noqa: BLE001 - a malformed reply is a counted failure, never a crash
            return Reconstruction(None, failure=f"unusable reply: {type(err).__name__}: {err}")
