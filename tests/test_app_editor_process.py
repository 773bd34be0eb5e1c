"""Editors in processes of their own (ui.editor_process): a request's round trip through a real
editor process (same output as in this process, steps forwarded, timings and batching), a
killed process (a clear error to whoever was waiting, then it serves again), a clean stop, and
the app's default engine (one process per side, with the fallbacks of ui.engine)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import signal
import time

import numpy as np
import pytest

from mteditlab.editors.reference import OracleEditor
from mteditlab.world import generate_session, render
from ui import testing
from ui.arena import Arena
from ui.arena_state import ArenaState
from ui.batcher import EditFailure
from ui.config import AppConfig, SideSpec
from ui.context import AppContext
from ui.editor_process import EditorProcess
from ui.engine import Engine, editors_in_own_processes, run_pair


def _turn():
    session = generate_session("test", 3, turns=2)
    return render(session.source), session.turns[0].instruction


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def _paced_process(key: str, delay_s: float, steps: int = 5) -> EditorProcess:
    process = EditorProcess(key, functools.partial(testing.paced_side, key, "oracle", delay_s,
                                                   steps))
    side = process.ready.result(timeout=180)
    assert side.process is process and side.editor is None
    assert (side.editor_name, side.default_steps, side.resolution) == ("oracle", steps, 32)
    return process


def test_round_trip_batching_a_crash_and_a_clean_stop():
    image, text = _turn()
    expected = OracleEditor().edit(image, text)
    process = _paced_process("A", delay_s=0.05)
    try:
        steps = []
        out = process.submit(image, text, None, 3, None,
                             on_step=lambda done, total: steps.append((done, total))).result(60)
        assert _same(out, expected)
        assert steps == [(k, 5) for k in range(1, 6)]
        # concurrent requests share a batch; each gets its own result
        texts = [text, "change the background to black", text, "remove everything"]
        futures = [process.submit(image, t, None, i, None) for i, t in enumerate(texts)]
        outs = [f.result(60) for f in futures]
        for t, o in zip(texts, outs):
            assert _same(o, OracleEditor().edit(image, t))
        summary = process.timings.summary()
        assert summary["editor A: batch size"]["max"] > 1
        assert summary["editor A: queue wait"]["n"] == 5
        many = process.edit_many([image] * 3, texts[:3], [None] * 3, [0, 1, 2])
        assert all(_same(o, OracleEditor().edit(image, t)) for o, t in zip(many, texts[:3]))
        # killed in the middle of an edit (60 steps, 3 s): whoever waits gets a clear error,
        # and the next request waits for the restarted process and goes through
        waiting = process.submit(image, text, None, 0, 60)
        time.sleep(0.5)
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(EditFailure, match="side A stopped unexpectedly .*signal 9.*restarting"):
            waiting.result(30)
        assert _same(process.submit(image, text, None, 0, None).result(180), expected)
        # stopping finishes the edit in flight first
        pending = process.submit(image, text, None, 9, None)
        time.sleep(0.1)
    finally:
        process.stop()
    assert _same(pending.result(5), expected)
    refused = process.submit(image, text, None, 0, None)
    with pytest.raises(EditFailure, match="shutting down"):
        refused.result(5)


def test_progress_and_a_crash_through_the_arena(tmp_path):
    """run_pair reports each side's steps from the caller's thread; a side whose process is
    killed mid-edit gives the person a clear message and the next turn goes through."""
    processes = [_paced_process(key, delay_s) for key, delay_s in (("A", 0.05), ("B", 0.4))]
    a, b = (p.ready.result() for p in processes)
    b.editor_name = "oracle-slow"      # two different models (the store refuses one against itself)
    engine = Engine(a, b, [])
    assert engine.workers == {"A": processes[0], "B": processes[1]}
    image, text = _turn()
    reports = []
    results = run_pair(engine, {"A": image, "B": image}, text, None, 1, None,
                       progress=reports.append)
    assert all(err is None for _, _, err in results.values())
    assert reports[-1] == {"A": (5, 5), "B": (5, 5)}
    assert any(0 < r["B"][0] < 5 for r in reports)
    ctx = AppContext.create(testing.app_config(tmp_path / "data"), engine=engine)
    try:
        arena = Arena(ctx)
        state = ArenaState(anonymous_next=False, arena_key=arena.key)
        arena.start_example(state, "2")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            turn = pool.submit(arena.edit, state, "add a small red circle at the top left", 0,
                               None)
            time.sleep(0.8)
            os.kill(processes[1].pid, signal.SIGKILL)
            with pytest.raises(Exception, match="did not go through.*stopped unexpectedly"):
                turn.result(60)
        assert state.n == 0
        assert arena.edit(state, "add a small red circle at the top left", 0, None) \
            .startswith("Turn 1 done")
    finally:
        ctx.close()


def test_default_engine_runs_each_side_in_its_own_process_with_fallbacks(tmp_path):
    config = AppConfig(side_a=SideSpec("identity"),
                       side_b=SideSpec("mini", str(tmp_path / "no-adapter")))
    assert editors_in_own_processes(config)
    engine = Engine.from_config(config)
    try:
        a, b = engine.sides["A"], engine.sides["B"]
        assert (a.model, b.model) == ("identity", "oracle") and len(engine.notices) == 1
        assert "could not be loaded — EditorError: no LoRA adapter" in engine.notices[0]
        assert a.process is not None and b.process is not None and a.editor is None
        assert engine.workers == {"A": a.process, "B": b.process}
        image, text = _turn()
        results = run_pair(engine, {"A": image, "B": image}, text, None, 0, None)
        assert _same(results["B"][0], OracleEditor().edit(image, text))
        assert _same(results["A"][0], image)
    finally:
        engine.close()
