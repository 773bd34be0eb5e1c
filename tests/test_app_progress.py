"""Edit progress: each side's denoising steps reach the caller while the editors run, and the
step hook never changes what an editor returns."""

from __future__ import annotations

import numpy as np
import pytest

from ui import testing
from ui.arena import Arena
from ui.arena_state import ArenaState
from ui.batcher import takes_callback
from ui.engine import progress_fraction, run_pair
from mteditlab.editors.reference import IdentityEditor, OracleEditor
from mteditlab.world import generate_session, render


def _session_input():
    session = generate_session("test", 3, turns=2)
    return render(session.source), session.turns[0].instruction


def test_mini_editor_step_hook_leaves_results_unchanged():
    from mteditlab.editors import get_editor

    editor = get_editor("mini")
    image, text = _session_input()
    images, texts = [image, image.rotate(90)], [text, "remove the object at the centre"]
    plain = editor.edit_batch(images, texts, seeds=[3, 4], steps=6)
    seen = []
    hooked = editor.edit_batch(images, texts, seeds=[3, 4], steps=6,
                               callback=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 6) for k in range(1, 7)]
    for a, b in zip(plain, hooked):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_paced_editor_is_a_flow_editor_that_reproduces_its_reference():
    image, text = _session_input()
    paced = testing.paced_editor(OracleEditor(), delay_s=0.0, steps=5)
    assert takes_callback(paced) and not takes_callback(OracleEditor())
    steps = []
    out = paced.edit_batch([image], [text], seeds=[1], callback=lambda d, t: steps.append(d))
    assert steps == [1, 2, 3, 4, 5]
    assert np.array_equal(np.asarray(out[0]), np.asarray(OracleEditor().edit(image, text)))


def test_run_pair_reports_each_sides_steps_from_the_calling_thread():
    import threading

    engine = testing.make_engine(testing.paced_editor(OracleEditor(), 0.02, steps=8),
                                 testing.paced_editor(IdentityEditor(), 0.05, steps=4))
    image, text = _session_input()
    reports, threads = [], set()

    def progress(steps):
        threads.add(threading.get_ident())
        reports.append(steps)

    try:
        results = run_pair(engine, {"A": image, "B": image}, text, None, 7, None,
                           progress=progress)
    finally:
        engine.close()
    assert all(err is None for _, _, err in results.values())
    assert threads == {threading.get_ident()}
    a = [r["A"] for r in reports]
    b = [r["B"] for r in reports]
    assert a[-1] == (8, 8) and b[-1] == (4, 4)
    assert any(0 < done < 8 for done, _ in a) and any(0 < done < 4 for done, _ in b)
    for series in (a, b):   # never goes backwards
        dones = [d for d, _ in series]
        assert dones == sorted(dones)
    fractions = [progress_fraction(r) for r in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_reference_editors_without_steps_report_done_when_they_finish():
    engine = testing.make_engine(OracleEditor(), IdentityEditor())
    image, text = _session_input()
    reports = []
    try:
        run_pair(engine, {"A": image, "B": image}, text, None, 0, None, progress=reports.append)
    finally:
        engine.close()
    assert reports[-1] == {"A": (1, 1), "B": (1, 1)}


def test_arena_progress_names_screen_sides_only(tmp_path):
    """The progress text says Model A / Model B (the screen's names), never a model name."""
    config = testing.app_config(tmp_path / "data")
    engine = testing.make_engine(testing.paced_editor(OracleEditor(), 0.01, steps=3),
                                 testing.paced_editor(IdentityEditor(), 0.01, steps=3))
    from ui.context import AppContext

    ctx = AppContext.create(config, engine=engine)
    try:
        arena = Arena(ctx)
        state = ArenaState(anonymous_next=True, arena_key=arena.key)
        arena.start_example(state, "2")
        shown = []
        message = arena.edit(state, "add a small red circle at the top left", 0, None,
                             progress=lambda fraction, text: shown.append((fraction, text)))
    finally:
        ctx.close()
    assert message.startswith("Turn 1 done")
    assert shown[-1] == (1.0, "Model A: done · Model B: done")
    assert any("step 1/3" in text or "step 2/3" in text for _, text in shown)
    for _, text in shown:
        assert "oracle" not in text and "identity" not in text
        assert text.startswith("Model A: ") and " · Model B: " in text


@pytest.mark.parametrize("fraction_input,expected", [
    ({"A": (0, None), "B": (0, None)}, 0.0), ({"A": (5, 10), "B": (0, None)}, 0.25),
    ({"A": (10, 10), "B": (1, 1)}, 1.0)])
def test_progress_fraction(fraction_input, expected):
    assert progress_fraction(fraction_input) == pytest.approx(expected)



def test_progress_reports_are_throttled_between_start_and_finish():
    """A long edit reports each side's start and finish, and in between at most every
    REPORT_EVERY_S (not on every step: under load each report costs the server CPU)."""
    from ui.engine import REPORT_EVERY_S

    steps, delay = 40, 0.02   # 0.8 s per side, one step every 20 ms
    engine = testing.make_engine(testing.paced_editor(OracleEditor(), delay, steps=steps),
                                 testing.paced_editor(IdentityEditor(), delay, steps=steps))
    image, text = _session_input()
    reports = []
    try:
        results = run_pair(engine, {"A": image, "B": image}, text, None, 1, None,
                           progress=reports.append)
    finally:
        engine.close()
    assert all(err is None for _, _, err in results.values())
    assert reports[-1] == {"A": (steps, steps), "B": (steps, steps)}
    assert any(0 < r["A"][0] < steps for r in reports)      # intermediate steps still shown
    assert len(reports) <= 4 + steps * delay / REPORT_EVERY_S + 2   # not one per step (80)
