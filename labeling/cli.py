"""``python -m labeling``: init, stats, leaderboard, agreement, export (and simulate, rate).

Global options: ``--data-dir`` (default: :func:`labeling.connection.data_dir`), ``--db`` (default
``<data dir>/labels.duckdb``) and ``--read-only`` (read the database, or a snapshot of it while
another process holds it).  Only commands that write create a missing database; a missing or
unreadable one is a single ``error:`` line on stderr and exit status 2.  Analysis commands print
which labels they use, with counts: human only by default, ``--include-simulated`` to mix in
simulated ones (used automatically, and said so, when there are no human labels).

Adding a subcommand from another module: give the module a ``register(subparsers)`` function
that calls ``subparsers.add_parser(...)`` and sets ``handler=`` (a function of the parsed args
returning an exit code; :func:`open_store` opens the database the global options name), then
add the module's name to :data:`EXTENSIONS` — one line.  A command that also sets
``passed_on=[]`` receives the arguments it does not declare there (another tool's command line).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pandas as pd

from labeling import agreement, ratings
from labeling.connection import default_db_path
from labeling.errors import SchemaVersionError, StoreError, StoreLockedError
from labeling.selection import LabelSelection
from labeling.store import LabelStore

EXTENSIONS: list[str] = ["labeling.simulate", "labeling.raters", "labeling.bench_items"]


def open_store(args: argparse.Namespace, writable: bool = False) -> LabelStore:
    """Open the database named by the global options (read-write unless ``--read-only``); only
    a ``writable`` command creates it when missing, for the others that is FileNotFoundError."""
    if writable and args.read_only:
        raise StoreError(f"`{args.command}` writes to the database; drop --read-only")
    missing = not writable and not args.db.exists()
    store = LabelStore.open(args.db, read_only=args.read_only or missing)  # refuses a missing file
    if store.snapshot_of is not None:
        print(f"note: process {store.snapshot_of} holds {store.path}; reading a snapshot "
              "copied just now", file=sys.stderr)
    return store


def turn_option(text: str) -> int | str:
    """``--turn``: a turn index (0-based) or 'overall'."""
    if text == "overall":
        return text
    if text.isascii() and text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(
        f"expected a turn index (0, 1, …) or 'overall', got {text!r}")


def add_label_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include-simulated", action=argparse.BooleanOptionalAction,
                        default=None, help="mix simulated labels in (default: human only, "
                        "or simulated when there are no human labels)")


def describe_selection(selection: LabelSelection) -> str:
    """The selection's counts and choice, with the flag that adds simulated labels left out."""
    hint = " (pass --include-simulated to add the simulated)" if selection.left_out else ""
    return selection.describe() + hint


def _select(store: LabelStore, args) -> pd.DataFrame:
    """The judgments the options select, after printing the counts behind the choice."""
    selection = store.label_selection(args.include_simulated)
    print(describe_selection(selection))
    return store.judgments_frame(selection.include_simulated)


def _show(title: str, frame: pd.DataFrame) -> None:
    print(f"\n## {title}")
    print(frame.to_string(index=False, float_format=lambda x: f"{x:.3f}") if len(frame)
          else "(none)")


def cmd_init(args) -> int:
    with open_store(args, writable=True) as store:
        print(f"{store.path}: schema v{store.schema_version()}, images in {store.images_dir}")
        _show("tables", pd.DataFrame(store.counts().items(), columns=["table", "rows"]))
    return 0


def cmd_stats(args) -> int:
    with open_store(args) as store:
        print(f"{store.path}: schema v{store.schema_version()}")
        _show("tables", pd.DataFrame(store.counts().items(), columns=["table", "rows"]))
        everything = store.judgments_frame(include_simulated=True)
        simulated = int(everything["simulated"].sum())
        print(f"\njudgments: {len(everything) - simulated} human, {simulated} simulated "
              "(broken down separately below)")
        if everything.empty:
            return 0
        everything["turn"] = everything["turn"].astype("string").fillna("overall")
        by = (everything.groupby(["simulated", "criterion", "turn"]).size()
              .rename("judgments").reset_index())
        _show("judgments by simulated, criterion, turn", by)
        per = everything.groupby(["annotator", "simulated"]).agg(
            judgments=("judgment_id", "size"), comparisons=("comparison_id", "nunique"),
            median_latency_ms=("latency_ms", "median")).reset_index()
        _show("annotators", per)
    return 0


def cmd_leaderboard(args) -> int:
    with open_store(args) as store:
        frame = _select(store, args)
    if args.criterion is not None:
        frame = frame[frame["criterion"] == args.criterion]
    if args.turn == "overall":
        frame = frame[frame["turn"].isna()]
    elif args.turn is not None:
        frame = frame[frame["turn"].eq(args.turn).fillna(False).astype(bool)]
    frame = ratings.battles(frame)
    print(f"battles: {len(frame)} (gold items excluded)")
    board = ratings.leaderboard(frame, by=args.by, n_boot=args.bootstrap, seed=args.seed,
                                min_battles=args.min_battles)
    _show(f"Bradley–Terry ratings{' by ' + args.by if args.by else ''} "
          f"({args.bootstrap} bootstrap rounds, seed {args.seed})", board)
    if frame.empty:
        return 0
    rates, counts = ratings.win_rate_matrix(frame)
    _show("win rate of row vs column (ties = ½)", rates.reset_index(names="model"))
    _show("battles", counts.reset_index(names="model"))
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        overall = board if args.by is None else ratings.ratings_table(
            frame, args.bootstrap, args.seed, min_battles=args.min_battles)
        ratings.plot_ratings(overall, args.plot_dir / "ratings.png")
        ratings.plot_win_rate_by_turn(frame, args.plot_dir / "win_rate_by_turn.png")
        print(f"\nplots: {args.plot_dir / 'ratings.png'}, "
              f"{args.plot_dir / 'win_rate_by_turn.png'}")
    return 0


def cmd_agreement(args) -> int:
    with open_store(args) as store:
        frame = _select(store, args)
        gold = store.table("gold_items")
    _show("agreement per criterion (units with >= 2 ratings; gold excluded)",
          agreement.agreement_table(frame, min_common=args.min_common))
    _show("gold accuracy per annotator", agreement.gold_accuracy(frame[frame["gold"]], gold))
    _show(f"improbable voters (sequential Fisher test, alpha {args.alpha})",
          agreement.flag_annotators(frame, alpha=args.alpha))
    return 0


def cmd_export(args) -> int:
    from labeling import export  # imports `datasets`, slow to load: only when exporting

    out = args.out or Path(args.db).parent / "exports" / args.format
    with open_store(args) as store:
        selection = store.label_selection(args.include_simulated)
        print(describe_selection(selection))
        if args.format == "hf":
            dataset = export.to_dataset(store, selection.include_simulated)
            dataset.save_to_disk(str(out))
            print(f"wrote {len(dataset)} rows to {out} (datasets.load_from_disk)")
        else:
            written = export.to_parquet(store, out, selection.include_simulated)
            print(f"wrote {len(written)} Parquet files to {out}: "
                  + ", ".join(p.name for p in written.values()))
    return 0


def _register_builtin(sub) -> None:
    sub.add_parser("init", help="create or migrate the database").set_defaults(
        handler=cmd_init)
    sub.add_parser("stats", help="row counts and label breakdown").set_defaults(
        handler=cmd_stats)

    p = sub.add_parser("leaderboard", help="Bradley–Terry ratings with bootstrap intervals")
    add_label_options(p)
    p.add_argument("--by", choices=ratings.GROUPINGS, help="one leaderboard per value")
    p.add_argument("--criterion", help="only this criterion")
    p.add_argument("--turn", type=turn_option,
                   help="only this turn index (0 = the first turn), or 'overall'")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds")
    p.add_argument("--min-battles", type=int, default=20, metavar="N",
                   help="models with fewer battles are listed as provisional, not ranked "
                   "(default 20; 0 ranks every model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot-dir", type=Path, help="write ratings.png and win_rate_by_turn.png")
    p.set_defaults(handler=cmd_leaderboard)

    p = sub.add_parser("agreement", help="α, κ, gold accuracy, improbable voters")
    add_label_options(p)
    p.add_argument("--min-common", type=int, default=5,
                   help="shared units for a Cohen's κ pair")
    p.add_argument("--alpha", type=float, default=0.01, help="level of the voter test")
    p.set_defaults(handler=cmd_agreement)

    p = sub.add_parser("export", help="Hugging Face dataset or Parquet")
    add_label_options(p)
    p.add_argument("--format", choices=("hf", "parquet"), default="hf")
    p.add_argument("--out", type=Path, help="output directory "
                   "(default: <db dir>/exports/<format>)")
    p.set_defaults(handler=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labeling", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="data directory (default $MTEDITLAB_DATA, else /data/mteditlab on a "
                        "Space with persistent storage, else ./data)")
    parser.add_argument("--db", help="database file (default <data dir>/labels.duckdb)")
    parser.add_argument("--read-only", action="store_true",
                        help="open read-only; reads a snapshot while another process holds it")
    sub = parser.add_subparsers(dest="command", required=True)
    _register_builtin(sub)
    for name in EXTENSIONS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, "passed_on"):   # a command that passes its other arguments on (queue-bench)
        args.passed_on = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.db = Path(args.db) if args.db else default_db_path(args.data_dir)
    try:
        return args.handler(args)
    except (StoreError, FileNotFoundError) as exc:
        print(f"error: {exc}{_hint(exc, args.db)}", file=sys.stderr)
        return 2


def _hint(exc: Exception, db: Path) -> str:
    """The commands that get past ``exc`` on database ``db`` (empty when none apply); on the
    error's line unless there are several."""
    if isinstance(exc, StoreLockedError):
        return (f"\nTo read it meanwhile, take a snapshot:\n"
                f"  python -m labeling --db {db} --read-only stats   (or leaderboard, agreement)\n"
                f"  python -m labeling --db {db} --read-only export --format parquet --out DIR")
    if isinstance(exc, SchemaVersionError) and exc.older:
        return f"\nMigrate it: python -m labeling --db {db} init"
    if isinstance(exc, FileNotFoundError) and not Path(db).exists():
        return f"; create one with: python -m labeling --db {db} init"
    return ""
