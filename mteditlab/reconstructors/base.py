"""The intent step of Edit-R2: before each turn a *reconstructor* turns the session so far and the new
instruction into the explicit operative intent the editor is given.

    reconstructor = build_reconstructor("mini")               # or "oracle", "rule", "served:URL", "mini:DIR"
    results = reconstructor.reconstruct([IntentQuery(...), ...])
    results[i].intent                                         # None = the editor gets the instruction alone

A reconstructor is one class per module of this package, registered with
``@register_reconstructor("NAME")``. ``build_reconstructor(SPEC)`` reads ``NAME`` or ``NAME:ARG``
(a checkpoint directory, an endpoint URL) and passes ``ARG`` as the constructor's one argument.
Callers do not build queries by hand: :class:`mteditlab.intent.TurnIntents` keeps each rollout item's
history and asks the reconstructor turn by turn.
A reconstructor never raises on a bad answer: the result carries ``failure`` (the reason) and
``intent=None``, so the editor falls back to the raw instruction and the caller counts it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mteditlab.registry import Registry


class ReconstructorError(ValueError):
    """An unknown reconstructor name, or one that cannot be built (what to do next is in the message)."""


RECONSTRUCTORS = Registry("reconstructor", "mteditlab.reconstructors", ReconstructorError)
register_reconstructor = RECONSTRUCTORS.register


@dataclass
class IntentQuery:
    """What a reconstructor sees before turn ``len(instructions)`` of one session.

    ``instructions``: every instruction so far, oldest first; the last is the new one.
    ``intents``: the intents reconstructed for the earlier turns (``len(instructions) - 1`` of them;
    ``None`` where that turn had none). ``image``: the image this turn edits (the editor's own previous
    output, or the source at turn 1). ``source``: the session's first image. ``session``: the session
    object (the world's, or a data session with its optional ``intents``) when there is one; only
    privileged reconstructors (``oracle``) may read it.
    """

    instructions: list[str]
    intents: list[str | None]
    image: Image.Image
    source: Image.Image
    session: Any = None

    @property
    def turn(self) -> int:
        """0-based index of the turn being reconstructed."""
        return len(self.instructions) - 1


@dataclass
class Reconstruction:
    """One reconstructed intent. ``intent=None`` means "give the editor the instruction alone" — what
    ``none`` always returns and what every failure falls back to, with its reason in ``failure``."""

    intent: str | None
    failure: str | None = None
    details: dict = field(default_factory=dict)


class Reconstructor:
    """Base class. ``reconstruct`` takes a batch of queries and returns one :class:`Reconstruction`
    each, in order. ``privileged`` marks reconstructors that read the world's gold (ceilings only);
    ``spec`` is what :func:`build_reconstructor` built it from (``mini:DIR``), for reports."""

    name: str = ""
    privileged: bool = False
    spec: str = ""

    def reconstruct(self, queries: list[IntentQuery]) -> list[Reconstruction]:
        raise NotImplementedError


def reconstructor_class(spec: str) -> type[Reconstructor]:
    """The registered class ``NAME`` or ``NAME:ARG`` names, checked (without building it) to take ``ARG``
    when given and to need no argument when not; :class:`ReconstructorError` otherwise."""
    name, _, arg = spec.partition(":")
    cls = RECONSTRUCTORS[name]
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if arg and not params:
        raise ReconstructorError(f"reconstructor {name!r} takes no argument: write {name!r}, not {spec!r}")
    if not arg and params and params[0].default is params[0].empty:
        raise ReconstructorError(f"reconstructor {name!r} needs its {params[0].name}: write {name}:"
                                 f"{params[0].name.upper()}")
    return cls


def build_reconstructor(spec: str) -> Reconstructor:
    """``NAME`` or ``NAME:ARG`` → the registered reconstructor, built with ``ARG`` when given
    (:func:`reconstructor_class` checks the spec first)."""
    cls, arg = reconstructor_class(spec), spec.partition(":")[2]
    built = cls(arg) if arg else cls()
    built.spec = spec
    return built
