"""``concat``: the history as the intent, every instruction so far joined with "; " (oldest first)."""

from __future__ import annotations

from .base import IntentQuery, Reconstruction, Reconstructor, register_reconstructor


@register_reconstructor("concat")
class ConcatHistory(Reconstructor):
    """``"; ".join(query.instructions)``."""

    def reconstruct(self, queries: list[IntentQuery]) -> list[Reconstruction]:
        return [Reconstruction("; ".join(q.instructions)) for q in queries]
