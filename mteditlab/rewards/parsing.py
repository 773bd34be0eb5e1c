"""Strict parsing of a judge's answer line, and the two ways a judge's answer becomes a number.

A reply that does not state exactly one valid answer is a :class:`ScoreParseError` with a short
reason — never a default number (VIEScore's silent random fallback is what this avoids).

* :func:`parse_score`: the final ``Score: N`` line;
* :func:`digit_expectation`: direct mode's expected value over the digit tokens' probabilities;
* :func:`average_votes`: thinking mode's mean over the votes that parse, failures counted.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence

_VALUE = re.compile(r"(?P<num>[+-]?[0-9]+(?:\.[0-9]+)?)(?:\s*(?:/|out of)\s*(?P<den>[0-9]+))?[\s.!]*",
                    re.IGNORECASE)
_MARKUP = "*_`'\" \t"
_STATEMENT = re.compile(r"\bScore\s*[:=]\s*(?P<value>[^\n]*)", re.IGNORECASE)


class ScoreParseError(ValueError):
    """The reply holds no single valid score; ``str(err)`` is the reason."""


def answer_statement(reply: str | None) -> str:
    """The value written after the reply's one ``Score: …`` statement (markup stripped).

    Anything before the last ``</think>`` (a reasoning block) is ignored; case is ignored.
    ``ScoreParseError``: empty reply, no statement, two or more statements.
    """
    text = (reply or "").rsplit("</think>", 1)[-1]
    if not text.strip():
        raise ScoreParseError("empty reply")
    statements = [m.group("value").strip(_MARKUP) for m in _STATEMENT.finditer(text)]
    if not statements:
        raise ScoreParseError("no 'Score: N' statement")
    if len(statements) > 1:
        raise ScoreParseError(f"{len(statements)} score statements (ambiguous)")
    return statements[0]


def parse_score(reply: str | None, scale: int) -> float:
    """Return ``N / scale`` for a reply whose answer is one ``Score: N`` statement.

    Accepted: ``N`` a decimal number in ``[0, scale]`` (``7``, ``7.5``), optionally written
    ``N/scale`` or ``N out of scale``, markdown emphasis and trailing ``.``/``!`` ignored, case
    ignored; anything before the last ``</think>`` (a reasoning block) is ignored.
    Rejected (``ScoreParseError``): empty reply, no statement, two or more statements, a word or
    extra text instead of a number ("ten", "7 or 8"), a negative or too large number, a denominator
    other than ``scale``.
    """
    statement = answer_statement(reply)
    match = _VALUE.fullmatch(statement)
    if match is None:
        raise ScoreParseError(f"malformed score {statement[:40]!r}")
    value = float(match.group("num"))
    if match.group("den") is not None and int(match.group("den")) != scale:
        raise ScoreParseError(f"score out of {match.group('den')}, expected out of {scale}")
    if not 0 <= value <= scale:
        raise ScoreParseError(f"score {match.group('num')} outside [0, {scale}]")
    return value / scale


def digit_expectation(probs: Sequence[float], min_mass: float) -> tuple[float, str | None, float]:
    """Direct-mode score from ``probs[k]`` = probability of the digit token ``k``, ``k = 0..scale``:
    ``m = Σ_k p_k``, ``score = Σ_k k · p_k / m / scale`` (Edit-R1's expected value in [0, 1]).

    Returns ``(score, None, m)``, or ``(nan, reason, m)`` when a probability is not finite or
    ``m < min_mass`` (the judge was not answering with a score)."""
    scale = len(probs) - 1
    mass = float(sum(probs))
    if not all(map(math.isfinite, [mass, *probs])):
        return float("nan"), "non-finite probabilities", mass
    if not mass > 0 or mass < min_mass:
        return float("nan"), f"score tokens hold {mass:.3f} < {min_mass} of the probability", mass
    value = sum(k * p for k, p in enumerate(probs)) / mass / scale
    return min(max(value, 0.0), 1.0), None, mass


def average_votes(replies: Sequence[str | None], parse: Callable[[str | None], float]) -> tuple[float, str | None, int]:
    """Thinking-mode score of one chat: the mean of ``parse(reply)`` over the replies that parse.

    Returns ``(mean, None, failed)``, or ``(nan, reason, failed)`` when no reply parses; the
    reason lists each distinct parse error once with its count (prefixed ``all n votes failed``
    when there were several votes)."""
    votes, reasons = [], []
    for reply in replies:
        try:
            votes.append(parse(reply))
        except ScoreParseError as err:
            reasons.append(str(err))
    if votes:
        return sum(votes) / len(votes), None, len(reasons)
    counts = "; ".join(f"{reason} ×{k}" if k > 1 else reason for reason, k in Counter(reasons).items())
    error = counts if len(replies) == 1 else f"all {len(replies)} votes failed: {counts}"
    return float("nan"), error, len(reasons)
