"""Assignment queue: which comparison an annotator judges next.

Contract (enforced by :meth:`labeling.store.LabelStore.next_assignment`, which runs these
functions on the store's single writer thread, so two annotators never race for a slot):

* **No repeats.** An annotator is never assigned the same comparison twice
  (``UNIQUE (annotator_id, comparison_id)`` in the ``assignments`` table).
* **k-way overlap.** An ordinary comparison is handed out until ``overlap`` annotators hold it.
  A holder counts while they have judged it or their assignment is younger than ``ttl_s``;
  abandoned assignments expire and free the slot for someone else.  Among open comparisons the
  one closest to complete overlap is served first (then the oldest), so items reach ``k``
  judgments — and become usable for agreement — as early as possible.
* **Gold mixed in.** With probability ``gold_rate`` the next item is a gold comparison (known
  answer, e.g. a no-op edit against a correct one) the annotator has not seen; gold items look
  exactly like ordinary ones to the annotator and are never counted against the overlap.
* **Randomised display order.** Which session is shown on the left is drawn at random and
  recorded with the assignment; :meth:`LabelStore.record_judgment` rejects a vote whose
  ``left`` disagrees with the annotator's assignment.
* **Which model pair next.**  Open comparisons are grouped by the (unordered) pair of models
  they compare.  ``selection="active"`` (default) draws the pair by Chatbot Arena's rule, the
  expected drop in the uncertainty of that pair's rating difference from one more battle,
  computed from a Bradley–Terry fit of every judgment so far (see :mod:`labeling.active`);
  ``selection="uniform"`` draws every pair with open work equally often.  Within the pair, the
  comparison closest to complete overlap is served first (then the oldest).  With one model
  pair both rules serve the same order.
* **Labeling items only.** Only comparisons of kind ``'item'`` and ``'gold'`` are served;
  arena battles (kind ``'arena'``) are votes people cast in the arena, not work for
  annotators, so they get no assignment rows.
* **Resume.** An annotator who asks again before judging their open assignment gets the same
  one back (a page refresh does not burn items).
* **One submission per assignment.** An assignment is *open* from when it is handed out until
  the annotator's judgments of it are recorded or they give it back (skip, flag);
  :meth:`LabelStore.record_submission` takes a comparison's judgments all together, in one
  transaction, and only while it is the annotator's open assignment (:func:`closed_because`),
  so a stale or repeated submission stores nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random

from labeling.schema import SCORES


@dataclasses.dataclass(frozen=True)
class AssignmentPolicy:
    """Queue settings: ``overlap`` annotators per comparison, gold fraction, expiry, RNG seed."""

    overlap: int = 3
    gold_rate: float = 0.1
    ttl_s: float = 3600.0
    seed: int = 0
    selection: str = "active"

    def __post_init__(self) -> None:
        from labeling.active import SELECTIONS

        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {self.overlap}")
        if not 0.0 <= self.gold_rate <= 1.0:
            raise ValueError(f"gold_rate must be in [0, 1], got {self.gold_rate}")
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One comparison handed to one annotator; ``left`` is the session ('A' or 'B') shown left."""

    assignment_id: int
    annotator: str
    comparison_id: int
    left: str
    assigned_at: dt.datetime


_JUDGED = (
    "EXISTS (SELECT 1 FROM judgments j "
    "WHERE j.annotator_id = a.annotator_id AND j.comparison_id = a.comparison_id)"
)
_UNSEEN = (  # on comparisons ``c``, parameter: the annotator id
    "c.comparison_id NOT IN (SELECT comparison_id FROM assignments WHERE annotator_id = ?)"
)
# The open labeling items (kind 'item', fewer than ``overlap`` holders, unseen by the
# annotator) as comparisons ``c``; parameters: expiry time, overlap, annotator id.
_OPEN_ITEMS = f"""WITH holders AS (
        SELECT a.comparison_id, count(*) AS n FROM assignments a
        WHERE a.assigned_at > ? OR {_JUDGED}
        GROUP BY a.comparison_id)
    {{select}}
    FROM comparisons c
    {{join}}
    LEFT JOIN holders h USING (comparison_id)
    WHERE c.kind = 'item' AND coalesce(h.n, 0) < ? AND {_UNSEEN}"""


def open_assignment(cur, annotator_id: int, expired_before: dt.datetime):
    """The annotator's oldest unjudged, unexpired assignment as a row, or None."""
    rows = cur.execute(
        f"""SELECT assignment_id, comparison_id, left_side, assigned_at FROM assignments a
            WHERE a.annotator_id = ? AND a.assigned_at > ? AND NOT {_JUDGED}
            ORDER BY a.assigned_at, a.assignment_id LIMIT 1""",
        [annotator_id, expired_before],
    ).fetchall()
    return rows[0] if rows else None


def closed_because(cur, annotator_id: int, comparison_id: int) -> str | None:
    """Why the annotator's assignment of ``comparison_id`` is not open — 'never assigned',
    'already judged' or 'given back' — or None while it is open."""
    assigned, judged, given_back = cur.execute(
        """SELECT EXISTS (SELECT 1 FROM assignments WHERE annotator_id = $a AND comparison_id = $c),
                  EXISTS (SELECT 1 FROM judgments WHERE annotator_id = $a AND comparison_id = $c),
                  EXISTS (SELECT 1 FROM skips WHERE annotator_id = $a AND comparison_id = $c)""",
        {"a": annotator_id, "c": comparison_id}).fetchall()[0]
    if not assigned:
        return "never assigned"
    if judged:
        return "already judged"
    return "given back" if given_back else None


def pick_comparison(
    cur,
    annotator_id: int,
    policy: AssignmentPolicy,
    rng: random.Random,
    expired_before: dt.datetime,
    pair_rng: random.Random | None = None,
) -> int | None:
    """Choose the next comparison id for ``annotator_id`` under ``policy`` (None: nothing left).

    Only labeling items are candidates (kinds 'item' and 'gold'; never arena battles).
    Gold is drawn with probability ``policy.gold_rate`` when an unseen gold item exists;
    otherwise a model pair is drawn by ``policy.selection`` among the pairs with open ordinary
    comparisons (with ``pair_rng``, default ``rng``), and that pair's open comparison nearest
    to full overlap is served.  When no ordinary work is left the queue is empty: gold alone is
    never served.
    """
    ordinary = cur.execute(
        _OPEN_ITEMS.format(
            select="SELECT c.comparison_id, least(sa.model, sb.model) AS m1, "
                   "greatest(sa.model, sb.model) AS m2",
            join="JOIN sessions sa ON sa.session_id = c.session_a "
                 "JOIN sessions sb ON sb.session_id = c.session_b")
        + " ORDER BY coalesce(h.n, 0) DESC, c.comparison_id",
        [expired_before, policy.overlap, annotator_id],
    ).fetchall()
    if not ordinary:
        return None
    if rng.random() < policy.gold_rate:
        gold = cur.execute(
            f"""SELECT c.comparison_id FROM comparisons c
                WHERE c.kind = 'gold' AND {_UNSEEN} ORDER BY c.comparison_id""",
            [annotator_id],
        ).fetchall()
        if gold:
            return rng.choice(gold)[0]
    first: dict[tuple[str, str], int] = {}
    for cid, m1, m2 in ordinary:      # rows come in serving order: keep each pair's first
        first.setdefault((m1, m2), cid)
    if len(first) == 1:
        return ordinary[0][0]
    pairs = list(first)
    from labeling.active import choose_pair, pair_weights

    weights = None
    if policy.selection == "active":
        models = sorted({m for pair in pairs for m in pair})
        weights = pair_weights(battle_matrix(cur, models), [models.index(a) for a, _ in pairs],
                               [models.index(b) for _, b in pairs])
    chosen = choose_pair(weights if weights is not None else [1.0] * len(pairs),
                         pair_rng or rng, policy.selection)
    return first[pairs[chosen]]


def count_open(cur, annotator_id: int, policy: AssignmentPolicy,
               expired_before: dt.datetime) -> int:
    """How many ordinary labeling items the queue could still serve ``annotator_id``."""
    return cur.execute(_OPEN_ITEMS.format(select="SELECT count(*)", join=""),
                       [expired_before, policy.overlap, annotator_id]).fetchall()[0][0]


def battle_matrix(cur, models: list[str]):
    """Win matrix (M, M) over ``models`` of every judgment on an ordinary (non-gold)
    comparison between two of them: W[i, j] = wins of i over j + ½ ties (both-bad as a tie)."""
    import numpy as np

    rows = cur.execute(
        """SELECT sa.model, sb.model, j.choice, count(*) FROM judgments j
           JOIN comparisons c USING (comparison_id)
           JOIN sessions sa ON sa.session_id = c.session_a
           JOIN sessions sb ON sb.session_id = c.session_b
           WHERE c.kind <> 'gold' GROUP BY ALL""").fetchall()
    index = {m: k for k, m in enumerate(models)}
    w = np.zeros((len(models), len(models)))
    for a, b, choice, n in rows:
        if a not in index or b not in index or a == b:
            continue
        w[index[a], index[b]] += SCORES[choice] * n
        w[index[b], index[a]] += (1.0 - SCORES[choice]) * n
    return w


def release(cur, annotator_id: int, comparison_id: int, when: dt.datetime) -> None:
    """Expire the annotator's assignment of ``comparison_id`` as of ``when``: it stops counting
    against the overlap, and (its row staying) is never served to this annotator again."""
    cur.execute("UPDATE assignments SET assigned_at = ? WHERE annotator_id = ? "
                "AND comparison_id = ?", [when, annotator_id, comparison_id])
