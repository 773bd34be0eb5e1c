"""``oracle``: the session's gold intent (privileged: a ceiling, never a deployable reconstructor)."""

from __future__ import annotations

from .base import IntentQuery, Reconstruction, Reconstructor, ReconstructorError, register_reconstructor


@register_reconstructor("oracle")
class OracleReconstructor(Reconstructor):
    """``query.session.turns[query.turn].intent``: the world's resolved intent, or a data session's
    ``intents`` column (None where the data has none). A query without a session is an error."""

    privileged = True

    def reconstruct(self, queries: list[IntentQuery]) -> list[Reconstruction]:
        if any(q.session is None for q in queries):
            raise ReconstructorError("the oracle reads the session's gold intents, and a query has no session: "
                                     "use a reconstructor that reads the history (rule, mini, served:URL)")
        return [Reconstruction(q.session.turns[q.turn].intent) for q in queries]
