"""The RL lab notebook's rows: a real (tiny) training run, its paired val benchmark, the row and the page."""

import json

from bench import rl_notebook
from mteditlab.bench import main as bench_main
from tests.test_grpo_recipes import TINY
from training.config import GRPOConfig
from training.grpo import train


def test_a_run_becomes_a_notebook_row(tmp_path, monkeypatch):
    run = tmp_path / "sft-probe"
    train(GRPOConfig(algo="sft", iterations=2, rft_updates=2, rft_batch_size=4, learning_rate=1e-2,
                     out=str(run), **{**TINY, "turns": 2}))
    common = ["--sessions", "4", "--turns", "2", "--split", "val", "--no-teacher-forced"]
    bench_main([*common, "--json", str(tmp_path / "base.json")])
    bench_main([*common, "--adapter", str(run / "adapter"), "--against-result", str(tmp_path / "base.json"),
                "--json", str(tmp_path / "val.json")])
    page = tmp_path / "notebook.md"
    page.write_text(f"# notebook\n\n{rl_notebook.BEGIN}\n{rl_notebook.END}\n\n## notes\nkept\n")
    monkeypatch.setattr(rl_notebook, "ROWS", tmp_path / "rows.jsonl")
    monkeypatch.setattr(rl_notebook, "PAGE", page)
    for _ in range(2):    # adding a run again replaces its row
        rl_notebook.main(["add", str(run), "--val", str(tmp_path / "val.json"), "--stopped", "its 2 iterations"])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["command"].startswith("python -m training.grpo --lora") and "--algo sft" in row["command"]
    assert "--learning-rate 0.01" in row["command"] and "--out" not in row["command"]
    assert row["iterations"] == 2 and row["images_sampled"] == 0 and row["drift"] > 0
    assert "delta_overall_t10" not in row and row["exposure_gap_t10"] is None
    text = page.read_text()
    assert "| sft-probe |" in text and text.endswith("## notes\nkept\n") and text.count(rl_notebook.BEGIN) == 1
