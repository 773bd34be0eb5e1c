"""End to end in a real browser: Playwright driving Debian's chromium (no browser download)
clicks through a 3-turn arena session (watching each edit's progress), one labeling item and
the leaderboard, checks the screen and the database, and saves screenshots (to
``$MTEDITLAB_SCREENSHOTS`` when set, else a temp dir).

The arena runs two flow editors that take real denoising steps at a visible pace (the
oracle's and the identity's results, reached in 10 steps each; see
:func:`ui.testing.paced_editor`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ui import testing
from mteditlab.editors.reference import IdentityEditor, OracleEditor
from mteditlab.world import generate_session

if not Path(testing.CHROMIUM).exists():
    pytest.skip(f"no browser: {testing.CHROMIUM} is absent (apt-get install chromium); "
                "Playwright may not download one here", allow_module_level=True)
pytest.importorskip("playwright.sync_api")


STEP = re.compile(r"Model A: (?:step (\d+)/10|done|starting) · Model B: (?:step (\d+)/10|done|starting)")


def check_progress(frames: list[dict]) -> None:
    """During an edit: each side's denoising steps counted up over the pictures and the status
    (never a fixed placeholder), while the source picture and the instruction box stayed
    uncovered and the box stayed editable."""
    texts = [f["left"] for f in frames if f["left"]]
    assert texts, "no progress was shown during the edit"
    assert all(f["status"] == f["left"] for f in frames if f["left"] and f["status"])
    steps = []
    for text in texts:
        match = STEP.search(text)
        assert match, text
        steps.append(tuple(int(g) if g else None for g in match.groups()))
    middle = [s for s in steps if any(v is not None and 0 < v < 10 for v in s)]
    assert middle, f"no intermediate step seen: {texts}"
    assert len(set(texts)) >= 2, texts
    for column in (0, 1):
        counts = [s[column] for s in steps if s[column] is not None]
        assert counts == sorted(counts), texts
    assert not any(f["source_covered"] for f in frames)
    assert not any(f["instruction_covered"] for f in frames)
    assert all(f["instruction_enabled"] for f in frames)


def test_arena_and_labeling_in_a_real_browser(tmp_path):
    from ui.label import populate_queue

    shots = Path(os.environ.get("MTEDITLAB_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    config = testing.app_config(tmp_path / "data", min_battles=1)   # a handful of votes
    engine = testing.make_engine(testing.paced_editor(OracleEditor(), delay_s=0.08),
                                 testing.paced_editor(IdentityEditor(), delay_s=0.05))
    session = generate_session("test", 3, turns=5)     # the session behind "Example 2"
    with testing.running_app(config, engine=engine) as (url, demo, ctx):
        populate_queue(ctx, n_sessions=2, n_turns=2, gold_every=0)
        with testing.browser_page() as page:
            seen = testing.arena_session(page, url, [t.instruction for t in session.turns[:3]],
                                         ["left", "tie", "right"], shots, watch=True)
            for shown in seen:
                check_progress(shown["progress"])
                assert shown["instruction"] == ""        # the box empties after each edit
            # text typed while an edit runs stays in the box when the edit is done
            typed = "make it bigger"
            assert testing.type_during_edit(page, session.turns[3].instruction, typed,
                                            turn=4) == typed
            # anonymous through every vote; ending the session shows both names
            for shown in seen:
                text = " ".join(shown[k] for k in ("status", "title_left", "title_right"))
                assert "oracle" not in text and "identity" not in text
            ended = testing.end_session(page)
            assert "Model A was" in ended["status"]
            names = {ended["title_left"].split("·")[-1].strip(),
                     ended["title_right"].split("·")[-1].strip()}
            assert names == {"oracle", "identity"}
            assert [s["strip_left"] for s in seen] == [2, 3, 4] == [s["strip_right"] for s in seen]
            label = testing.label_item(page, "alice", "wonderland", ["1", "3", "2"], shots)
            assert "item 1 of 2" in label["header"] and "Rubric" in label["rubric"]
            assert "Saved 3 judgments" in label["status"]
            board = testing.leaderboard(page, shots)
            assert "human votes" in board["summary"] and "oracle" in board["table"]
            # beside the plain ratings: the same models with appearance held equal
            assert "style-controlled" in board["style"]
            assert "oracle" in board["style"] and "identity" in board["style"]
            assert "quality" in board["style_note"] and "tint" in board["style_note"]
        frame = ctx.store.judgments_frame(include_simulated=True)
    arena = frame[frame["kind"] == "arena"]
    assert list(arena["turn"]) == [0, 1, 2]
    left = arena["left"].iloc[0]
    right = "B" if left == "A" else "A"
    assert list(arena["choice"]) == [left, "tie", right] and arena["blind"].all()
    alice = frame[frame["annotator"] == "alice"]
    assert list(alice["turn"].astype("Float64").fillna(-1)) == [0, 1, -1]
    assert (alice["kind"] != "arena").all() and alice["blind"].all()
    a_left = alice["left"].iloc[0]
    a_right = "B" if a_left == "A" else "A"
    assert list(alice["choice"]) == [a_left, "tie", a_right]     # keys 1, 3, 2
    assert len(frame) == 6
    for name in ("arena.png", "label.png", "leaderboard.png"):
        assert (shots / name).stat().st_size > 10_000


def test_half_a_character_typed_in_the_browser_leaves_the_page_working(tmp_path):
    """A lone UTF-16 surrogate (half an emoji) in the instruction box: the edit is refused
    with a message, the page stays in step with the server and the next edit goes through."""
    config = testing.app_config(tmp_path / "data")
    engine = testing.make_engine(OracleEditor(), IdentityEditor())
    with testing.running_app(config, engine=engine) as (url, demo, ctx):
        with testing.browser_page() as page:
            page.set_default_timeout(30_000)
            page.goto(url)
            page.locator("#arena-example input").click()
            page.get_by_role("option", name="Example 1").click()
            testing.wait_text(page, "#arena-status", "New session on example")
            page.evaluate("""() => {
                const box = document.querySelector('#arena-instruction textarea');
                box.value = 'make it red \\uD83D';
                box.dispatchEvent(new Event('input', {bubbles: true}));
            }""")
            page.locator("#arena-edit").click()
            testing.wait_text(page, "#arena-status", "half of a character", timeout=30_000)
            assert "turn 0" in page.locator("#arena-status").inner_text()
            page.locator("#arena-instruction textarea").fill("change the background to black")
            page.locator("#arena-edit").click()
            testing.wait_text(page, "#arena-status", "Turn 1 done", timeout=30_000)
            assert "turn 1" in page.locator("#arena-status").inner_text()
