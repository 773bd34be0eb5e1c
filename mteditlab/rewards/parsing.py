"""Strict parsing of a judge's final "Score: N" line.

A reply that does not state exactly one valid score is a :class:`ScoreParseError` with a short
reason — never a default number (VIEScore's silent random fallback is what this avoids).
"""

from __future__ import annotations

import re

_SCORE_STATEMENT = re.compile(r"\bscore\s*[:=]\s*(?P<value>[^\n]*)", re.IGNORECASE)
_VALUE = re.compile(r"(?P<num>[+-]?[0-9]+(?:\.[0-9]+)?)(?:\s*(?:/|out of)\s*(?P<den>[0-9]+))?[\s.!]*",
                    re.IGNORECASE)
_MARKUP = "*_`'\" \t"


class ScoreParseError(ValueError):
    """The reply holds no single valid score; ``str(err)`` is the reason."""


def parse_score(reply: str, scale: int) -> float:
    """Return ``N / scale`` for a reply whose answer is one ``Score: N`` statement.

    Accepted: ``N`` a decimal number in ``[0, scale]`` (``7``, ``7.5``), optionally written
    ``N/scale`` or ``N out of scale``, markdown emphasis and trailing ``.``/``!`` ignored, case
    ignored; anything before the last ``</think>`` (a reasoning block) is ignored.
    Rejected (``ScoreParseError``): empty reply, no statement, two or more statements, a word or
    extra text instead of a number ("ten", "7 or 8"), a negative or too large number, a denominator
    other than ``scale``.
    """
    text = (reply or "").rsplit("</think>", 1)[-1]
    if not text.strip():
        raise ScoreParseError("empty reply")
    statements = [m.group("value").strip(_MARKUP) for m in _SCORE_STATEMENT.finditer(text)]
    if not statements:
        raise ScoreParseError("no 'Score: N' statement")
    if len(statements) > 1:
        raise ScoreParseError(f"{len(statements)} score statements (ambiguous)")
    match = _VALUE.fullmatch(statements[0])
    if match is None:
        raise ScoreParseError(f"malformed score {statements[0][:40]!r}")
    value = float(match.group("num"))
    if match.group("den") is not None and int(match.group("den")) != scale:
        raise ScoreParseError(f"score out of {match.group('den')}, expected out of {scale}")
    if not 0 <= value <= scale:
        raise ScoreParseError(f"score {match.group('num')} outside [0, {scale}]")
    return value / scale
