"""Editor backends behind one protocol (``base.Editor``) and the registry that builds them by name."""

from __future__ import annotations

from pathlib import Path

from .base import Editor, EditorError

EDITORS = ("mini", "kontext", "qwen-edit", "oracle", "identity")


def get_editor(name: str, *, lora: str | Path | None = None, path: str | Path | None = None,
               device: str | None = None, fuse: bool = True) -> Editor:
    """Build editor ``name``; ``lora`` loads an RL-tuned adapter on top (merged into the weights when
    ``fuse``, so it costs nothing at inference); ``path`` overrides the base weights (a mini checkpoint
    directory, or a model id / local directory for the real backends)."""
    if name == "mini":
        from .mini import MiniEditor
        editor = MiniEditor.from_pretrained(path, device=device or "cpu")
    elif name == "kontext":
        from .kontext import KontextEditor
        editor = KontextEditor.from_pretrained(path, device=device)
    elif name == "qwen-edit":
        from .qwen_edit import QwenEditEditor
        editor = QwenEditEditor.from_pretrained(path, device=device)
    elif name == "oracle":
        from .reference import OracleEditor
        editor = OracleEditor()
    elif name == "identity":
        from .reference import IdentityEditor
        editor = IdentityEditor()
    else:
        raise EditorError(f"Unknown editor {name!r}; choose one of {', '.join(EDITORS)}.")
    if lora:
        if editor.denoiser is None:
            raise EditorError(f"The {name} editor has no weights to put a LoRA adapter on.")
        editor.load_lora(lora)
        if fuse:
            editor.fuse_lora()
    return editor


__all__ = ["EDITORS", "Editor", "EditorError", "get_editor"]
