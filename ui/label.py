"""Label-tab logic: annotator sign-in, the queue, judgments, skip / flag, and seeding the queue.

* **Sign-in**: ``name:password`` credentials from the configuration (checked in constant
  time), or Hugging Face OAuth on a Space (``hf:<username>``, allowed by ``--hf-annotators``).
  The signed-in name lives in the server-side ``gr.State``: API calls cannot forge it.  A
  name or address locked after failed sign-ins is told when to try again.
* **Queue**: :meth:`labeling.store.LabelStore.next_assignment` (k-way overlap, gold mixed in,
  no repeats, randomised left side, resume).  It serves labeling items only: arena battles
  (comparisons of kind ``'arena'``) are never selected.
* **Judgments**: one per turn and one for the whole session (turn ``None``), criterion
  ``overall``, all required, recorded together in one transaction
  (:meth:`labeling.store.LabelStore.record_submission`); each carries the milliseconds from the
  item appearing to that choice being made.  A submission names the item it judges (the id
  every label response carries); one for any item but the one on the annotator's screen, or
  for an item already judged or given back (another tab), is refused and stores nothing.  Gold
  items look like any other and are scored silently (admin view).
* **Skip / flag**: :meth:`labeling.store.LabelStore.release_assignment` gives the assignment
  back (never served to this annotator again; its overlap slot goes back to the others) and
  records the skip, or the flag with the annotator's reason, in the store.  Like a
  submission, a skip or flag names its item and is refused for any but the one on screen (a
  double click never gives back the next item unseen).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from labeling.errors import AssignmentError
from labeling.schema import CHOICES
from labeling.store import clean_reason

from .screen import PICKS, choice_from_screen

log = logging.getLogger("mteditlab.ui")
MAX_LABEL_TURNS = 8
LABEL_CRITERION = "overall"
RESERVED_PREFIXES = ("arena:", "judge:", "reward:", "hf:")
SEED_ORIGIN = "world-test"  # meta origin of the sessions :func:`populate_queue` stores
# what a refusal of each action that names its item says: (past tense, the request)
ACTIONS = {"submit": ("saved", "submission"), "skip": ("skipped", "skip"),
           "flag": ("flagged", "flag")}

RUBRIC = """### Rubric
Judge each **turn** (that turn's output, given everything asked so far) and then the **whole
session**. Prefer the side that:

1. **follows the instruction** — the requested change happened, on the right object;
2. **keeps everything else** — nothing the instruction did not ask for changed;
3. **keeps earlier requests** — what previous turns set up still holds;
4. **looks clean** — no smears, stray pixels, wrong colours or artefacts.

**Tie**: both equally good. **Both bad**: neither is acceptable.
Model names are hidden and the sides are shuffled on purpose.

**Keys**: `1` left · `2` right · `3` tie · `4` both bad (fills the next open question) ·
`Enter` submit · `S` skip
"""


class LabelError(ValueError):
    """Refused request; ``str()`` is shown to the annotator and nothing is stored."""


@dataclasses.dataclass
class LabelState:
    annotator: str | None = None
    via: str | None = None
    item: dict | None = None
    choice_times: dict = dataclasses.field(default_factory=dict)
    submitted: int = 0
    message: str = ""


class Labeling:
    def __init__(self, ctx):
        self.ctx = ctx
        self.store = ctx.store
        self.config = ctx.config

    # ----------------------------------------------------------------------------- sign-in
    @property
    def open(self) -> bool:
        return bool(self.config.annotators) or bool(self.config.hf_annotators)

    def sign_in(self, state: LabelState, name, password) -> str:
        if not self.config.annotators:
            raise LabelError("Password sign-in is not configured on this server "
                             "(start it with --annotators or MTEDITLAB_ANNOTATORS).")
        name = (name or "").strip() if isinstance(name, str) else ""
        if not name or not self.config.annotators.check(name, password or ""):
            time.sleep(0.3)  # slow down guessing
            raise LabelError(self.config.annotators.lockout(name)
                             or "Unknown annotator or wrong password.")
        if name.startswith(RESERVED_PREFIXES):
            raise LabelError("That annotator name uses a reserved prefix.")
        return self._signed_in(state, name, "password")

    def sign_in_hf(self, state: LabelState, username: str | None) -> str:
        if not username:
            raise LabelError("Sign in with Hugging Face first.")
        allowed = self.config.hf_annotators
        if "*" not in allowed and username not in allowed:
            raise LabelError(f"The Hugging Face account {username!r} is not on this Space's "
                             "annotator list.")
        return self._signed_in(state, f"hf:{username}", "hf")

    def _signed_in(self, state: LabelState, name: str, via: str) -> str:
        self.ctx.ensure_annotator(name)
        state.annotator, state.via, state.item, state.choice_times = name, via, None, {}
        return f"Signed in as **{name}**. " + self.next_item(state)

    def sign_out(self, state: LabelState) -> str:
        state.annotator = state.via = state.item = None
        state.choice_times = {}
        return "Signed out."

    def _require(self, state: LabelState) -> str:
        if not state.annotator:
            raise LabelError("Sign in first.")
        return state.annotator

    # ------------------------------------------------------------------------------- queue
    def next_item(self, state: LabelState) -> str:
        annotator = self._require(state)
        assignment = self.store.next_assignment(annotator)
        if assignment is None:
            state.item = None
            return "The queue is empty for you: nothing left to label. Thank you!"
        info = self.store.get_comparison(assignment.comparison_id)
        n_turns = len(info["instructions"])
        state.item = {
            "assignment_id": assignment.assignment_id,
            "comparison_id": assignment.comparison_id, "left": assignment.left,
            "n_turns": n_turns, "shown": min(n_turns, MAX_LABEL_TURNS),
            "instructions": list(info["instructions"]), "source": info["source_sha"],
            "outputs": {"A": list(info["A"]["outputs"]), "B": list(info["B"]["outputs"])},
            "shown_at": time.time(), "done": False,
        }
        state.choice_times = {}
        extra = (f" (only the first {MAX_LABEL_TURNS} of its {n_turns} turns are shown)"
                 if n_turns > MAX_LABEL_TURNS else "")
        return f"Item loaded: {n_turns} turn{'s' if n_turns != 1 else ''}{extra}."

    def progress(self, state: LabelState) -> tuple[int, int]:
        """(judged comparisons, judged + still available to this annotator)."""
        if not state.annotator:
            return 0, 0
        done, available = self.store.label_progress(state.annotator)
        current = 1 if state.item and not state.item.get("done") else 0
        return done, done + current + available

    def note_choice(self, state: LabelState, key: str) -> None:
        if state.item and isinstance(key, str) and len(key) < 16:
            state.choice_times[key] = time.time()

    # ---------------------------------------------------------------------------- judgments
    def _named_item(self, state: LabelState, item_id, action: str) -> tuple[str, dict]:
        """(annotator, the item on their screen), provided the request names that item
        (``item_id``); otherwise a :class:`LabelError` and nothing happens.  ``action``:
        'submit', 'skip' or 'flag'."""
        annotator = self._require(state)
        item = state.item
        if item is None or item.get("done"):
            raise LabelError(f"No item to {action}: load the next one.")
        shown_id = item["comparison_id"]
        if _whole(item_id) != shown_id:
            done, request = ACTIONS[action]
            raise LabelError(f"Not {done}: this {request} is for item {item_id}, which is not the "
                             f"item on your screen (item {shown_id}); nothing was {done}.")
        return annotator, item

    def submit(self, state: LabelState, item_id, turn_choices: list, overall) -> str:
        """Store the judgments of the item on screen, ``item_id`` (see the module docstring),
        and load the next item."""
        annotator, item = self._named_item(state, item_id, "submit")
        shown_id, shown = item["comparison_id"], item["shown"]
        turn_choices = list(turn_choices or [])[:shown]
        missing = [k + 1 for k in range(shown) if k >= len(turn_choices) or turn_choices[k] not in PICKS]
        if missing:
            raise LabelError("Judge every turn before submitting; missing: turn "
                             + ", ".join(map(str, missing)) + ".")
        if overall not in PICKS:
            raise LabelError("Judge the whole session (the last question) before submitting.")
        left, shown_at, now = item["left"], item["shown_at"], time.time()

        def latency(key):
            return max(0.0, (state.choice_times.get(key, now) - shown_at) * 1000.0)

        votes = [(k, choice_from_screen(turn_choices[k], left), latency(f"t{k}")) for k in range(shown)]
        votes.append((None, choice_from_screen(overall, left), latency("overall")))
        assert all(choice in CHOICES for _, choice, _ in votes)
        try:
            self.store.record_submission(
                annotator, shown_id, left,
                [(turn, LABEL_CRITERION, choice, ms) for turn, choice, ms in votes], blind=True)
        except AssignmentError as exc:
            return self._closed(state, exc, "Not saved", "takes no judgments")
        item["done"] = True
        state.submitted += 1
        return f"Saved {len(votes)} judgments. " + self.next_item(state)

    def skip(self, state: LabelState, item_id) -> str:
        """Give back the item on screen, ``item_id``, and load the next one."""
        annotator, item = self._named_item(state, item_id, "skip")
        try:
            self.store.release_assignment(annotator, item["comparison_id"])
        except AssignmentError as exc:
            return self._closed(state, exc, "Not skipped", "cannot be skipped")
        return "Skipped. " + self.next_item(state)

    def flag(self, state: LabelState, item_id, reason) -> str:
        """Flag the item on screen, ``item_id``, for review (giving it back) and load the
        next one."""
        annotator, item = self._named_item(state, item_id, "flag")
        try:
            self.store.release_assignment(annotator, item["comparison_id"],
                                          flag=clean_reason(reason) or "(no reason given)")
        except AssignmentError as exc:
            return self._closed(state, exc, "Not flagged", "cannot be flagged")
        return "Flagged for review and skipped. " + self.next_item(state)

    def _closed(self, state: LabelState, exc: AssignmentError, what: str, so: str) -> str:
        """The answer to an action on an item that is no longer the annotator's (judged or
        given back, in another tab): nothing stored, the reason, and the next item."""
        return (f"⚠️ {what}: item {exc.comparison_id} was {exc.reason} (in another tab?), so it "
                f"{so}; here is your next item. " + self.next_item(state))



def _whole(value) -> int | None:
    """``value`` as an int when it is a whole number (an id as a client sends it), else None."""
    try:
        number = int(value)
        return number if number == float(value) else None
    except (TypeError, ValueError, OverflowError):
        return None


# ------------------------------------------------------------------------- seeding the queue
def populate_queue(ctx, n_sessions: int, n_turns: int = 3, gold_every: int = 5, seed: int = 0,
                   start: int = 0, chunk: int = 16, progress=None) -> dict:
    """Fill the labeling queue with world test sessions ``start …`` edited by both arena sides
    (each side on its own outputs, conditioned on the intents its own reconstructor gives, as in
    the arena, :mod:`ui.intents`; seeds shared), plus
    a gold item (oracle vs a no-op editor; answer: the oracle) every ``gold_every`` sessions.
    Works ``chunk`` sessions at a time and calls ``progress(k)`` after each ``k`` are stored."""
    if not ctx.engine.world:
        raise LabelError("Seeding the queue needs editors of the built-in world.")
    created = {"comparisons": 0, "gold": 0}
    for offset in range(0, n_sessions, max(1, chunk)):
        size = min(max(1, chunk), n_sessions - offset)
        gold = [i - offset for i in range(offset, offset + size)
                if gold_every and i % gold_every == 0]
        made = _populate_chunk(ctx, start + offset, size, n_turns, gold, seed)
        for key in created:
            created[key] += made[key]
        if progress is not None:
            progress(size)
    return created


def _populate_chunk(ctx, start: int, n_sessions: int, n_turns: int, gold_idx: list[int],
                    seed: int) -> dict:
    """One chunk of :func:`populate_queue`: sessions ``start …``; gold on ``gold_idx``."""
    from mteditlab.editors import get_editor
    from mteditlab.rollout import EditStep, rollout
    from mteditlab.world import render, sessions as make_sessions

    store, engine = ctx.store, ctx.engine
    sessions = make_sessions("test", n_sessions, turns=n_turns, start=start)
    sources = [render(s.source) for s in sessions]
    source_shas = [store.put_image(img) for img in sources]

    def roll(edit_batch, intent="oracle"):
        """Each turn's outputs, and what the editor was told (a TurnIntents)."""
        step = EditStep(edit_batch, seed=seed, intent=intent)
        return rollout(sessions, step, turns=n_turns, sources=sources), step.intents

    def store_side(editor_name, adapter, rolled, tag) -> list[int]:
        per_turn, told = rolled
        ids = []
        for i, s in enumerate(sessions):
            turns = [{"instruction": s.turns[k].instruction, "intent": told.told(i)[k],
                      "output_sha": store.put_image(per_turn[k][i])} for k in range(n_turns)]
            ids.append(store.add_session(editor_name, adapter, seed, source_shas[i], turns,
                                         {"origin": SEED_ORIGIN, "split": "test",
                                          "index": s.index, "role": tag}))
        return ids

    created = {"comparisons": 0, "gold": 0}
    sides = {}
    for key, side in engine.sides.items():
        worker = engine.workers[key]
        rolled = roll(lambda images, texts, *, intents, seeds, steps: worker.edit_many(
            images, texts, intents, seeds, steps), ctx.intents.reconstructors[key])
        sides[key] = store_side(side.editor_name, side.adapter, rolled, key)
    for a, b in zip(sides["A"], sides["B"]):
        store.add_comparison(a, b)
        created["comparisons"] += 1
    if gold_idx:
        oracle, noop = get_editor("oracle"), get_editor("identity")
        keep = [sessions[i] for i in gold_idx]
        sessions[:], sources[:], source_shas[:] = keep, [sources[i] for i in gold_idx], \
            [source_shas[i] for i in gold_idx]
        good = store_side("oracle", None, roll(oracle.edit_batch), "gold-correct")
        bad = store_side("identity", None, roll(noop.edit_batch), "gold-noop")
        for g, b in zip(good, bad):
            store.add_comparison(g, b, gold="A")
            created["gold"] += 1
    return created


def seed_queue_in_background(ctx, n_sessions: int) -> threading.Thread:
    """Run :func:`populate_queue` for ``n_sessions`` on a daemon thread (the server keeps
    serving meanwhile) with a tqdm progress bar on stderr; returns the started thread.  A
    failure is logged, never raised."""
    from tqdm import tqdm

    def work() -> None:
        with tqdm(total=n_sessions, desc="seeding the label queue", unit="session",
                  dynamic_ncols=True) as bar:
            try:
                made = populate_queue(ctx, n_sessions, progress=bar.update)
            except Exception:  # noqa: BLE001 - the app keeps serving without the items
                log.exception("seeding the labeling queue failed")
                return
        log.info("label queue seeded: %d comparisons, %d gold items", made["comparisons"],
                 made["gold"])

    thread = threading.Thread(target=work, name="seed-queue", daemon=True)
    thread.start()
    return thread
