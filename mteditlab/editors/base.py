"""The editor protocol: what the app and the benchmark need from any backend, and the registry.

``edit(image, instruction, *, intent, seed, steps) -> PIL.Image`` and ``edit_batch``. A backend is
one module in this package holding a class registered with ``@register_editor("NAME")``; the
trainable flow-matching backends implement :class:`~mteditlab.editors.flow_policy.FlowPolicy`
on top of it. Knowledge about a backend that callers need (where its weights live, its shipped
adapter) sits on its class, so no caller branches on a backend's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from PIL import Image

from mteditlab.registry import Registry


class EditorError(RuntimeError):
    """A backend could not run (missing weights, bad input, ...); the message says what to do."""


EDITORS = Registry("editor", "mteditlab.editors", missing=EditorError)
register_editor = EDITORS.register


class Editor:
    """An image editor: ``edit_batch`` turns images + instructions into edited images.

    ``name`` is set by ``register_editor``; ``default_steps`` is the sampling budget when a caller
    gives none. ``local_weights``: ``path`` in :meth:`create` names a checkpoint directory (relative
    to the working directory), not a model id. ``world``: it edits the world's scenes (its outputs
    are renders the world's verifier reads), so the app offers world scenes and verdicts with it.
    """

    name: str = "editor"
    default_steps: int = 10
    local_weights: ClassVar[bool] = False
    world: ClassVar[bool] = False

    @classmethod
    def create(cls, path: str | Path | None = None, device: str | None = None) -> "Editor":
        """The registry's constructor: base weights from ``path`` (None: the backend's default) on
        ``device``. Editors without weights ignore both."""
        return cls()

    @classmethod
    def available(cls, path: str | Path | None = None) -> bool:
        """Whether :meth:`create` finds its weights locally (always, for editors without weights)."""
        return True

    def edit(self, image: Image.Image, instruction: str, *, intent: str | None = None, seed: int = 0,
             steps: int | None = None) -> Image.Image:
        """Edit one image. ``intent`` (an explicit, reconstructed instruction) replaces the raw
        instruction as the condition when given."""
        return self.edit_batch([image], [instruction], intents=[intent], seeds=[seed], steps=steps)[0]

    def edit_batch(self, images: Sequence[Image.Image], instructions: Sequence[str], *,
                   intents: Sequence[str | None] | None = None, seeds: Sequence[int] | None = None,
                   steps: int | None = None,
                   callback: Callable[[int, int], Any] | None = None) -> list[Image.Image]:
        """Edit a batch; item i is a function of its own input, text and seed only. ``callback(done,
        total)``, when given, reports progress (it never changes the result)."""
        raise NotImplementedError
