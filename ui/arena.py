"""Arena logic: the operations on a person's :class:`~ui.arena_state.ArenaState` (no gradio here).

Multi-turn
    Each side edits **its own** previous output; both sides get the same instruction and the same
    seed, ``turn_seed(seed, 0, k)``.  Each side's editor gets the intent **its own** reconstructor
    gives (:mod:`ui.intents`; ``--intent-a/-b``) from that side's own history — its earlier
    outputs and the intents it reconstructed before — or the instruction as typed when the
    reconstructor gives none, fails (counted, said on screen) or is turned off.  The screen shows,
    per side and per turn, what that side's editor used.  The verifier judges both sides against
    one target, the world's rule reading (:mod:`ui.worldview`).

Anonymity (as in FastChat's arena)
    In an anonymous session the sides are shuffled and the model names stay hidden through
    every turn and vote, until the person ends the session (:meth:`Arena.end_session`), which
    reveals them and closes the session: later edits and votes are refused until a new session
    (or a reset) starts.  A session started with anonymity off shows the names from the start
    and its votes are stored ``blind=False``.  While the names are hidden nothing on screen ties
    a side to a model: a failing editor is not named either.

Replays
    Each session starts with a new random default seed.  A person who saw a session's names
    knows its sides' answers: a later turn that repeats one of those turns (the same inputs,
    instruction and seed, or the same pair of outputs) gives the sides away, so from that turn
    on the session's votes are stored ``blind=False``.  "This person" is the browser session:
    the arena voter (see :func:`ui.arena_ui.voter_name`).

Votes and the server-side re-check
    A vote names the turn it is for (the turn shown on screen).  It is accepted only if that is
    the session's latest turn, nobody voted on it yet, the pick and criterion are known values
    and the turn was produced in this session: anything else (forged, repeated or out-of-order
    calls through the API) is rejected and nothing is stored.

Storage (DuckDB, through :class:`labeling.store.LabelStore`)
    An accepted vote on turn k stores the images, each side's session up to turn k (a
    ``sessions`` row each, meta ``origin: arena`` with the arena id, branch, blindness, seeds,
    steps, what that side's editor was told per turn (``intents``, each turn's ``intent`` too),
    its ``intent_reconstructor`` and ``intent_failures``, and the verifier's ``targets``), a comparison of the two (kind ``'arena'``, A = the configured side A) and the
    judgment (turn k, the criterion, choice naming sessions, which side was on the left, ms
    from display to vote).
    The judgment records ``blind``.  The vote is acknowledged only after the judgment
    committed.  Ending a session with turns
    nobody voted on (reset, new source, fork or undo past them) stores the whole session as a
    comparison without judgments, so every arena session lands in the database.

Images
    A session's images (source and turns) live in the process's image bank, held by the
    session (:meth:`ui.images.ImageBank.hold`) for as long as it refers to them: one that leaves
    memory before it is stored waits on disk, and is deleted there once undo, fork, reset, a new
    source or the end of the browser session let go of it (and no other session refers to it).
"""

from __future__ import annotations

import logging
import random
import time
import uuid

from PIL import Image

from mteditlab.intent import turn_seed
from mteditlab.reconstructors import IntentQuery
from mteditlab.world import read_world_scene

from .arena_state import (CRITERIA, MAX_SEED, MAX_TURNS, ArenaError, ArenaState, TurnRecord,
                          check_instruction, whole_number)
from .engine import progress_fraction, run_pair
from .images import ImageInputError, load_upload, prepare_source
from .intents import SideIntent, told_markdown
from .screen import PICKS, choice_from_screen
from .text import md_literal
from .worldview import format_verdict, random_test_scene, reference_intent, test_scene, verdict

log = logging.getLogger("mteditlab.ui")
_ARENAS: dict[int, "Arena"] = {}


def finish_state(state) -> None:
    """``gr.State`` delete callback: store the ended session's unvoted tail.

    A module-level function on purpose: gradio deep-copies every component's constructor
    arguments (``delete_callback`` included) on each page and config request, and a bound
    method would drag the editors' weights into that copy (hundreds of MB per request)."""
    arena = _ARENAS.get(getattr(state, "arena_key", None))
    if arena is not None:
        arena.finish(state)


class Arena:
    """The arena operations on an :class:`ArenaState` (see the module docstring)."""

    def __init__(self, ctx):
        _ARENAS[id(self)] = self
        self.key = id(self)
        ctx.closers.append(lambda: _ARENAS.pop(self.key, None))
        self.ctx = ctx
        self.engine = ctx.engine
        self.store = ctx.store
        self.bank = ctx.bank
        self.intents = ctx.intents
        self.rng = random.Random()
        if self.engine.world:
            # the world reader builds its templates on first use (~0.3 s): do it now, not
            # inside the first requests (under load every one of them would build them)
            try:
                read_world_scene(Image.new("RGB", (self.engine.size, self.engine.size)))
            except Exception:  # noqa: BLE001 - a warm-up only
                log.debug("world reader warm-up failed", exc_info=True)

    # ------------------------------------------------------------------- starting a session
    def _begin(self, state: ArenaState, image: Image.Image, label: str, suggestions: list[str],
               anonymous: bool) -> None:
        """Swap in a new source (after everything that can fail has succeeded)."""
        prepared = prepare_source(image, self.engine.size)
        sha = self.bank.put(prepared, holder=id(state))
        scene = read_world_scene(prepared) if self.engine.world else None
        self._new_session(state, anonymous)
        state.source, state.source_label, state.scene = sha, label, scene
        state.suggestions = list(suggestions)
        self._hold_images(state)

    def _hold_images(self, state: ArenaState) -> None:
        """Tell the bank which images ``state`` refers to now, its source and its turns' outputs
        (see the module docstring); the holder is the state object, which gradio hands to every
        event of its browser session."""
        shas = {state.source} | {t.outputs[side] for t in state.turns for side in "AB"}
        self.bank.hold(id(state), shas - {None})

    def _new_session(self, state: ArenaState, anonymous: bool) -> None:
        """End the current session (its unvoted turns stored; its turns known to this person
        if they saw the names) and start an empty one: new id, sides shuffled, new seed."""
        self._finish_branch(state)
        if state.source is not None and state.names_visible():
            state.known |= state.prints
        state.arena_id, state.branch = uuid.uuid4().hex, 0
        state.turns, state.saved_prefix, state.votes = [], 0, 0
        state.left = self.rng.choice("AB") if anonymous else "A"
        state.anonymous, state.revealed = bool(anonymous), False
        state.seed = self.rng.randrange(MAX_SEED + 1)
        state.prints, state.recognised = set(), False

    def start_random(self, state: ArenaState) -> str:
        image, suggestions, label = random_test_scene(self.rng)
        self._begin(state, image, label, suggestions, state.anonymous_next)
        return f"New session on a random {label} (world test split). Type an instruction."

    def start_example(self, state: ArenaState, index) -> str:
        from .worldview import EXAMPLES

        i = whole_number(index, "Example", 1, len(EXAMPLES))
        image, suggestions, label = test_scene(EXAMPLES[i - 1])
        self._begin(state, image, f"example {i} ({label})", suggestions, state.anonymous_next)
        return f"New session on example {i}. Suggested instructions are in the list."

    def start_upload(self, state: ArenaState, upload) -> str:
        if upload is None:
            raise ArenaError("No file was uploaded.")
        path = upload if isinstance(upload, (str, bytes)) else getattr(upload, "name", upload)
        try:
            image = load_upload(path)
        except ImageInputError as exc:
            raise ArenaError(f"Upload refused: {exc} The current session is unchanged.") from None
        self._begin(state, image, "uploaded image", [], state.anonymous_next)
        world = state.scene is not None
        photos = any(self.intents.reads_photos(side) for side in "AB")
        note = ("It reads as a scene of the built-in world, so intents and verdicts are "
                "available." if world else
                "It is not a scene of the built-in world: the mini editor was trained only on "
                "those, and no verdict can be computed; intents come only from reconstructors "
                "that read photos." if self.engine.world and photos else
                "It is not a scene of the built-in world: the mini editor was trained only on "
                "those, and no intent or verdict can be computed." if self.engine.world else "")
        return f"New session on your upload ({image.width}×{image.height}, shown at " \
               f"{self.engine.size}×{self.engine.size}). {note}"

    # ------------------------------------------------------------------------------- edit
    def _require_open(self, state: ArenaState) -> None:
        if state.revealed:
            raise ArenaError("This session has ended and the names are shown: start a new "
                             "session (random scene, example, upload) or reset this one.")

    def progress_text(self, state: ArenaState, steps: dict) -> str:
        """Each screen side's denoising steps, e.g. ``Model A: step 3/10 · Model B: step 5/10``
        (screen names only: which model is on which side stays hidden)."""
        parts = []
        for screen, label in (("left", "Model A"), ("right", "Model B")):
            done, total = steps.get(state.side_on(screen), (0, None))
            parts.append(f"{label}: " + ("done" if total and done >= total else
                                         f"step {done}/{total}" if total else "starting"))
        return " · ".join(parts)

    def edit(self, state: ArenaState, instruction, seed, steps, progress=None) -> str:
        """One turn on both sides (``seed`` None or empty: the session's default seed).
        ``progress(fraction, text)``, when given, is called as the editors take their
        denoising steps (see :func:`~ui.engine.run_pair`)."""
        if state.source is None:
            raise ArenaError("Start a session first: a random scene, an example or an upload.")
        self._require_open(state)
        text = check_instruction(instruction)
        if state.n >= MAX_TURNS:
            raise ArenaError(f"This session has {MAX_TURNS} turns, the most one session keeps; "
                             "fork from an earlier turn or reset.")
        seed = state.seed if seed in (None, "") else whole_number(seed, "Seed", 0, MAX_SEED)
        steps = whole_number(steps, "Steps", 1, 100) if steps not in (None, "") else None
        k = state.n
        inputs = {side: self.bank.get(state.latest_of(side)) for side in "AB"}
        source = self.bank.get(state.source)
        told = self._reconstruct(state, text, source, inputs, progress)
        target = reference_intent(source, state.scene, [t.instruction for t in state.turns] + [text],
                                  [t.target for t in state.turns])

        def report(done):
            progress(progress_fraction(done), self.progress_text(state, done))
        timings = self.ctx.timings
        seed_k = turn_seed(seed, 0, k)
        with timings.timed("edit: both sides (run_pair)"):
            results = run_pair(self.engine, inputs, text, {s: told[s].intent for s in "AB"}, seed_k,
                               steps, progress=report if progress is not None else None)
        failed = {side: err for side, (_, _, err) in results.items() if err}
        if failed:
            raise ArenaError(f"The edit did not go through: {self._failure(state, failed)}. The "
                             "session is unchanged: try again, or another instruction.")
        with timings.timed("edit: PNG-encode outputs into the bank"):
            outputs = {side: self.bank.put(results[side][0], holder=id(state)) for side in "AB"}
        prints = {("edit", state.latest_of("A"), state.latest_of("B"), text, seed_k)}
        if outputs["A"] != outputs["B"]:   # equal outputs tell the sides apart by nothing
            prints.add(("outputs", outputs["A"], outputs["B"]))
        state.recognised = state.recognised or bool(prints & state.known)
        state.prints |= prints
        verdict_start = time.perf_counter()
        verdicts = {}
        targets = [t.target for t in state.turns] + [target]
        for side in "AB":
            try:
                verdicts[side] = verdict(state.scene, targets, k, inputs[side], results[side][0])
            except Exception:  # noqa: BLE001 - a verdict is an extra, never a failure
                verdicts[side] = None
        timings.add("edit: verifier verdicts", time.perf_counter() - verdict_start)
        state.turns.append(TurnRecord(text, told, target, seed, steps, outputs,
                                      {s: round(results[s][1], 4) for s in "AB"}, verdicts,
                                      time.time()))
        secs = max(results[s][1] for s in "AB")
        return f"Turn {k + 1} done in {secs:.1f} s. Vote on it below, or keep editing."

    def _reconstruct(self, state: ArenaState, text: str, source: Image.Image, inputs: dict,
                     progress=None) -> dict[str, SideIntent]:
        """Side -> what its editor gets this turn: its own reconstructor's answer from that side's
        own history (its earlier outputs, ``inputs[side]`` the latest, and the intents it
        reconstructed before), or the instruction as typed (see :mod:`ui.intents`)."""
        if not state.use_intent:
            return {side: SideIntent(None, skipped="off") for side in "AB"}
        instructions = [t.instruction for t in state.turns] + [text]
        queries = {side: IntentQuery(instructions, [t.told[side].intent for t in state.turns],
                                     inputs[side], source) for side in "AB"}

        def slow():
            progress(0.0, "Reconstructing the intent…")
        told = self.intents.reconstruct(queries, world=state.scene is not None,
                                        on_slow=slow if progress is not None else None)
        for side, answer in told.items():
            if answer.failed:
                log.warning("arena %s turn %d: side %s's intent reconstructor (%s) failed, its editor "
                            "gets the instruction as typed: %s", state.arena_id, state.n + 1, side,
                            self.intents.name(side), answer.failure)
        return told

    # ------------------------------------------------------------------------------- vote
    def vote(self, state: ArenaState, pick: str, turn_shown, criterion, voter: str) -> str:
        if pick not in PICKS:
            raise ArenaError(f"Unknown vote {pick!r}.")
        if criterion in (None, ""):
            criterion = "overall"
        if criterion not in CRITERIA:
            raise ArenaError(f"Unknown criterion {criterion!r}; one of {', '.join(CRITERIA)}.")
        if state.n == 0:
            raise ArenaError("Nothing to vote on yet: make an edit first.")
        self._require_open(state)
        turn = whole_number(turn_shown, "Turn", 1, MAX_TURNS)
        if turn != state.n:
            raise ArenaError(f"Vote refused: it is for turn {turn}, but the turn on screen is "
                             f"{state.n}. Votes are for the latest turn only.")
        record = state.turns[turn - 1]
        if record.vote is not None:
            raise ArenaError(f"Turn {turn} already has a vote; one vote per turn.")
        choice = choice_from_screen(pick, state.left)
        blind = state.blind()
        latency_ms = max(0.0, (time.time() - record.shown_at) * 1000.0)
        with self.ctx.timings.timed("vote: store images, sessions, judgment"):
            comparison = self._store_sessions(state, turn, {"blind": blind})
            self.ctx.ensure_annotator(voter)
            jid = self.store.record_judgment(comparison, voter, turn - 1, criterion, choice,
                                             state.left, latency_ms=latency_ms,
                                             simulated=False, blind=blind)
        record.vote = {"pick": pick, "choice": choice, "criterion": criterion,
                       "judgment_id": int(jid), "comparison_id": int(comparison),
                       "blind": blind}
        state.voter = voter
        state.votes += 1
        state.saved_prefix = max(state.saved_prefix, turn)
        text = {"left": "Model A is better", "right": "Model B is better", "tie": "a tie",
                "both_bad": "both are bad"}[pick]
        message = f"Vote stored for turn {turn}: {text} ({criterion})."
        if blind:
            message += " Keep editing, or end the session to see which model was which."
        elif state.anonymous:
            message += (" It counts as not blind: this session repeats an edit whose models you "
                        "have seen named. Start a new session, or edit differently, to vote "
                        "blind again.")
        return message

    def end_session(self, state: ArenaState) -> str:
        """End the session: store its unvoted turns, reveal the names, refuse further turns."""
        if state.source is None:
            raise ArenaError("No session to end: start one first.")
        if state.revealed:
            raise ArenaError("This session has already ended.")
        self._finish_branch(state)
        state.revealed = True
        return (f"Session ended. Model A was **{self._model(state, 'left')}**, Model B was "
                f"**{self._model(state, 'right')}**. Start a new session to keep going.")

    def _store_sessions(self, state: ArenaState, upto: int, extra_meta: dict) -> int:
        """Store both sides' sessions up to turn ``upto`` (1-based) and their comparison."""
        shas = {state.source} | {t.outputs[s] for t in state.turns[:upto] for s in "AB"}
        for sha in sorted(shas - state.stored):
            self.store.put_image(self.bank.get_bytes(sha))
        state.stored |= shas
        session_ids = {}
        for side in "AB":
            spec = self.engine.sides[side]
            turns = [{"instruction": t.instruction, "intent": t.told[side].intent,
                      "input_sha": state.input_of(side, i), "output_sha": t.outputs[side],
                      "seconds": t.seconds[side]} for i, t in enumerate(state.turns[:upto])]
            meta = {"origin": "arena", "arena_id": state.arena_id, "branch": state.branch,
                    "side": side, "left": state.left, "anonymous": state.anonymous,
                    "source": state.source_label, "world": state.scene is not None,
                    "seeds": [t.seed for t in state.turns[:upto]],
                    "steps": [t.steps for t in state.turns[:upto]],
                    "intents": [t.told[side].intent for t in state.turns[:upto]],
                    "intent_reconstructor": self.intents.specs.get(side),
                    "intent_failures": [t.told[side].failure for t in state.turns[:upto]],
                    "targets": [t.target for t in state.turns[:upto]],
                    "verdicts": [t.verdicts.get(side) for t in state.turns[:upto]], **extra_meta}
            session_ids[side] = self.store.add_session(spec.editor_name, spec.adapter,
                                                       state.turns[0].seed, state.source, turns,
                                                       meta)
        return self.store.add_comparison(session_ids["A"], session_ids["B"], kind="arena")

    def _finish_branch(self, state: ArenaState) -> None:
        """Store turns nobody voted on before they leave the screen, in sessions that have a
        vote (see the module docstring)."""
        if state.source is None or state.n <= state.saved_prefix or not state.votes:
            return
        try:
            self._store_sessions(state, state.n, {"blind": None, "unvoted_tail": True})
        except Exception:  # noqa: BLE001 - votes are stored already; never block undo / reset
            log.exception("could not store the unvoted turns of arena session %s",
                          state.arena_id)
            return
        state.saved_prefix = state.n

    # ------------------------------------------------------------------ undo / fork / reset
    def undo(self, state: ArenaState) -> str:
        if state.n == 0:
            raise ArenaError("Nothing to undo.")
        self._require_open(state)
        self._finish_branch(state)
        state.turns.pop()
        state.branch += 1
        state.saved_prefix = min(state.saved_prefix, state.n)
        self._hold_images(state)
        return f"Undid turn {state.n + 1}; both sides are back at turn {state.n}."

    def fork(self, state: ArenaState, turn) -> str:
        if state.n == 0:
            raise ArenaError("Nothing to fork from: make an edit first.")
        self._require_open(state)
        keep = whole_number(turn, "Fork turn", 0, state.n)
        if keep == state.n:
            raise ArenaError(f"Turn {keep} is already the latest; pick an earlier turn to fork.")
        self._finish_branch(state)
        del state.turns[keep:]
        state.branch += 1
        state.saved_prefix = min(state.saved_prefix, keep)
        self._hold_images(state)
        where = "the source" if keep == 0 else f"turn {keep}"
        return f"Forked from {where}: the next edit continues from there (a new branch)."

    def finish(self, state: ArenaState) -> None:
        """gr.State delete callback (the browser session ended): store the unvoted tail and let
        go of the session's images."""
        try:
            if isinstance(state, ArenaState):
                with self.ctx.lock_for(state.arena_id):
                    self._finish_branch(state)
                    self.bank.hold(id(state), ())
        except Exception:  # noqa: BLE001 - a cleanup callback must never raise
            pass

    def reset(self, state: ArenaState) -> str:
        if state.source is None:
            raise ArenaError("Nothing to reset: start a session first.")
        self._new_session(state, state.anonymous_next)
        self._hold_images(state)
        return "Reset: a new session on the same source (sides shuffled again, a new seed)."

    # ----------------------------------------------------------------------------- display
    def _model(self, state: ArenaState, screen: str) -> str:
        return self.engine.sides[state.side_on(screen)].model

    def _failure(self, state: ArenaState, failed: dict[str, str]) -> str:
        """What failed, for the person: with the names shown, each failing side's screen name,
        model and error; while they are hidden, neither which side nor the error (which may
        name a side or a model).  The errors always go to the log."""
        for side, err in failed.items():
            log.warning("arena %s: the editor of side %s failed: %s", state.arena_id, side, err)
        if state.names_visible():
            return "; ".join(f"{'Model A' if state.left == side else 'Model B'} "
                             f"({self.engine.sides[side].model}) failed ({err})"
                             for side, err in failed.items())
        return (("both editors" if len(failed) == 2 else "an editor") + " failed (which one "
                "stays hidden until you end the session; the server log has the details)")

    def title(self, state: ArenaState, screen: str) -> str:
        name = "Model A" if screen == "left" else "Model B"
        if state.source is not None and state.names_visible():
            return f"### {name} · `{self._model(state, screen)}`"
        return f"### {name}" + (" · *hidden until you end the session*" if state.anonymous
                                else "")

    def strip(self, state: ArenaState, screen: str) -> list[tuple[str, str]]:
        """History strip of one screen side: the source, then every turn with its caption
        (display files, see :class:`~ui.images.DisplayFiles`)."""
        if state.source is None:
            return []
        side = state.side_on(screen)
        show = self.ctx.display.path
        items = [(show(state.source, 128), "source")]
        for k, t in enumerate(state.turns):
            caption = f"T{k + 1}"
            if state.show_verdict and state.scene is not None:
                v = t.verdicts.get(side)
                caption += "" if v is None else (" ✅" if v["success"] else " ❌")
            items.append((show(t.outputs[side], 128), caption))
        return items

    def current(self, state: ArenaState, screen: str) -> str | None:
        if state.source is None:
            return None
        return self.ctx.display.path(state.latest_of(state.side_on(screen)))

    def told(self, state: ArenaState, screen: str) -> str:
        """What the editor of a screen side used in the latest turn (Markdown, small under its
        picture): the intent its reconstructor gave, or the instruction as typed."""
        if not state.turns:
            return ""
        told = state.turns[-1].told[state.side_on(screen)]
        return f"**Intent used** in turn {state.n}: {told_markdown(told)}"

    def history(self, state: ArenaState) -> str:
        """The session's turns, oldest first: instruction, what each side's editor used,
        verdicts, vote (Markdown; the person's text, and the intents, shown literally, see
        :mod:`ui.text`)."""
        if not state.turns:
            return ""
        picks = {"left": "A better", "right": "B better", "tie": "tie", "both_bad": "both bad"}
        lines = ["**History**"]
        for k, t in enumerate(state.turns):
            line = f"{k + 1}. {md_literal(t.instruction)}"
            left, right = (told_markdown(t.told[state.side_on(screen)])
                           for screen in ("left", "right"))
            line += f" → *{left}*" if left == right else f" → A: *{left}* · B: *{right}*"
            if state.show_verdict and state.scene is not None:
                line += (f" · A {format_verdict(t.verdicts.get(state.side_on('left')))}"
                         f" · B {format_verdict(t.verdicts.get(state.side_on('right')))}")
            if t.vote:
                line += f" · vote: **{picks[t.vote['pick']]}**"
            lines.append(line)
        return "\n".join(lines)

    def status(self, state: ArenaState) -> str:
        show_verdict = state.show_verdict
        lines = []
        if state.message:
            lines.append(state.message)
        if state.source is None:
            lines.append("Start with **🎲 Random scene**, an **example** or **upload** an image.")
            return "\n\n".join(lines)
        head = f"**Session** on {state.source_label} · turn **{state.n}**"
        if state.branch:
            head += f" · branch {state.branch}"
        lines.append(head)
        if state.n:
            t = state.turns[-1]
            if all(t.told[side].skipped == "off" for side in "AB"):
                lines.append(f"**Intent** of turn {state.n}: reconstruction is off, both editors "
                             "got the instruction as typed")
            else:
                left, right = (told_markdown(t.told[state.side_on(screen)], True)
                               for screen in ("left", "right"))
                lines.append(f"**Reconstructed intent** of turn {state.n} · " +
                             (f"Models A and B: {left}" if left == right else
                              f"Model A: {left} · Model B: {right}"))
            if show_verdict and state.scene is not None:
                target = f" (target “{md_literal(t.target)}”)" if t.target else ""
                lines.append(f"**Verifier**, turn {state.n}{target}: Model A "
                             f"{format_verdict(t.verdicts.get(state.side_on('left')))} · Model B "
                             f"{format_verdict(t.verdicts.get(state.side_on('right')))}")
            if t.vote is None and not state.revealed:
                lines.append(f"Which side did turn {state.n} better?")
        return "\n\n".join(lines)
