"""The Leaderboard tab (public) and its admin panel (behind an admin credential).

Public API endpoints: ``/leaderboard(source, blind_only, criterion)`` (ranked models; those
under ``--min-battles`` battles apart as provisional, with notes on open intervals; beside
them the style-controlled ratings, see :func:`ui.leaderboard.style_control`); admin:
``/admin_sign_in(name, password)``, ``/admin_refresh()``, ``/admin_export()``,
``/admin_seed_queue(n_sessions, n_turns)``, ``/admin_exclude_voter(voter, reason)``,
``/admin_restore_voter(voter, reason)`` — each admin endpoint re-checks the server-side admin
flag.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import gradio as gr

from . import leaderboard as lb
from .arena_state import CRITERIA

log = logging.getLogger("mteditlab.ui")


@dataclasses.dataclass
class AdminState:
    admin: str | None = None


def build_leaderboard_tab(ctx, demo: gr.Blocks, tab: gr.Tab) -> None:
    plot_dir = Path(tempfile.mkdtemp(prefix="mteditlab-plots-"))
    with gr.Row():
        source = gr.Radio(list(lb.SOURCES), value=lb.SOURCES[0], label="Votes",
                          elem_id="lb-source")
        blind = gr.Checkbox(True, label="Blind votes only (cast while the model names were "
                            "hidden); untick to include non-blind arena votes",
                            elem_id="lb-blind")
        criterion = gr.Dropdown([lb.CRITERIA_ALL, *CRITERIA], value=lb.CRITERIA_ALL,
                                label="Criterion", elem_id="lb-criterion")
        refresh = gr.Button("🔄 Refresh", elem_id="lb-refresh")
    summary = gr.Markdown(elem_id="lb-summary")
    with gr.Row(equal_height=False):
        ratings_plot = gr.Image(label="Bradley–Terry ratings (95% intervals)", format="png",
                                show_label=False, interactive=False, buttons=["download"],
                                elem_id="lb-plot")
        turn_plot = gr.Image(label="Win rate by turn index", format="png", show_label=False,
                             interactive=False, buttons=["download"], elem_id="lb-turn-plot")
    with gr.Row(equal_height=False):
        ratings_table = gr.Dataframe(label="Ratings", interactive=False, elem_id="lb-table",
                                     scale=3)
        style_table = gr.Dataframe(label="Style-controlled ratings (image quality and tint "
                                   "held equal)", interactive=False, elem_id="lb-style",
                                   scale=2)
    ratings_notes = gr.Markdown(elem_id="lb-notes")
    style_note = gr.Markdown(elem_id="lb-style-note")
    provisional = gr.Dataframe(label=f"Provisional: fewer than {ctx.config.min_battles} "
                               "battles, not ranked", interactive=False, visible=False,
                               elem_id="lb-provisional")
    turn_table = gr.Dataframe(label="Win rate by turn", interactive=False, max_height=300)
    agreement = gr.Dataframe(label="Inter-annotator agreement per criterion (units judged by "
                             "≥ 2 people; gold excluded)", interactive=False)
    gr.Markdown("### Judge and reward model vs humans")
    machines_note = gr.Markdown(elem_id="lb-machines-note")
    machines = gr.Dataframe(label="Live: automatic raters vs the human majority on the same "
                            "units", interactive=False, visible=False)

    with gr.Accordion("Admin", open=False):
        admin_state = gr.State(AdminState())
        with gr.Row():
            admin_name = gr.Textbox(label="Admin", scale=2, elem_id="admin-name")
            admin_pw = gr.Textbox(label="Password", type="password", scale=2,
                                  elem_id="admin-password")
            admin_btn = gr.Button("Sign in", scale=1, elem_id="admin-sign-in")
        admin_status = gr.Markdown(elem_id="admin-status")
        with gr.Column(visible=False) as admin_panel:
            with gr.Row():
                admin_refresh = gr.Button("🔄 Refresh admin views")
                export_btn = gr.Button("📦 Export labels (Parquet + images, zip)")
                export_file = gr.File(label="Export", interactive=False)
            with gr.Row():
                seed_n = gr.Number(20, precision=0, minimum=1, maximum=500,
                                   label="Seed the labeling queue: world test sessions")
                seed_turns = gr.Number(3, precision=0, minimum=1, maximum=8, label="turns each")
                seed_btn = gr.Button("➕ Add to the queue")
            per_annotator = gr.Dataframe(label="Annotators (judgments, median ms per judgment)",
                                         interactive=False)
            gold = gr.Dataframe(label="Gold accuracy per annotator (scored silently)",
                                interactive=False)
            voters = gr.Dataframe(label="Improbable voters (sequential test against everyone "
                                  "else's votes)", interactive=False)
            with gr.Row():
                exclude_name = gr.Textbox(label="Voter (as listed above)", scale=2,
                                          elem_id="admin-voter")
                exclude_reason = gr.Textbox(label="Reason", scale=2, elem_id="admin-reason")
                exclude_btn = gr.Button("🚫 Exclude from the ratings", scale=1,
                                        elem_id="admin-exclude")
                restore_btn = gr.Button("↩️ Count again", scale=1, elem_id="admin-restore")
            excluded = gr.Dataframe(label="Exclusions (newest first; the latest per voter holds)",
                                    interactive=False, elem_id="admin-exclusions")
            events = gr.Dataframe(label="Flags and skips from the Label tab", interactive=False)

    board_outputs = [summary, ratings_plot, turn_plot, ratings_table, turn_table, agreement,
                     machines_note, machines, style_table, style_note, ratings_notes,
                     provisional]

    def on_refresh(src, blind_only, crit):
        try:
            frame = lb.human_frame(ctx.store, src, bool(blind_only), crit)
            table, plot, by_turn, tplot, prov, notes = lb.ratings(frame, plot_dir,
                                                                  ctx.config.min_battles)
            agree = lb.agreement(frame)
            machine = lb.machine_agreement(ctx.store)
            report = lb.reward_model_report(ctx.config.reward_model)
        except Exception:  # noqa: BLE001
            return [lb.server_error("The leaderboard"), None, None, None, None, None, "",
                    gr.update(visible=False), None, "", "", gr.update(visible=False)]
        try:
            style, style_text = lb.style_control(ctx.store, frame, table,
                                                 world=ctx.engine.world)
        except Exception:  # noqa: BLE001 - the plain board still shows
            style, style_text = None, lb.server_error("Style control")
        for old in plot_dir.glob("*.png"):  # keep the plot directory small
            if time.time() - old.stat().st_mtime > 600:
                old.unlink(missing_ok=True)
        note = report
        if not len(machine):
            note += ("\n\n*Live agreement appears once automatic raters' verdicts are in the "
                     "store (annotators named `judge:…` / `reward:…`).*")
        return [lb.summary(frame), str(plot) if plot else None, str(tplot) if tplot else None,
                table, by_turn, agree, note, gr.update(value=machine, visible=bool(len(machine))),
                style, style_text, notes, gr.update(value=prov, visible=bool(len(prov)))]

    board_inputs = [source, blind, criterion]
    refresh.click(on_refresh, board_inputs, board_outputs, api_name="leaderboard")
    gr.on([source.input, blind.input, criterion.input], on_refresh, board_inputs, board_outputs,
          api_visibility="private")
    tab.select(on_refresh, board_inputs, board_outputs, api_visibility="private")

    admin_outputs = [admin_state, admin_status, admin_panel, per_annotator, gold, voters, events,
                     excluded]

    def admin_views(st: AdminState, message: str) -> list:
        if not st.admin:
            return [st, message, gr.update(visible=False), None, None, None, None, None]
        try:
            return [st, message, gr.update(visible=True), lb.annotator_stats(ctx.store),
                    lb.gold_accuracy(ctx.store), lb.flagged_voters(ctx.store),
                    lb.skips_frame(ctx.store), ctx.store.exclusion_log()]
        except Exception as exc:  # noqa: BLE001
            log.exception("admin views failed")
            return [st, f"⚠️ {type(exc).__name__}: {exc}", gr.update(visible=True), None, None,
                    None, None, None]

    def on_admin(st: AdminState, name, password):
        if not ctx.config.admins:
            return admin_views(st, "⚠️ No admin credentials are configured "
                               "(--admin or MTEDITLAB_ADMIN).")
        if not isinstance(name, str) or not ctx.config.admins.check(name, password or ""):
            time.sleep(0.3)
            st.admin = None
            return admin_views(st, "⚠️ " + (ctx.config.admins.lockout(name)
                                            or "Unknown admin or wrong password."))
        st.admin = name.strip()
        return admin_views(st, f"Signed in as admin **{st.admin}**. Labels database: "
                           f"`{ctx.store.path}`")

    def on_admin_refresh(st: AdminState):
        return admin_views(st, "" if st.admin else "⚠️ Admin sign-in required.")

    def on_export(st: AdminState):
        if not st.admin:
            gr.Warning("Admin sign-in required.")
            return None
        try:
            out = Path(tempfile.mkdtemp(prefix="mteditlab-dl-"))
            return str(lb.export_zip(ctx.store, out))
        except Exception as exc:  # noqa: BLE001
            log.exception("export failed")
            gr.Warning(f"Export failed: {type(exc).__name__}: {exc}")
            return None

    def on_seed(st: AdminState, n, turns):
        if not st.admin:
            return admin_views(st, "⚠️ Admin sign-in required.")
        from .label import SEED_ORIGIN, populate_queue

        try:
            n, turns = int(n), int(turns)
            if not (1 <= n <= 500 and 1 <= turns <= 8):
                raise ValueError("1–500 sessions of 1–8 turns")
            start = ctx.store.next_session_index(SEED_ORIGIN)
            made = populate_queue(ctx, n, turns, start=start)
            message = (f"Added {made['comparisons']} comparisons and {made['gold']} gold items "
                       "to the labeling queue.")
        except Exception as exc:  # noqa: BLE001
            log.exception("seeding the queue failed")
            message = f"⚠️ Could not seed the queue: {type(exc).__name__}: {exc}"
        return admin_views(st, message)

    def make_exclusion(excluded: bool):
        def on_exclusion(st: AdminState, voter, reason):
            if not st.admin:
                return admin_views(st, "⚠️ Admin sign-in required.")
            return admin_views(st, lb.set_excluded(ctx.store, voter, excluded, st.admin, reason))
        return on_exclusion

    exclusion_inputs = [admin_state, exclude_name, exclude_reason]
    exclude_btn.click(make_exclusion(True), exclusion_inputs, admin_outputs,
                      api_name="admin_exclude_voter")
    restore_btn.click(make_exclusion(False), exclusion_inputs, admin_outputs,
                      api_name="admin_restore_voter")
    admin_btn.click(on_admin, [admin_state, admin_name, admin_pw], admin_outputs,
                    api_name="admin_sign_in")
    admin_refresh.click(on_admin_refresh, [admin_state], admin_outputs, api_name="admin_refresh")
    export_btn.click(on_export, [admin_state], [export_file], api_name="admin_export")
    seed_btn.click(on_seed, [admin_state, seed_n, seed_turns], admin_outputs,
                   api_name="admin_seed_queue")
