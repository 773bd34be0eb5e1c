"""Editor backends: one module each, its class registered by name with ``@register_editor``.

``EDITORS`` maps the registered names to their classes (reading it imports this package's modules,
which keep model libraries' imports inside their functions); ``get_editor`` builds one. Importing the
package loads no model library (the flow-policy face is :mod:`mteditlab.editors.flow_policy`), so
the reference editors and the world's simulations stay light.
"""

from __future__ import annotations

from pathlib import Path

from .base import EDITORS, Editor, EditorError, register_editor


def get_editor(name: str, *, lora: str | Path | None = None, path: str | Path | None = None,
               device: str | None = None, fuse: bool = True) -> Editor:
    """Build editor ``name``; ``lora`` loads an RL-tuned adapter on top (merged into the weights when
    ``fuse``, so it costs nothing at inference); ``path`` overrides the base weights (a checkpoint
    directory, or a model id / local directory for the hub backends)."""
    from .flow_policy import FlowPolicy

    editor = EDITORS[name].create(path, device=device)
    if lora:
        if not isinstance(editor, FlowPolicy):
            raise EditorError(f"The {name} editor has no weights to put a LoRA adapter on.")
        editor.load_lora(lora)
        if fuse:
            editor.fuse_lora()
    return editor


__all__ = ["EDITORS", "Editor", "EditorError", "get_editor", "register_editor"]
