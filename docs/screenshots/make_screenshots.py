"""Regenerate the app screenshots in this directory (a real browser: Debian's chromium).

    python docs/screenshots/make_screenshots.py            # the default editors (mini vs mini+RL)
    python docs/screenshots/make_screenshots.py --reference  # oracle vs identity (no checkpoints)

Launches the app on a temporary data directory, fills the labeling queue with a few world test
sessions, plays a 3-turn arena session with votes, labels one item with the keyboard and opens
the leaderboard, saving ``arena.png``, ``arena-before-vote.png``, ``label.png`` and
``leaderboard.png`` here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def main() -> int:
    from mteditlab.app import testing
    from mteditlab.app.config import AppConfig, Credentials
    from mteditlab.app.label import populate_queue
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
                       admins=Credentials.parse("root:secret", "shots"))
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
                                  ["left", "right", "tie"], args.out, reload=False)
            testing.label_item(page, "alice", "wonderland", ["2", "1", "3", "2"], args.out)
            testing.leaderboard(page, args.out)
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
