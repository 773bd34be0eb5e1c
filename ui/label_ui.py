"""The Label tab: sign-in, the item with its rubric, per-turn and overall judgments, keys.

Public API endpoints: ``/label_sign_in(name, password)``, ``/label_next()``,
``/label_submit(item, turn_1 … turn_8, overall)``, ``/label_skip(item)``,
``/label_flag(item, reason)``, ``/label_sign_out()``.  Choices are screen sides: ``left``,
``right``, ``tie``, ``both_bad``.  Every endpoint returns, right after the header, the id of the
item now on screen (None when there is none); submit, skip and flag send it back as ``item``,
and one naming any other item is refused (see :mod:`ui.label`).
"""

from __future__ import annotations

import logging

import gradio as gr

from .config import oauth_available
from .label import MAX_LABEL_TURNS, RUBRIC, LabelError, Labeling, LabelState
from .text import NO_LATEX, md_literal

log = logging.getLogger("mteditlab.ui")
CHOICES = [("1 · Left better", "left"), ("2 · Right better", "right"), ("3 · Tie", "tie"),
           ("4 · Both bad", "both_bad")]

SHORTCUTS_JS = """
() => {
  if (window.__mteditlabKeys) return;
  window.__mteditlabKeys = true;
  document.addEventListener('keydown', (event) => {
    const target = event.target;
    const typing = target && (target.tagName === 'TEXTAREA' || target.isContentEditable ||
      (target.tagName === 'INPUT' && !['radio', 'checkbox', 'button'].includes(target.type)));
    if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
    const panel = document.querySelector('#label-item');
    if (!panel || panel.offsetParent === null) return;
    const groups = [...panel.querySelectorAll('.label-choice')].filter((g) => g.offsetParent !== null);
    if (['1', '2', '3', '4'].includes(event.key)) {
      const open = groups.find((g) => !g.querySelector('input:checked')) || groups[groups.length - 1];
      if (!open) return;
      const inputs = open.querySelectorAll('input[type=radio]');
      const input = inputs[Number(event.key) - 1];
      if (input) { input.click(); event.preventDefault(); }
    } else if (event.key === 'Enter') {
      document.querySelector('#label-submit')?.click(); event.preventDefault();
    } else if (event.key === 's' || event.key === 'S') {
      document.querySelector('#label-skip')?.click(); event.preventDefault();
    }
  });
}
"""


def build_label_tab(ctx, labeling: Labeling, demo: gr.Blocks) -> None:
    state = gr.State(LabelState())
    if not labeling.open:
        gr.Markdown("**Labeling is closed on this server**: no annotator credentials are "
                    "configured. Start the app with `--annotators name:password,…` (or set "
                    "`MTEDITLAB_ANNOTATORS`; on a Space, `--hf-annotators`).",
                    elem_id="label-closed")
    with gr.Row(elem_id="label-signin-row"):
        name = gr.Textbox(label="Annotator", scale=2, elem_id="label-name")
        password = gr.Textbox(label="Password", type="password", scale=2, elem_id="label-password")
        sign_in = gr.Button("Sign in", variant="primary", scale=1, elem_id="label-sign-in")
        sign_out = gr.Button("Sign out", scale=1, elem_id="label-sign-out")
        hf_login = gr.LoginButton(scale=1) if oauth_available() and ctx.config.hf_annotators \
            else None
    if ctx.config.hf_annotators and hf_login is None:
        gr.Markdown("*Hugging Face sign-in is configured but unavailable here: it needs a Space "
                    "with `hf_oauth: true` and `gradio[oauth]` installed.*")
    header = gr.Markdown("Sign in to start labeling.", elem_id="label-header")
    item_id = gr.Number(None, precision=0, visible=False, elem_id="label-item-id")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=240):
            gr.Markdown(RUBRIC, elem_id="label-rubric")
        with gr.Column(scale=4, visible=False, elem_id="label-item") as item_col:
            with gr.Row(equal_height=False):
                source = gr.Image(label="Source", interactive=False, height=180, format="png",
                                  buttons=[], elem_id="label-source", scale=1)
                history = gr.Markdown(elem_id="label-history", latex_delimiters=NO_LATEX)
            rows, texts, lefts, rights, radios = [], [], [], [], []
            for k in range(MAX_LABEL_TURNS):
                with gr.Row(visible=False, equal_height=True, elem_id=f"label-turn-{k}") as row:
                    texts.append(gr.Markdown(min_width=180, latex_delimiters=NO_LATEX))
                    lefts.append(gr.Image(label=f"Left · turn {k + 1}", interactive=False,
                                          height=160, format="png", buttons=[], min_width=160))
                    rights.append(gr.Image(label=f"Right · turn {k + 1}", interactive=False,
                                           height=160, format="png", buttons=[], min_width=160))
                    radios.append(gr.Radio(CHOICES, label=f"Turn {k + 1}", min_width=200,
                                           elem_id=f"label-choice-{k}",
                                           elem_classes=["label-choice"]))
                rows.append(row)
            overall = gr.Radio(CHOICES, label="Whole session: which side is better overall?",
                               elem_id="label-overall", elem_classes=["label-choice"])
            with gr.Row():
                submit = gr.Button("✅ Submit (Enter)", variant="primary", elem_id="label-submit")
                skip = gr.Button("⏭️ Skip (S)", elem_id="label-skip")
                reason = gr.Textbox(label="Flag reason", scale=2, elem_id="label-flag-reason",
                                    placeholder="e.g. broken image, unreadable instruction")
                flag = gr.Button("🚩 Flag", elem_id="label-flag")
    status = gr.Markdown(elem_id="label-status")

    outputs = [state, header, item_id, item_col, source, history, *rows, *texts, *lefts, *rights,
               *radios, overall, status]

    def render(st: LabelState) -> list:
        item = st.item if st.item and not st.item.get("done") else None
        if st.annotator:
            done, total = labeling.progress(st)
            head = (f"Signed in as **{st.annotator}** · item **{done + 1} of {total}** "
                    f"(judged so far: {done})" if item else
                    f"Signed in as **{st.annotator}** · judged: {done} · nothing to show")
        else:
            head = "Sign in to start labeling."
        n = item["shown"] if item else 0
        updates = [st, head, item["comparison_id"] if item else None,
                   gr.update(visible=item is not None)]
        if item:
            src = ctx.display.path(item["source"], 192)
            lines = [f"{k + 1}. {md_literal(text)}" for k, text in enumerate(item["instructions"])]
            updates += [src, "**Instructions, in order**\n\n" + "\n".join(lines)]
        else:
            updates += [None, ""]
        updates += [gr.update(visible=k < n) for k in range(MAX_LABEL_TURNS)]
        updates += [f"**Turn {k + 1}**\n\n{md_literal(item['instructions'][k])}" if k < n else ""
                    for k in range(MAX_LABEL_TURNS)]
        for side_key in ("left", "right"):
            for k in range(MAX_LABEL_TURNS):
                if k < n:
                    side = item["left"] if side_key == "left" else "AB".replace(item["left"], "")
                    updates.append(ctx.display.path(item["outputs"][side][k], 160))
                else:
                    updates.append(None)
        updates += [gr.update(value=None) for _ in range(MAX_LABEL_TURNS)]
        updates += [gr.update(value=None), st.message]
        return updates

    def keep_choices(updates: list) -> list:
        """Leave the radios as they are on screen (the per-turn radios and the overall one are
        the outputs just before the status)."""
        for i in range(len(updates) - 2 - MAX_LABEL_TURNS, len(updates) - 1):
            updates[i] = gr.update()
        return updates

    def run(op, st: LabelState, request: gr.Request | None, *args):
        key = "label:" + (getattr(request, "session_hash", None) or "anon")
        with ctx.lock_for(key):
            try:
                st.message = op(st, *args)
            except LabelError as exc:
                st.message = f"⚠️ {exc}"
                gr.Warning(str(exc))
                return keep_choices(render(st))
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                log.exception("label operation failed")
                st.message = f"⚠️ Something went wrong on the server ({type(exc).__name__})."
                gr.Warning(st.message)
                return keep_choices(render(st))
            return render(st)

    def on_sign_in(st, user, pw, request: gr.Request):
        return run(labeling.sign_in, st, request, user, pw)

    def on_sign_out(st, request: gr.Request):
        return run(labeling.sign_out, st, request)

    def on_next(st, request: gr.Request):
        return run(labeling.next_item, st, request)

    assert MAX_LABEL_TURNS == 8, "on_submit spells out one parameter per turn row"

    def on_submit(st, item, t1, t2, t3, t4, t5, t6, t7, t8, overall_value,
                  request: gr.Request):
        turns = [t1, t2, t3, t4, t5, t6, t7, t8]
        return run(labeling.submit, st, request, item, turns, overall_value)

    def on_skip(st, item, request: gr.Request):
        return run(labeling.skip, st, request, item)

    def on_flag(st, item, why, request: gr.Request):
        return run(labeling.flag, st, request, item, why)

    sign_in.click(on_sign_in, [state, name, password], outputs, api_name="label_sign_in")
    password.submit(on_sign_in, [state, name, password], outputs, api_visibility="private")
    sign_out.click(on_sign_out, [state], outputs, api_name="label_sign_out")
    gr.Button("Next item", visible=False).click(on_next, [state], outputs, api_name="label_next")
    submit.click(on_submit, [state, item_id, *radios, overall], outputs,
                 api_name="label_submit")
    skip.click(on_skip, [state, item_id], outputs, api_name="label_skip")
    flag.click(on_flag, [state, item_id, reason], outputs, api_name="label_flag")
    for key, radio in [(f"t{k}", r) for k, r in enumerate(radios)] + [("overall", overall)]:
        radio.input(lambda st, key=key: labeling.note_choice(st, key), [state], None,
                    api_visibility="private", queue=False)

    if hf_login is not None:
        def on_hf(st, request: gr.Request, profile: gr.OAuthProfile | None):
            if profile is None or st.annotator:
                return render(st)
            return run(labeling.sign_in_hf, st, request, getattr(profile, "username", None))

        demo.load(on_hf, [state], outputs, api_visibility="private")
