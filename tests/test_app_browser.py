"""End to end in a real browser: Playwright driving Debian's chromium (no browser download)
clicks through a 3-turn arena session (watching each edit's progress), one labeling item and
the leaderboard, checks the screen and the database, and saves screenshots (to
``$MTEDITLAB_SCREENSHOTS`` when set, else a temp dir); then each side's own served intent
reconstructor on an uploaded photo — a tiny random-weight Qwen-VL on 127.0.0.1, and servers that
answer malformed text or too late.

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


# ---- each side's own intent reconstructor, on an uploaded photo ----------------------------------
def photo_png(path: Path) -> Path:
    """A PNG photo-like picture (noise) that is no scene of the world."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(5).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
    return path


def served_sides_app(tmp_path, spec_a: str, spec_b: str):
    """The app with side A an oracle and side B an identity (both noting what they were told), each
    with its own served reconstructor, names shown (left = A)."""
    from ui.config import SideSpec

    editors = testing.NotingEditor(OracleEditor()), testing.NotingEditor(IdentityEditor())
    config = testing.app_config(tmp_path / "data", anonymous=False,
                                side_a=SideSpec("oracle", intent=spec_a), side_b=SideSpec("identity", intent=spec_b))
    return editors, testing.running_app(config, engine=testing.make_engine(*editors))


def test_each_side_shows_the_intent_its_served_tiny_qwen_vl_gave_on_an_uploaded_photo(tmp_path):
    """Both sides ask the tiny random-weight Qwen-VL served on 127.0.0.1 (side B allowed fewer
    tokens, so the two answers differ); the page shows, per side, the intent that side's editor got."""
    from mteditlab.reconstructors.served import parse_intent
    from tests.chat_server import ChatServer, TinyVLMResponder
    from tests.tiny_qwen_vl import build_model, build_processor, build_tokenizer

    tokenizer = build_tokenizer()
    model, processor = build_model("qwen2_5_vl", tokenizer), build_processor("qwen2_5_vl", tokenizer)
    responder, answers = TinyVLMResponder(model, processor), []

    def respond(route, body, headers):   # the real tiny VLM; its answers noted by max_tokens
        reply = responder(route, body, headers)
        if route == "chat/completions":
            answers.append((body["max_tokens"], reply["choices"][0]["message"]["content"]))
        return reply

    with ChatServer(respond) as server:
        spec = f"served:{server.url}?model=tiny-qwen-vl&retries=0&timeout=60&max_tokens="
        (a, b), app = served_sides_app(tmp_path, spec + "8", spec + "4")
        with app as (url, demo, ctx), testing.browser_page() as page:
            page.goto(url)
            note = testing.upload_source(page, photo_png(tmp_path / "photo.png"))
            assert "not a scene of the built-in world" in note
            shown = testing.edit_turn(page, "make the sky a little brighter", 1)
            page.screenshot(path=str(tmp_path / "served-intents.png"), full_page=True)
            failures = dict(ctx.intents.failures)
    told = {tokens: parse_intent(text) for tokens, text in answers}
    assert sorted(told) == [4, 8] and told[4] != told[8], answers
    assert a.calls == [("make the sky a little brighter", told[8])]
    assert b.calls == [("make the sky a little brighter", told[4])]
    assert shown["intent_left"] == f"Intent used in turn 1: “{told[8]}”"
    assert shown["intent_right"] == f"Intent used in turn 1: “{told[4]}”"
    assert f"Model A: “{told[8]}” · Model B: “{told[4]}”" in shown["status"]
    assert f"→ A: “{told[8]}” · B: “{told[4]}”" in shown["history"]
    assert failures == {}


def test_a_broken_or_slow_intent_server_leaves_the_instruction_as_typed_and_says_so(tmp_path):
    """Side A's server answers malformed text, side B's answers too late: the turn completes with
    both editors given the instruction as typed, the page says each reconstructor failed, and the
    next turn goes through as well."""
    from tests.chat_server import ChatServer, completion, text_choice

    broken = ChatServer(lambda route, body, headers: b"<html>upstream error</html>")
    slow = ChatServer(lambda route, body, headers: ("sleep", 3.0, completion([text_choice("remove it")])))
    with broken, slow:
        (a, b), app = served_sides_app(tmp_path, f"served:{broken.url}?model=m&retries=0",
                                       f"served:{slow.url}?model=m&retries=0&timeout=0.5")
        with app as (url, demo, ctx), testing.browser_page() as page:
            page.goto(url)
            testing.upload_source(page, photo_png(tmp_path / "photo.png"))
            first = testing.edit_turn(page, "make it brighter", 1)
            second = testing.edit_turn(page, "add a frame", 2)
            failures = dict(ctx.intents.failures)
    assert a.calls == b.calls == [("make it brighter", None), ("add a frame", None)]
    for shown in (first, second):
        for screen in ("left", "right"):
            assert "⚠️ reconstructor failed" in shown[f"intent_{screen}"]
            assert "instruction as typed" in shown[f"intent_{screen}"]
        assert "the intent model gave no usable answer" in shown["status"]    # A: malformed
        assert "the intent model timed out" in shown["status"]               # B: too late
        assert "127.0.0.1" not in shown["status"]
    assert "add a frame → ⚠️ reconstructor failed" in second["history"]
    assert failures == {"A": 2, "B": 2}
