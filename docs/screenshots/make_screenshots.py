"""Regenerate the app screenshots in this directory (a real browser: Debian's chromium).

    python -m docs.screenshots.make_screenshots            # the default editors (mini vs mini+RL)
    python -m docs.screenshots.make_screenshots --reference  # oracle vs identity (no checkpoints)

Launches the app on a temporary data directory, fills the labeling queue with a few world test
sessions, plays a 3-turn arena session with votes, labels one item with the keyboard and opens
the leaderboard, saving ``arena.png``, ``arena-before-vote.png``, ``label.png`` and
``leaderboard.png`` here.  The votes follow the exact verifier (the side whose turn succeeded
wins; both or neither: tie / both bad), so the leaderboard in the pictures is not noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def verifier_pick(status: str) -> str:
    """Arena vote from the verdict line the status shows (verifier display switched on)."""
    line = next(l for l in status.splitlines() if l.startswith("Verifier"))
    a_ok = "Model A ✅" in line
    b_ok = "Model B ✅" in line
    return {(True, False): "left", (False, True): "right", (True, True): "tie"}.get(
        (a_ok, b_ok), "both_bad")


def verifier_keys(ctx, annotator: str) -> list[str]:
    """Keyboard answers for the annotator's next item, by the verifier (1 left, 2 right, 3 tie,
    4 both bad), per turn and then for the whole session (success rate)."""
    import json

    from mteditlab.world import generate_session, score_turn

    ctx.ensure_annotator(annotator)
    item = ctx.store.next_assignment(annotator)  # the UI resumes this same assignment
    info = ctx.store.get_comparison(item.comparison_id)
    meta = json.loads(ctx.store.query("SELECT meta FROM sessions WHERE session_id = ?",
                                      [info["A"]["session_id"]])["meta"].iloc[0])
    session = generate_session("test", meta["index"], turns=len(info["instructions"]))
    ok = {}
    for side in "AB":
        images = [ctx.store.get_image(info["source_sha"])] + [ctx.store.get_image(s)
                                                              for s in info[side]["outputs"]]
        ok[side] = [score_turn(session, k, images[k], images[k + 1]).success
                    for k in range(len(images) - 1)]
    left = item.left
    right = "B" if left == "A" else "A"

    def key(l_ok, r_ok):
        return {(True, False): "1", (False, True): "2", (True, True): "3"}.get((l_ok, r_ok), "4")

    keys = [key(a, b) for a, b in zip(ok[left], ok[right])]
    l_rate, r_rate = sum(ok[left]), sum(ok[right])
    keys.append("1" if l_rate > r_rate else "2" if r_rate > l_rate else
                ("3" if l_rate else "4"))
    return keys


def main() -> int:
    from ui import testing
    from ui.config import AppConfig, Credentials
    from ui.label import populate_queue
    from mteditlab.world import generate_session

    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", action="store_true", help="oracle vs identity")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="mteditlab-shots-"))
    engine = None
    if args.reference:
        from mteditlab.editors.reference import IdentityEditor, OracleEditor

        engine = testing.make_engine(OracleEditor(), IdentityEditor())
    config = AppConfig(data_dir=data, annotators=Credentials.parse("alice:wonderland", "shots"),
                       admins=Credentials.parse("root:secret", "shots"), min_battles=1)  # a handful of votes
    session = generate_session("test", 3, turns=5)  # "Example 2"
    with testing.running_app(config, engine=engine) as (url, demo, ctx):
        populate_queue(ctx, n_sessions=4, n_turns=3, gold_every=0)
        with testing.browser_page(1400, 1000) as page:
            page.goto(url)
            page.locator("#arena-settings").get_by_text("Settings").click()
            page.locator("#arena-verdict input").check()          # show the verifier too
            page.wait_for_timeout(1000)
            page.locator("#arena-settings").get_by_text("Settings").click()
            testing.arena_session(page, url, [t.instruction for t in session.turns[:3]],
                                  verifier_pick, args.out, reload=False)
            testing.label_item(page, "alice", "wonderland", verifier_keys(ctx, "alice"),
                               args.out)
            testing.leaderboard(page, args.out)
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
