"""Load test of the Gradio app: N concurrent API clients play arena sessions for D seconds.

    python -m bench.app_load [--clients 20] [--duration 60] [--json out/bench/app_load.json]
                             [--random-weights] [-- extra app.py flags]

The app is launched as its own process (``python app.py`` on a free port, a temporary data
directory).  Each client (``gradio_client``, its own session) loops: a random test scene, then
3–5 turns of the scene's scripted instructions, each followed by a vote (random pick, random
criterion), sometimes an undo, and "End session" (which shows the model names).  Turn latency =
wall time of the ``/edit`` call as the client sees it (both sides edited; queueing included).

After the run the app is stopped and the database opened read-only: every acknowledged vote
must be there exactly (per voter: the same turns and criteria in the same order, and the chosen
model equal to the one that was on the picked side), and nothing unacknowledged.  Any exception
or unexpected refusal is an error.  Prints a markdown table (and the server's profile) and writes
the JSON.

``--random-weights`` runs the default pairing (mini base vs mini + a LoRA adapter) on a
random-weight mini checkpoint and a random adapter made on the fly: the same compute as the
trained checkpoints, for machines where they are not there yet.  Otherwise the app's defaults
are used (with their fallbacks, which the report names).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ui.arena_state import CRITERIA
from ui.profile import percentile
from ui.screen import PICKS
from ui.testing import free_port

REPO = Path(__file__).resolve().parents[1]
STATUS = 7  # index of the status text in an arena endpoint's API outputs
# gradio_client opens a fresh httpx client for each request, and with it an SSL context that
# loads the CA bundle: half the bench's CPU, on the cores the app runs on.  The app is plain
# http, so every client gets this one, made once.
TLS = ssl.create_default_context()


def make_random_checkpoints(root: Path) -> tuple[Path, Path]:
    """A random-weight mini checkpoint and a random LoRA adapter on it."""
    from mteditlab.editors.mini import MiniEditor

    editor = MiniEditor.from_config(seed=0)
    base = root / "mini-random"
    editor.denoiser.save_pretrained(base)
    editor.add_lora(rank=16, alpha=32)
    lora = root / "lora-random"
    editor.save_lora(lora, metadata={"note": "random adapter for bench/app_load.py"})
    return base, lora


def launch(data: Path, port: int, extra: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "app.py"), "--data-dir", str(data), "--host", "127.0.0.1",
           "--port", str(port), *extra]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    # SIGINT stops the app cleanly (it then logs its profile); a bench started in the
    # background has SIGINT ignored, which the app would inherit: restore it
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError("the app did not come up in time")


class Player(threading.Thread):
    """One client: connects (not timed), waits for the start signal, then plays until the
    deadline."""

    def __init__(self, index: int, url: str, seed: int, ready: threading.Barrier,
                 start: threading.Event):
        super().__init__(name=f"client-{index}", daemon=True)
        self.url, self.rng = url, random.Random(seed)
        self.ready, self.start_signal = ready, start
        self.deadline = float("inf")
        self.turn_s: list[float] = []
        self.edit_s: list[float] = []    # the server's editing time (both sides, batched)
        self.vote_s: list[float] = []
        self.acked: list[dict] = []      # acknowledged votes, in order
        self.errors: list[str] = []
        self.sessions = 0
        self.session_hash = None         # the app stores a keyed hash of it as the voter

    def call(self, client, *args, api_name):
        try:
            return client.predict(*args, api_name=api_name)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"{api_name}: {type(exc).__name__}: {exc}"[:300])
            return None

    def timed(self, client, expect: str, *args, api_name) -> tuple[list | None, float]:
        """A call and its wall time; ``(None, 0)`` (and an error) unless the status says ``expect``."""
        t0 = time.perf_counter()
        out = self.call(client, *args, api_name=api_name)
        if out is not None and expect not in out[STATUS]:
            self.errors.append(f"{api_name} refused: {out[STATUS][:200]}")
            out = None
        return out, time.perf_counter() - t0

    def run(self) -> None:
        from gradio_client import Client

        client = None
        for attempt in range(5):  # connecting is set-up, not load: retry it
            try:
                client = Client(self.url, verbose=False, download_files=False,
                                httpx_kwargs={"timeout": 300}, ssl_verify=TLS)
                break
            except Exception as exc:  # noqa: BLE001
                if attempt == 4:
                    self.errors.append(f"connect: {exc}")
                time.sleep(2 + 3 * attempt)
        try:
            self.ready.wait(timeout=600)
        except threading.BrokenBarrierError:
            pass
        self.start_signal.wait()
        if client is None:
            return
        self.session_hash = client.session_hash
        while time.time() < self.deadline:
            out = self.call(client, api_name="/start_random")
            if out is None or "New session" not in out[STATUS]:
                self.errors.append(f"start: {out and out[STATUS][:200]}")
                continue
            self.sessions += 1
            update = next(o for o in out if isinstance(o, dict) and "choices" in o)
            script = [c[1] if isinstance(c, (list, tuple)) else c for c in update["choices"]]
            turns = 0
            first_vote = len(self.acked)
            for text in script[: self.rng.randint(3, 5)]:
                if time.time() >= self.deadline:
                    break
                out, seconds = self.timed(client, f"Turn {turns + 1} done", text, self.rng.randrange(1000), 10,
                                          api_name="/edit")
                if out is None:
                    break
                self.turn_s.append(seconds)
                done = re.search(r"done in ([\d.]+) s", out[STATUS])
                if done:
                    self.edit_s.append(float(done.group(1)))
                turns += 1
                pick, criterion = self.rng.choice(PICKS), self.rng.choice(CRITERIA)
                out, seconds = self.timed(client, f"Vote stored for turn {turns}", turns, criterion,
                                          api_name=f"/vote_{pick}")
                if out is None:
                    break
                self.vote_s.append(seconds)
                self.acked.append({"turn": turns - 1, "criterion": criterion, "pick": pick,
                                   "left_model": None, "right_model": None})
                if self.rng.random() < 0.1 and turns > 1:  # sometimes undo and redo
                    out = self.call(client, api_name="/undo")
                    if out is None or "Undid" not in out[STATUS]:
                        self.errors.append(f"undo: {out and out[STATUS][:200]}")
                        break
                    turns -= 1
                    self.call(client, text, 1, 10, api_name="/edit")
                    turns += 1
            self.end_session(client, first_vote)

    def end_session(self, client, first_vote: int) -> None:
        """End the session (the names are shown only then) and note them on its votes."""
        out = self.call(client, api_name="/end_session")
        found = out and re.search(r"Model A was \*\*(.+?)\*\*, Model B was \*\*(.+?)\*\*",
                                  out[STATUS])
        if not found:
            self.errors.append(f"end session: {out and out[STATUS][:200]}")
            return
        for vote in self.acked[first_vote:]:
            vote["left_model"], vote["right_model"] = found.groups()


def verify(db: Path, players: list[Player]) -> dict:
    from labeling.store import LabelStore

    from ui.context import server_secret, voter_id

    secret = server_secret(db.parent)
    for p in players:
        p.voter = voter_id(secret, p.session_hash)
    with LabelStore.open(db, read_only=True) as store:
        frame = store.judgments_frame(include_simulated=True)
        counts = store.counts()
    missing, wrong, extra = 0, 0, 0
    for p in players:
        mine = frame[frame["annotator"] == p.voter].sort_values("judgment_id")
        stored = list(zip(mine["turn"].astype(int), mine["criterion"]))
        acked = [(v["turn"], v["criterion"]) for v in p.acked]
        if stored != acked:
            missing += max(0, len(acked) - len(stored))
            extra += max(0, len(stored) - len(acked))
            wrong += sum(a != b for a, b in zip(stored, acked))
            continue
        for vote, (_, row) in zip(p.acked, mine.iterrows()):
            chosen = {"A": row["model_a"], "B": row["model_b"]}.get(row["choice"])
            if vote["pick"] in ("tie", "both_bad"):
                wrong += row["choice"] != vote["pick"]
            elif vote["left_model"] is not None:
                expect = vote["left_model"] if vote["pick"] == "left" else vote["right_model"]
                wrong += chosen != expect
    return {"acknowledged": sum(len(p.acked) for p in players), "stored": int(
        frame["annotator"].isin([p.voter for p in players]).sum()), "missing": missing,
        "wrong": wrong, "unacknowledged_extra": extra, "tables": counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--json", type=Path, default=Path("out/bench/app_load.json"),
                        help="write the results here (default out/bench/app_load.json)")
    parser.add_argument("--random-weights", action="store_true",
                        help="mini base vs mini + LoRA on random weights (see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("app_args", nargs="*", help="extra app.py flags (after --)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mteditlab-load-"))
    extra = list(args.app_args)
    if args.random_weights:
        base, lora = make_random_checkpoints(work)
        extra += ["--editor-a", "mini", "--model-a", str(base), "--adapter-a", "none",
                  "--editor-b", "mini", "--model-b", str(base), "--adapter-b", str(lora)]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = work / "app.log"
    load_before = os.getloadavg()
    proc = launch(work / "data", port, extra, log_path)
    try:
        t_up = time.time()
        wait_up(url, proc)
        startup = time.time() - t_up
        ready, go = threading.Barrier(args.clients + 1), threading.Event()
        players = [Player(i, url, args.seed * 1000 + i, ready, go) for i in range(args.clients)]
        for p in players:
            p.start()
        t_connect = time.time()
        ready.wait(timeout=900)                  # every client connected (not timed)
        connect = time.time() - t_connect
        t0 = time.time()
        for p in players:
            p.deadline = t0 + args.duration
        go.set()
        for p in players:
            p.join(timeout=args.duration + 600)
        wall = time.time() - t0
        hung = [p.name for p in players if p.is_alive()]
        load_after = os.getloadavg()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text(errors="replace")
    sides = re.findall(r"Side [AB] .*", log_text)
    found = re.search(r"app profile: (\{.*\})", log_text)
    profile = json.loads(found.group(1)) if found else None
    check = verify(work / "data" / "labels.duckdb", players)
    turns = [s for p in players for s in p.turn_s]
    votes = [s for p in players for s in p.vote_s]
    edits = [s for p in players for s in p.edit_s]
    errors = [e for p in players for e in p.errors] + [f"hung: {h}" for h in hung]
    result = {
        "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
        "app_startup_s": round(startup, 1), "clients_connect_s": round(connect, 1),
        "app_args": extra,
        "fallback_notices": sides,
        "cpu": {"cores": os.cpu_count(), "loadavg_before": load_before,
                "loadavg_after": load_after,
                "note": "OMP_NUM_THREADS="
                        + os.environ.get("OMP_NUM_THREADS", "unset")},
        "sessions": sum(p.sessions for p in players), "turns": len(turns), "votes": len(votes),
        "errors": len(errors), "error_examples": errors[:10],
        "turn_latency_s": {"p50": percentile(turns, 50), "p95": percentile(turns, 95),
                           "mean": statistics.fmean(turns) if turns else None,
                           "max": max(turns, default=None)},
        "server_edit_s": {"p50": percentile(edits, 50), "p95": percentile(edits, 95)},
        "vote_latency_s": {"p50": percentile(votes, 50), "p95": percentile(votes, 95),
                           "max": max(votes, default=None)},
        "turns_per_s": round(len(turns) / wall, 2) if wall else None,
        "database": check,
        "server_profile": profile,
    }
    out = args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    ok = not errors and check["missing"] == check["wrong"] == check["unacknowledged_extra"] == 0
    rows = [("clients", args.clients), ("duration (s)", args.duration),
            ("sessions", result["sessions"]), ("turns", len(turns)), ("votes", len(votes)),
            ("turns / s", result["turns_per_s"]),
            ("turn latency p50 (s)", f"{result['turn_latency_s']['p50']:.2f}"),
            ("turn latency p95 (s)", f"{result['turn_latency_s']['p95']:.2f}"),
            ("  of which editing p50/p95 (s)", f"{result['server_edit_s']['p50']:.2f} / "
                                               f"{result['server_edit_s']['p95']:.2f}"),
            ("vote latency p50 (s)", f"{result['vote_latency_s']['p50']:.2f}"),
            ("vote latency p95 (s)", f"{result['vote_latency_s']['p95']:.2f}"),
            ("errors", len(errors)),
            ("acknowledged votes", check["acknowledged"]), ("stored votes", check["stored"]),
            ("missing / wrong / extra", f"{check['missing']} / {check['wrong']} / "
                                        f"{check['unacknowledged_extra']}"),
            ("load average before → after", f"{load_before[0]:.1f} → {load_after[0]:.1f}")]
    print(f"\nMT-EditLab app under load ({'OK' if ok else 'FAILED'})\n")
    print("| what | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name.strip()} | {value} |")
    if sides:
        print("  editors: " + " | ".join(sides))
    if profile:
        print("  server profile (seconds; batch sizes in items):")
        for name, row in profile.items():
            if "histogram" in row:
                print(f"    {name:<44} mean {row['mean']:.1f}  max {row['max']}  "
                      f"({row['n']} batches)")
            else:
                print(f"    {name:<44} p50 {row['p50']:.3f}  p95 {row['p95']:.3f}  "
                      f"mean {row['mean']:.3f}  n {row['n']}")
    for e in errors[:5]:
        print(f"  error: {e}")
    print(f"  json: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
