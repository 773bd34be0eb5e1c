"""Assemble the app: ``build_app(config) -> gr.Blocks`` and ``launch``.

Tests build the app around their own editors / store (``build_app(config, engine=…,
store=…)``) and launch it on a free port with ``prevent_thread_lock=True``; ``app.py`` calls
:func:`main`.
"""

from __future__ import annotations

import logging
import os
import sys

# gradio recomputes its monitoring summary (a pandas frame of the last 10,000 events) after
# every event by default: under load that is most of the server's own CPU time
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")

import gradio as gr  # noqa: E402

from .arena import Arena
from .arena_ui import build_arena_tab
from .config import SIGN_IN_CLIENT, AppConfig, ConfigError, Credentials, config_from_args
from .context import AppContext
from .engine import editors_in_own_processes
from .label import Labeling, seed_queue_in_background
from .label_ui import SHORTCUTS_JS, build_label_tab
from .leaderboard_ui import build_leaderboard_tab
from .threads import apply_thread_policy, apply_web_policy

log = logging.getLogger("mteditlab.ui")

CSS = """
#arena-status, #label-status, #label-header { min-height: 2em; }
.gradio-container img { image-rendering: pixelated; }
#arena-vote-row button { min-height: 3em; font-size: 1.05em; }
#arena-vote-row button:disabled { opacity: 0.45; cursor: not-allowed; }
#label-rubric { font-size: 0.92em; }
.arena-intent { font-size: 0.88em; min-height: 1.4em; }
footer { display: none !important; }
"""


def _notice(ctx: AppContext) -> str:
    """The page header every visitor sees (no server paths: the admin panel shows those)."""
    engine = ctx.engine
    a, b = engine.sides["A"], engine.sides["B"]
    lines = ["**MT-EditLab** — multi-turn image editing arena"]
    if ctx.config.anonymous:
        lines.append("The two models are shuffled and hidden until you end the session.")
    else:
        lines.append(f"Side A: `{a.model}` · side B: `{b.model}`.")
    for note in engine.notices:
        lines.append(f"⚠️ {note}")
    return "\n\n".join(lines)


def build_app(config: AppConfig, *, engine=None, store=None, ctx: AppContext | None = None
              ) -> gr.Blocks:
    """The whole UI.  The returned Blocks carries ``mteditlab_ctx`` (close it when done) and
    ``launch_kwargs`` (theme, css, js) for :func:`launch`."""
    ctx = ctx or AppContext.create(config, engine=engine, store=store)
    arena, labeling = Arena(ctx), Labeling(ctx)
    with gr.Blocks(title=config.title) as demo:
        gr.Markdown(_notice(ctx), elem_id="app-notice")
        with gr.Tabs():
            with gr.Tab("Arena", id="arena"):
                build_arena_tab(ctx, arena)
            with gr.Tab("Label", id="label"):
                build_label_tab(ctx, labeling, demo)
            with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
                build_leaderboard_tab(ctx, demo, board_tab)
    demo.queue(default_concurrency_limit=config.concurrency)
    demo.mteditlab_ctx = ctx
    demo.launch_kwargs = {"theme": gr.themes.Soft(), "css": CSS, "js": SHORTCUTS_JS}
    return demo


def _patient_url_ok(url: str, budget_s: float = 90.0) -> bool:
    """gradio's own start-up probe gives up after one 3 s timeout, which a busy CPU (a training
    job beside the app) can exceed on the very first page render: retry timeouts instead."""
    import time

    import httpx

    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        try:
            response = httpx.head(url, timeout=15, verify=False)
            if response.status_code in (200, 401, 301, 302, 303, 307, 308):
                return True
            time.sleep(0.5)
        except httpx.TimeoutException:
            continue
        except (ConnectionError, httpx.ConnectError):
            time.sleep(0.5)
    return False


class _ClientAddress:
    """ASGI middleware: each HTTP request's client address in :data:`ui.config.SIGN_IN_CLIENT`
    while it is served, for the sign-in guard (gradio's sign-in route hands the credentials
    check only the name and the password)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = SIGN_IN_CLIENT.set((scope.get("client") or (None,))[0])
        try:
            await self.app(scope, receive, send)
        finally:
            SIGN_IN_CLIENT.reset(token)


def _sign_in_page(credentials: Credentials):
    """gradio's ``auth`` callable: a wrong password answers 400; a locked name or address
    answers 429 with the guard's message saying when to try again."""
    from fastapi import HTTPException

    def check(name: str, password: str) -> bool:
        if credentials.check(name, password):
            return True
        refusal = credentials.lockout(name)
        if refusal:
            raise HTTPException(status_code=429, detail=refusal)
        return False
    return check


def launch(demo: gr.Blocks, config: AppConfig, **overrides):
    from gradio import networking

    networking.url_ok = _patient_url_ok
    # display files are written once, atomically, and never change: served from their folder
    # as they are, gradio neither copies nor hashes them for every answer that shows them
    gr.set_static_paths([demo.mteditlab_ctx.display_dir])
    kwargs = dict(demo.launch_kwargs)
    kwargs.update(server_name=config.host, server_port=config.port, share=config.share,
                  max_file_size="20mb", show_error=True,
                  allowed_paths=[str(demo.mteditlab_ctx.display_dir)])
    if config.auth:
        from starlette.middleware import Middleware

        kwargs["auth"] = _sign_in_page(config.auth)
        kwargs["auth_message"] = "MT-EditLab: sign in"
        kwargs["app_kwargs"] = {"middleware": [Middleware(_ClientAddress)]}
    kwargs.update(overrides)
    return demo.launch(**kwargs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = config_from_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from labeling.errors import StoreError

    if editors_in_own_processes(config):
        apply_web_policy()   # each editor process applies the editors' policy itself
    else:
        apply_thread_policy(config.threads)
    try:
        demo = build_app(config)
    except (StoreError, ConfigError) as exc:   # ConfigError: a reconstructor that cannot be built
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ctx: AppContext = demo.mteditlab_ctx
    for note in ctx.engine.notices:
        log.warning("%s", note.replace("**", ""))
    seed = config.seed_queue and int(ctx.store.counts()["comparisons"]) == 0
    try:
        launch(demo, config, prevent_thread_lock=True)
        if seed:  # after the port is open: the app serves while the items are made
            seed_queue_in_background(ctx, config.seed_queue)
        demo.block_thread()
    finally:
        ctx.close()
    return 0


__all__ = ["build_app", "launch", "main", "AppConfig"]
