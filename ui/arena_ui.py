"""The Arena tab: components, events and the API endpoints they expose.

Every event returns the same list of outputs, rendered from the state by :func:`_render`, so
the screen always shows exactly what the server holds.  Public API endpoints (for
``gradio_client``; the state stays on the server, keyed by the client's session):

* ``/start_random()``, ``/start_example(example)``, ``/start_upload(file)``
* ``/edit(instruction, seed, steps)`` (``seed`` None: the session's default seed, a new random
  one for each session, answered by the calls that start a session)
* ``/vote_left|/vote_right|/vote_tie|/vote_both_bad(turn, criterion)``
* ``/undo()``, ``/fork(turn)``, ``/reset()``, ``/end_session()`` (reveals the names)
* ``/settings(use_intent, show_verdict, anonymous)``
"""

from __future__ import annotations

import logging
import time

import gradio as gr

from .arena import Arena, finish_state
from .arena_state import CRITERIA, MAX_SEED, ArenaError, ArenaState
from .screen import PICKS
from .text import NO_LATEX
from .worldview import EXAMPLES, GRAMMAR

log = logging.getLogger("mteditlab.ui")
VOTE_LABELS = {"left": "👈 A is better", "right": "👉 B is better", "tie": "🤝 Tie",
               "both_bad": "👎 Both bad"}
# browser-side steps (no request to the server): the vote buttons follow `votable`, and after
# an edit the instruction box is emptied only if it still holds the instruction carried out
VOTE_BUTTONS_JS = f"(v) => Array({len(PICKS)}).fill({{__type__: 'update', interactive: !!v}})"
CLEAR_DONE_JS = "(box, done) => (done && box === done) ? '' : {__type__: 'update'}"


def voter_name(ctx, request: gr.Request | None) -> str:
    """Arena voters: the signed-in user, else one anonymous id per browser session (a keyed
    hash of its session hash, never the hash itself: see :mod:`ui.context`)."""
    username = getattr(request, "username", None)
    if username:
        return f"arena:{username}"
    return ctx.voter(getattr(request, "session_hash", None))


def build_arena_tab(ctx, arena: Arena) -> None:
    engine = ctx.engine
    default_steps = ctx.config.steps or engine.default_steps()
    state = gr.State(ArenaState(anonymous_next=ctx.config.anonymous, arena_key=arena.key),
                     delete_callback=finish_state)

    if engine.world:
        with gr.Accordion("What the mini editor understands (grammar)", open=False):
            gr.Markdown(GRAMMAR, elem_id="arena-grammar")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=220):
            source = gr.Image(label="Source", interactive=False, height=220, format="png",
                              elem_id="arena-source", buttons=[])
            random_btn = gr.Button("🎲 Random scene (test split)", elem_id="arena-random")
            with gr.Row():
                example = gr.Dropdown([f"Example {i + 1}" for i in range(len(EXAMPLES))],
                                      value=None, label="Examples", scale=2,
                                      elem_id="arena-example")
                upload = gr.UploadButton("📤 Upload image", file_types=["image"],
                                         file_count="single", type="filepath", scale=1,
                                         elem_id="arena-upload")
        columns = {}
        for screen, name in (("left", "A"), ("right", "B")):
            with gr.Column(scale=3, min_width=260):
                title = gr.Markdown(f"### Model {name}", elem_id=f"arena-title-{screen}")
                image = gr.Image(label=f"Model {name}: latest turn", interactive=False,
                                 height=260, format="png", elem_id=f"arena-img-{screen}",
                                 buttons=[])
                # what this side's editor used in the latest turn (its own reconstructor's intent)
                told = gr.Markdown("", elem_id=f"arena-intent-{screen}",
                                   elem_classes=["arena-intent"], latex_delimiters=NO_LATEX)
                gallery = gr.Gallery(label=f"Model {name}: every turn (source first)",
                                     columns=6, height=150, format="png",
                                     object_fit="contain", allow_preview=True, buttons=[],
                                     elem_id=f"arena-strip-{screen}",
                                     elem_classes=["arena-strip"])
            columns[screen] = (title, image, gallery, told)
    with gr.Row(elem_id="arena-vote-row"):
        vote_btns = {pick: gr.Button(VOTE_LABELS[pick], interactive=False, scale=2,
                                     elem_id=f"arena-vote-{pick}") for pick in PICKS}
        criterion = gr.Dropdown(list(CRITERIA), value="overall", label="Criterion (optional)",
                                scale=1, min_width=150, elem_id="arena-criterion")
    # what the browser itself acts on (see render): whether the latest turn takes a vote, and
    # the instruction an edit just carried out
    votable = gr.Checkbox(False, visible="hidden", label="can vote", elem_id="arena-votable")
    accepted = gr.Textbox("", visible="hidden", label="instruction carried out",
                          elem_id="arena-accepted")
    turn_no = gr.Number(value=0, precision=0, visible=False, label="turn")
    status = gr.Markdown("Start with **🎲 Random scene**, an **example** or **upload** an image.",
                         elem_id="arena-status", latex_delimiters=NO_LATEX)
    with gr.Row():
        instruction = gr.Textbox(label="Instruction", scale=5, max_lines=2,
                                 placeholder="e.g. add a small red circle at the top left",
                                 elem_id="arena-instruction")
        edit_btn = gr.Button("✏️ Edit both", variant="primary", scale=1, elem_id="arena-edit")
    suggestions = gr.Dropdown([], value=None, label="Suggested instructions (from the scripted "
                              "test session)", allow_custom_value=False,
                              elem_id="arena-suggestions")
    history = gr.Markdown(elem_id="arena-history", latex_delimiters=NO_LATEX)
    with gr.Row():
        undo_btn = gr.Button("↩️ Undo last turn", elem_id="arena-undo", scale=2)
        fork_no = gr.Number(value=0, precision=0, minimum=0, label="Fork from turn (0 = source)",
                            scale=1, min_width=120, elem_id="arena-fork-turn")
        fork_btn = gr.Button("🌿 Fork from that turn", elem_id="arena-fork", scale=2)
        reset_btn = gr.Button("🔄 Reset session", elem_id="arena-reset", scale=2)
        end_btn = gr.Button("🏁 End session & reveal the models", elem_id="arena-end", scale=2)
    with gr.Accordion("Settings", open=False, elem_id="arena-settings"):
        with gr.Row():
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED,
                             label="Seed (same for both sides; turn k uses a seed derived "
                             "from it; a new random one for each session)",
                             elem_id="arena-seed")
            steps = gr.Slider(1, 50, value=default_steps, step=1, label="Sampling steps",
                              elem_id="arena-steps")
        with gr.Row():
            use_intent = gr.Checkbox(True, label="Reconstruct the intent (Edit-R2): each side's "
                                     "reconstructor tells its editor what the instruction means",
                                     elem_id="arena-intent")
            show_verdict = gr.Checkbox(False, label="Show the verifier's verdict per turn "
                                       "(world scenes)", elem_id="arena-verdict")
            anonymous = gr.Checkbox(ctx.config.anonymous, label="Anonymous: shuffle the sides "
                                    "and hide the models until you end the session (applies "
                                    "to the next session)",
                                    elem_id="arena-anonymous")

    outputs = [state, source, columns["left"][0], columns["right"][0], columns["left"][1],
               columns["right"][1], columns["left"][2], columns["right"][2], status, turn_no,
               votable, fork_no, suggestions, accepted, seed, columns["left"][3],
               columns["right"][3], history]

    def render(st: ArenaState, done: bool = False, new_session: bool = False) -> list:
        """All outputs from the state.  Pictures are always plain values (display file paths):
        any ``gr.update(...)``, even an empty one, makes gradio rebuild that component and its
        API schema on the server's event loop (a gallery's costs milliseconds), which under load
        was most of the event loop's time.  So the vote buttons get no update either: the answer
        says whether the latest turn takes a vote (``votable``) and the browser enables them
        (:data:`VOTE_BUTTONS_JS`).  ``done``: an edit just went through, and the answer
        carries its instruction as the state holds it (checked text, never what the request
        sent): the browser empties the instruction box if it still holds that text, so what
        the person typed meanwhile stays (:data:`CLEAR_DONE_JS`).  ``new_session`` re-sends the
        suggestions list and the session's default seed (only a new session changes them)."""
        src = ctx.display.path(st.source) if st.source else None
        cur_l, cur_r = arena.current(st, "left"), arena.current(st, "right")
        strip_l, strip_r = arena.strip(st, "left"), arena.strip(st, "right")
        if new_session:
            suggestion_box = gr.update(choices=list(dict.fromkeys(st.suggestions)), value=None)
            seed_box = st.seed
        else:
            suggestion_box, seed_box = None, gr.skip()
        return [st, src, arena.title(st, "left"), arena.title(st, "right"),
                cur_l, cur_r, strip_l, strip_r, arena.status(st), st.n, st.can_vote(),
                gr.update(value=max(0, st.n - 1), maximum=max(0, st.n)),
                suggestion_box, st.turns[-1].instruction if done else "", seed_box,
                arena.told(st, "left"), arena.told(st, "right"), arena.history(st)]

    def run(op, st: ArenaState, request: gr.Request | None, *args, done: bool = False,
            new_session: bool = False):
        key = getattr(request, "session_hash", None) or st.arena_id or "anon"
        name = getattr(op, "__name__", "op")
        waited = time.perf_counter()
        with ctx.lock_for(key):
            ctx.timings.add(f"{name}: session lock wait", time.perf_counter() - waited)
            start = time.perf_counter()
            try:
                st.message = op(st, *args)
                ok = True
            except ArenaError as exc:
                st.message = f"⚠️ {exc}"
                gr.Warning(str(exc))
                ok = False
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                log.exception("arena operation %s failed", name)
                st.message = (f"⚠️ Something went wrong on the server ({type(exc).__name__}); "
                              "the session is unchanged.")
                gr.Warning(st.message)
                ok = False
            ctx.timings.add(f"{name}: handler", time.perf_counter() - start)
            with ctx.timings.timed(f"{name}: render answer (display files)"):
                return render(st, done=done and ok, new_session=new_session and ok)

    def on_random(st, request: gr.Request):
        return run(arena.start_random, st, request, new_session=True)

    def on_example(st, choice, request: gr.Request):
        if not choice:
            return render(st)
        number = str(choice).replace("Example", "").strip()
        return run(arena.start_example, st, request, number, new_session=True)

    def on_upload(st, file, request: gr.Request):
        return run(arena.start_upload, st, request, file, new_session=True)

    def on_edit(st, text, seed_value, steps_value, request: gr.Request,
                progress=gr.Progress()):
        def report(fraction, desc):
            progress(fraction, desc=desc)
        return run(arena.edit, st, request, text, seed_value, steps_value, report, done=True)

    def make_vote(pick):
        def on_vote(st, turn, crit, request: gr.Request):
            def vote(s, t, c):
                return arena.vote(s, pick, t, c, voter_name(ctx, request))
            return run(vote, st, request, turn, crit)
        on_vote.__name__ = f"vote_{pick}"
        return on_vote

    def on_undo(st, request: gr.Request):
        return run(arena.undo, st, request)

    def on_fork(st, turn, request: gr.Request):
        return run(arena.fork, st, request, turn)

    def on_reset(st, request: gr.Request):
        return run(arena.reset, st, request, new_session=True)

    def on_end(st, request: gr.Request):
        return run(arena.end_session, st, request)

    def on_settings(st, intent_on, verdict_on, anonymous_on, request: gr.Request):
        def apply(s, a, b, c):
            s.use_intent, s.show_verdict, s.anonymous_next = bool(a), bool(b), bool(c)
            return s.message
        return run(apply, st, request, intent_on, verdict_on, anonymous_on)

    random_btn.click(on_random, [state], outputs, api_name="start_random")
    example.input(on_example, [state, example], outputs, api_name="start_example")
    upload.upload(on_upload, [state, upload], outputs, api_name="start_upload")
    # the progress shows on what the edit changes (both sides' pictures and the status); the
    # source, the instruction box and the controls stay usable while the editors run
    edit_event = dict(fn=on_edit, inputs=[state, instruction, seed, steps], outputs=outputs,
                      concurrency_limit=None,
                      show_progress_on=[columns["left"][1], columns["right"][1], status])
    for trigger, api in ((edit_btn.click, dict(api_name="edit")),
                         (instruction.submit, dict(api_visibility="private"))):
        trigger(**edit_event, **api).then(None, [instruction, accepted], [instruction],
                                          js=CLEAR_DONE_JS)
    votable.change(None, [votable], list(vote_btns.values()), js=VOTE_BUTTONS_JS)
    suggestions.input(lambda s: s or gr.update(), [suggestions], [instruction],
                      api_visibility="private")
    for pick, btn in vote_btns.items():
        btn.click(make_vote(pick), [state, turn_no, criterion], outputs, api_name=f"vote_{pick}")
    undo_btn.click(on_undo, [state], outputs, api_name="undo")
    fork_btn.click(on_fork, [state, fork_no], outputs, api_name="fork")
    reset_btn.click(on_reset, [state], outputs, api_name="reset")
    end_btn.click(on_end, [state], outputs, api_name="end_session")
    settings_inputs = [state, use_intent, show_verdict, anonymous]
    gr.on([use_intent.input, show_verdict.input, anonymous.input], on_settings, settings_inputs,
          outputs, api_name="settings")
