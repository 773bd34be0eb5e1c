"""``none``: no intent; the editor reads the instruction alone (referential ones stay ambiguous)."""

from __future__ import annotations

from .base import IntentQuery, Reconstruction, Reconstructor, register_reconstructor


@register_reconstructor("none")
class NoIntent(Reconstructor):
    """Always ``intent=None``."""

    def reconstruct(self, queries: list[IntentQuery]) -> list[Reconstruction]:
        return [Reconstruction(None) for _ in queries]
