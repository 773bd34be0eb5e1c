"""Leaderboard tab: Bradley–Terry ratings with intervals, win rate by turn, agreement, machine
vs human agreement, and the admin views (export, per-annotator accuracy, flags, queue seeding).

Which votes
    Human judgments only (simulated annotators are never mixed in here), on arena battles
    (comparisons of kind ``'arena'``), on labeling items (kinds ``'item'`` and ``'gold'``), or
    both.  By default
    only blind judgments count (``blind`` column: cast while the model names were hidden; label
    judgments always are); non-blind arena votes are added on request.  Voters an admin excluded
    (see :func:`set_excluded`) are left out of everything here.

Judge and reward model vs humans
    Automatic raters record their pairwise verdicts in the same store as (simulated) annotators
    named ``judge:<name>`` (the VLM judge) and ``reward:<name>`` (the calibrated reward model).
    For each, on the units (comparison, turn, criterion) that humans also judged: agreement with
    the human majority choice (units whose majority is tied are left out), Cohen's κ against that
    majority, and the number of units, over all turns and per turn.  Shown only when such raters
    exist; ``python -m labeling rate`` makes one (:mod:`labeling.raters`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from labeling.raters import MACHINE_PREFIXES

log = logging.getLogger("mteditlab.ui")
SOURCES = ("all human votes", "arena votes", "label judgments")
CRITERIA_ALL = "all criteria"
N_BOOT = 500


def server_error(what: str) -> str:
    """For an ``except`` block: log the exception (traceback included) under a fresh reference
    and return the message visitors see: that ``what`` failed, the reference and the time —
    never the error's own text, which may name files or data."""
    reference = uuid.uuid4().hex[:8]
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    log.exception("%s failed (reference %s)", what, reference)
    return (f"⚠️ {what} failed on the server (reference `{reference}`, {when}). Try again; if "
            "it keeps failing, give the server's operator that reference.")


def _machine(names: pd.Series) -> pd.Series:
    return names.astype(str).str.startswith(MACHINE_PREFIXES)


def human_frame(store, source: str = SOURCES[0], blind_only: bool = True,
                criterion: str | None = None) -> pd.DataFrame:
    frame = store.judgments_frame(include_simulated=True)
    frame = frame[~frame["simulated"].astype(bool) & ~_machine(frame["annotator"])
                  & ~frame["annotator"].isin(store.excluded_voters())]
    arena = frame["kind"] == "arena"
    if source == SOURCES[1]:
        frame = frame[arena]
    elif source == SOURCES[2]:
        frame = frame[~arena]
    if blind_only:
        frame = frame[frame["blind"].astype(bool)]
    if criterion and criterion != CRITERIA_ALL:
        frame = frame[frame["criterion"] == criterion]
    return frame


def summary(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "No human votes match yet: vote in the Arena or label in the Label tab."
    gold = int(frame["gold"].astype(bool).sum())
    per_turn = int(frame["turn"].notna().sum())
    return (f"**{len(frame)}** human votes ({per_turn} per turn, {len(frame) - per_turn} whole "
            f"session; {gold} on gold items, left out of the ratings) from "
            f"**{frame['annotator'].nunique()}** voters on **{frame['comparison_id'].nunique()}**"
            " comparisons. Ratings: Bradley–Terry, ties (and both-bad) as half a win, 95% "
            f"bootstrap intervals ({N_BOOT} rounds): the range of ratings over resampled "
            "votes; rank = 1 + models whose lower bound beats this model's upper bound.")


def notes(table: pd.DataFrame, provisional: pd.DataFrame, min_battles: int) -> str:
    """Markdown warnings under the ratings: open intervals and provisional models."""
    from labeling.ratings import UNDEFEATED

    lines = []
    for _, row in table.iterrows():
        if row["note"]:
            side = "lost" if row["note"] == UNDEFEATED else "won"
            lines.append(f"⚠️ `{row['model']}` never {side} ({row['wins']}–{row['losses']}): "
                         "no finite rating fits that record; the number shown is held in place "
                         "only by the fit's tiny regularisation, and every resample has the "
                         "same record, so the interval says nothing there: it is open on that "
                         "side (∞).")
    if len(provisional):
        lines.append(f"{len(provisional)} model(s) with fewer than {min_battles} battles are "
                     "listed apart as **provisional**: not rated, not ranked, and left out of "
                     "the fit so that a few votes cannot move everyone else.")
    return "\n\n".join(lines)


def ratings(frame: pd.DataFrame, plot_dir: Path, min_battles: int = 0):
    """(ranked table, ratings plot path or None, win-rate-by-turn table, its plot path or None,
    provisional table, notes) with models under ``min_battles`` battles set apart."""
    import warnings

    from labeling import ratings as bt

    battles = bt.battles(frame) if len(frame) else frame
    if battles.empty:
        return pd.DataFrame(), None, pd.DataFrame(), None, pd.DataFrame(), ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = bt.ratings_table(battles, n_boot=N_BOOT, seed=0, min_battles=min_battles)
    stamp = f"{time.time_ns()}"
    plot = None
    ranked = table[~table["provisional"]]
    if len(ranked):
        plot = plot_dir / f"ratings-{stamp}.png"
        bt.plot_ratings(ranked, plot)
    by_turn = bt.win_rate_by_turn(battles)
    turn_plot = None
    if not by_turn.empty:
        turn_plot = plot_dir / f"win-rate-{stamp}.png"
        bt.plot_win_rate_by_turn(battles, turn_plot)
    provisional = (table[table["provisional"]]
                   .drop(columns=["rating", "lower", "upper", "rank", "provisional"])
                   .round({"win_rate": 3}))
    text = notes(ranked, provisional, min_battles)
    shown = ranked.drop(columns=["provisional"]).round({"win_rate": 3})
    for column in ("rating", "lower", "upper"):
        shown[column] = [_number(v) for v in shown[column]]
    return shown, plot, by_turn.round({"win_rate": 3}), turn_plot, provisional, text


_FEATURES: dict = {}   # image sha -> its features (an image never changes)
_FEATURES_MAX = 50_000


def style_control(store, frame: pd.DataFrame, ranked: pd.DataFrame, world: bool = True,
                  n_boot: int = 200) -> tuple[pd.DataFrame, str]:
    """(table, note): the ranked models re-rated with appearance held equal (a contextual
    Bradley–Terry with the judged outputs' image quality and tint as covariates, see
    :mod:`labeling.style`), beside their plain rating; the note gives how much appearance
    sways the votes.  Empty with a note when it cannot be computed."""
    import warnings

    from labeling import ratings as bt
    from labeling.style import battle_features, style_controlled

    if not world:
        return pd.DataFrame(), ("*Style control reads the images as scenes of the built-in "
                                "world; it is not available for these editors.*")
    if ranked is None or len(ranked) < 2:
        return pd.DataFrame(), ""
    keep = set(ranked["model"])
    battles = bt.battles(frame) if len(frame) else frame
    battles = battles[battles["model_a"].isin(keep) & battles["model_b"].isin(keep)]
    if battles.empty:
        return pd.DataFrame(), ""
    if len(_FEATURES) > _FEATURES_MAX:
        _FEATURES.clear()
    feats = battle_features(store, battles, cache=_FEATURES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, coefficients = style_controlled(battles, feats, n_boot=n_boot)
    if table.empty:
        return table, ""
    shown = table.rename(columns={"rating": "plain rating", "controlled": "style-controlled",
                                  "change": "Δ"}).round(1)
    parts = [f"{row.feature} {row.elo_per_sd:+.0f} [{row.lower:+.0f}, {row.upper:+.0f}]"
             for row in coefficients.itertuples()]
    note = ("**Style control**: ratings with appearance held equal — a Bradley–Terry fit "
            "that also weighs the difference in image quality and background tint between "
            "the two judged outputs, so a model cannot climb by looking cleaner while "
            "following instructions worse. Sway of appearance on the votes (Elo points per "
            "standard deviation of the difference, 95% interval): " + "; ".join(parts) + ".")
    return shown, note


def _number(value: float) -> str:
    """A rating for display: one decimal, or ±∞ for an open interval end."""
    return ("+∞" if value > 0 else "−∞") if np.isinf(value) else f"{value:.1f}"


def agreement(frame: pd.DataFrame) -> pd.DataFrame:
    from labeling import agreement as ag

    if frame.empty:
        return pd.DataFrame()
    return ag.agreement_table(frame).round(3)


def machine_agreement(store) -> pd.DataFrame:
    """Judge / reward-model agreement with the human majority (see the module docstring)."""
    from labeling import agreement as ag
    from labeling.selection import without_gold
    from labeling.schema import CHOICES

    frame = without_gold(store.judgments_frame(include_simulated=True))
    machine = _machine(frame["annotator"])
    humans = frame[~frame["simulated"].astype(bool) & ~machine]
    machines = frame[machine]
    columns = ["rater", "turn", "units", "agreement", "cohen_kappa"]
    if machines.empty or humans.empty:
        return pd.DataFrame(columns=columns)
    unit = ["comparison_id", "turn", "criterion"]
    counts = (humans.assign(turn=humans["turn"].astype("Float64").fillna(-1))
              .groupby(unit + ["choice"]).size().unstack(fill_value=0))
    top = counts.max(axis=1)
    unique_top = (counts.eq(top, axis=0).sum(axis=1) == 1)
    majority = counts[unique_top].idxmax(axis=1).rename("majority").reset_index()
    index = {c: i for i, c in enumerate(CHOICES)}

    def row(rater: str, turn: str, merged: pd.DataFrame) -> dict:
        confusion = np.zeros((len(CHOICES), len(CHOICES)))
        for a, b in zip(merged["choice"], merged["majority"]):
            confusion[index[a], index[b]] += 1
        return {"rater": rater, "turn": turn, "units": len(merged),
                "agreement": float((merged["choice"] == merged["majority"]).mean()) if len(merged) else np.nan,
                "cohen_kappa": float(ag.cohen_kappa(confusion)) if len(merged) else np.nan}

    rows = []
    for rater, part in machines.groupby("annotator"):
        merged = part.assign(turn=part["turn"].astype("Float64").fillna(-1)).merge(majority, on=unit)
        rows.append(row(rater, "all", merged))
        rows += [row(rater, str(int(turn) + 1) if turn >= 0 else "session", by_turn)
                 for turn, by_turn in merged.groupby("turn", sort=True)]
    return pd.DataFrame(rows, columns=columns).round(3)


def reward_model_report(directory) -> str:
    """Markdown: the calibrated reward model's held-out agreement with the labels it was fit on,
    next to the raw judge's (from ``python -m training.reward_model``'s report), or a note."""
    import json

    from .config import resolve_path

    if not directory:
        return "*No calibrated reward model configured (`--reward-model DIR`).*"
    base = resolve_path(str(directory))
    report = None
    for name in ("report.json", "calibrated.json"):
        path = base / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            report = data.get("report", data) if name == "calibrated.json" else data
            break
    if not report or "heldout_accuracy" not in report:
        return (f"*No calibrated reward model at `{directory}` yet "
                "(`python -m training.reward_model --db … --out DIR`).*")

    def f(key):
        value = report.get(key)
        return "–" if value is None else f"{value:.3f}"

    labels = "simulated" if report.get("simulated") else "human"
    return "\n".join([
        f"Held-out agreement with the {labels} labels (split by source; "
        f"{report.get('n_test', '?')} test judgments, {report.get('n_test_decisive', '?')} "
        "decisive):", "",
        "| rater | pairwise accuracy | log-loss | calibration error |", "|---|---|---|---|",
        f"| judge `{report.get('judge', '?')}` (raw) | {f('judge_heldout_accuracy')} | "
        f"{f('judge_log_loss')} | {f('judge_ece')} |",
        f"| calibrated reward model | {f('heldout_accuracy')} | {f('log_loss')} | {f('ece')} |"])


# ------------------------------------------------------------------------------- admin
def gold_accuracy(store) -> pd.DataFrame:
    from labeling import agreement as ag

    frame = store.judgments_frame(include_simulated=True)
    gold = store.table("gold_items")
    if frame.empty or gold.empty:
        return pd.DataFrame(columns=["annotator", "gold_votes", "correct", "accuracy"])
    return ag.gold_accuracy(frame[frame["gold"].astype(bool)], gold).round(3)


def annotator_stats(store) -> pd.DataFrame:
    frame = store.judgments_frame(include_simulated=True)
    if frame.empty:
        return pd.DataFrame(columns=["annotator", "simulated", "judgments", "comparisons",
                                     "median_latency_ms"])
    return (frame.groupby(["annotator", "simulated"])
            .agg(judgments=("judgment_id", "size"), comparisons=("comparison_id", "nunique"),
                 median_latency_ms=("latency_ms", "median"))
            .reset_index().round(1))


def flagged_voters(store) -> pd.DataFrame:
    from labeling import agreement as ag

    frame = store.judgments_frame(include_simulated=False)
    frame = frame[~_machine(frame["annotator"])]
    if frame.empty:
        return pd.DataFrame(columns=["annotator", "votes", "p_value", "flagged", "flagged_at",
                                     "excluded"])
    table = ag.flag_annotators(frame)
    return table.assign(excluded=table["annotator"].isin(store.excluded_voters()))


def set_excluded(store, voter: str, excluded: bool, admin: str, reason: str = "") -> str:
    """Exclude a voter from the ratings, or count them again (recorded in the store with the
    admin's name and reason); returns the message for the admin."""
    voter = (voter or "").strip() if isinstance(voter, str) else ""
    if voter not in set(store.table("annotators")["name"]):
        return f"⚠️ No voter named `{voter}`."
    store.set_voter_excluded(voter, excluded, admin=admin, reason=reason)
    return (f"`{voter}` is excluded from the ratings." if excluded else
            f"`{voter}` counts in the ratings again.")


def export_zip(store, out_dir: Path) -> Path:
    """Parquet export (labels with image hashes + every table, human labels only) plus the
    images they reference, zipped."""
    from labeling import export

    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="mteditlab-export-", dir=out_dir))
    try:
        written = export.to_parquet(store, work / "parquet")
        rows = export.label_rows(store)
        shas = set()
        for column in [c for c in rows.columns if c.endswith("_sha")]:
            shas |= set(rows[column].dropna())
        target = out_dir / f"mteditlab-labels-{stamp}.zip"
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in written.values():
                zf.write(path, f"parquet/{path.relative_to(work / 'parquet')}")
            for sha in sorted(shas):
                zf.writestr(f"images/{sha}.png", store.image_bytes(sha))
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def skips_frame(store) -> pd.DataFrame:
    """Skips and flags of labeling items, oldest first: time, kind ('skip' or 'flag'),
    annotator, comparison_id, reason."""
    skips = store.skips()
    return pd.DataFrame({
        "time": skips["created_at"].dt.strftime("%Y-%m-%d %H:%M:%S"),
        "kind": skips["flagged"].map({True: "flag", False: "skip"}),
        "annotator": skips["annotator"], "comparison_id": skips["comparison_id"],
        "reason": skips["reason"]})
