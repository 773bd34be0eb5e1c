"""Launch the app for tests and benchmarks: in-process on a free port, around given editors."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from .config import AppConfig, Credentials


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def paced_editor(reference, delay_s: float = 0.1, steps: int = 10):
    """A flow-matching editor (the :class:`~mteditlab.editors.base.Editor` protocol, so it takes
    real denoising steps through ``edit_batch``) whose exact velocity field leads to what the
    ``reference`` editor (oracle, identity) returns; each step takes ``delay_s`` seconds, so a
    browser can watch the progress.  Its result equals the reference's."""
    import time

    import numpy as np
    import torch

    from mteditlab.editors.flow_policy import FlowPolicy

    class PacedEditor(FlowPolicy):
        name = reference.name
        default_steps = steps
        resolution = getattr(reference, "resolution", None)
        world = reference.world

        def encode(self, images, texts):
            targets = reference.edit_batch(list(images), list(texts))
            arrays = [np.asarray(t.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
                      for t in targets]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

        def latent_shape(self, cond):
            return tuple(cond.shape[1:])

        def velocity(self, x, sigma, cond):
            time.sleep(delay_s)
            # x_σ = (1 − σ)·x0 + σ·ε has velocity ε − x0 = (x_σ − x0)/σ
            return (x - cond) / sigma.view(-1, 1, 1, 1)

        def decode(self, latents, cond):
            from PIL import Image

            pixels = ((latents.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
            return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]

    return PacedEditor()


class NotingEditor:
    """An editor that edits as ``editor`` does and notes what it was told: ``calls`` lists
    ``(instruction, intent)`` per item, in order (what an arena side's editor got)."""

    def __init__(self, editor):
        self.editor, self.calls = editor, []
        self.name, self.world = editor.name, editor.world
        self.resolution = getattr(editor, "resolution", None)

    def edit_batch(self, images, instructions, *, intents=None, **kwargs):
        self.calls += list(zip(instructions, intents or [None] * len(images)))
        return self.editor.edit_batch(images, instructions, intents=intents, **kwargs)


def paced_side(key: str, reference: str, delay_s: float = 0.1, steps: int = 10):
    """A :class:`~ui.engine.Side` named ``reference`` running :func:`paced_editor` around that
    reference editor ("oracle", "identity"); a module-level function, so that an editor process
    can load it (``functools.partial(paced_side, "A", "oracle")``)."""
    from mteditlab.editors import get_editor

    from .engine import Side

    return Side(key, reference, None, paced_editor(get_editor(reference), delay_s, steps))


def make_engine(a, b, names=None, max_batch: int = 16):
    """An :class:`~ui.engine.Engine` around two editor objects (``names``: the store
    names (editor, adapter) of each side; default their ``name`` attributes)."""
    from .engine import Engine, Side

    names = names or ((a.name, None), (b.name, None))
    return Engine(Side("A", *names[0], a), Side("B", *names[1], b), [], max_batch=max_batch)


def app_config(data_dir: Path, **overrides) -> AppConfig:
    base = dict(data_dir=Path(data_dir),
                annotators=Credentials.parse("alice:wonderland,bob:builder", "test"),
                admins=Credentials.parse("root:secret", "test"), concurrency=32)
    base.update(overrides)
    return AppConfig(**base)


@contextlib.contextmanager
def running_app(config: AppConfig, *, engine=None, quiet: bool = True):
    """Build and launch the app; yields ``(url, demo, ctx)``; closes everything after."""
    from .build import build_app, launch

    demo = build_app(config, engine=engine)
    ctx = demo.mteditlab_ctx
    try:
        port = free_port()
        launch(demo, config, server_name="127.0.0.1", server_port=port,
               prevent_thread_lock=True, quiet=quiet, share=False)
        yield f"http://127.0.0.1:{port}/", demo, ctx
    finally:
        try:
            demo.close()
        finally:
            ctx.close()


# --------------------------------------------------------------------------- real browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    """A headless Playwright page in Debian's chromium (no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def wait_text(page, selector: str, text: str, timeout: float = 60_000) -> None:
    """Wait until the element's text contains ``text``."""
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel);"
        " return !!el && el.innerText.includes(text); }", arg=[selector, text], timeout=timeout)


IMAGES_LOADED = ("sel => [...document.querySelectorAll(sel)].every("
                 "i => i.complete && i.naturalWidth > 0)")


def wait_images(page, selector: str = "#arena-strip-left img, #arena-strip-right img, "
                "#arena-img-left img, #arena-img-right img") -> None:
    """Wait until every image under ``selector`` has loaded (thumbnails load lazily)."""
    page.wait_for_function(IMAGES_LOADED, arg=selector)


def gallery_count(page, selector: str) -> int:
    return page.evaluate(f"document.querySelectorAll('{selector} img').length")


_EDIT_SCREEN = """() => {
  const covered = sel => [...document.querySelectorAll(sel + ' [data-testid=status-tracker]')]
      .some(t => !t.classList.contains('hide'));
  const text = sel => { const el = document.querySelector(sel + ' .progress-level-inner');
                        return el ? el.innerText.trim() : null; };
  const box = document.querySelector('#arena-instruction textarea');
  return {left: text('#arena-img-left'), right: text('#arena-img-right'),
          status: text('#arena-status'), source_covered: covered('#arena-source'),
          instruction_covered: covered('#arena-instruction'),
          instruction_enabled: !!box && !box.disabled,
          done: document.querySelector('#arena-status').innerText};
}"""


def watch_edit(page, turn: int, poll_ms: int = 60, timeout: float = 120) -> list[dict]:
    """Poll the screen while turn ``turn``'s edit runs, until the status says it is done: the
    progress text over each side's picture and the status, and whether the source picture or
    the instruction box are covered by a progress overlay (they should not be).  Raises
    ``TimeoutError`` (with the last status) if it is not done within ``timeout`` seconds."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        now = page.evaluate(_EDIT_SCREEN)
        if f"Turn {turn} done" in now["done"]:
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"turn {turn} not done after {timeout:g} s; status: {now['done']!r}")
        seen.append(now)
        page.wait_for_timeout(poll_ms)


def arena_session(page, url: str, instructions: list[str], picks,
                  shots: Path | None = None, example: str = "Example 2",
                  reload: bool = True, watch: bool = False) -> list[dict]:
    """Click through an arena session in the browser: pick an example, one edit and one vote
    per instruction (``picks``: a list, or a function of the status text returning the pick);
    returns what the screen showed after each vote (with ``watch``, also ``progress``: what
    :func:`watch_edit` saw during that turn's edit)."""
    if reload:
        page.goto(url)
    page.locator("#arena-example input").click()
    page.get_by_role("option", name=example).click()
    wait_text(page, "#arena-status", "New session on example")
    seen = []
    for k, text in enumerate(instructions):
        page.locator("#arena-instruction textarea").fill(text)
        page.locator("#arena-edit").click()
        progress = watch_edit(page, k + 1) if watch else None
        wait_text(page, "#arena-status", f"Turn {k + 1} done")
        page.wait_for_function(
            "n => document.querySelectorAll('#arena-strip-left img').length >= n", arg=k + 2)
        wait_images(page)
        pick = picks(page.locator("#arena-status").inner_text()) if callable(picks) else picks[k]
        if shots is not None and k == len(instructions) - 1:
            page.screenshot(path=str(shots / "arena-before-vote.png"), full_page=True)
        assert page.locator(f"#arena-vote-{pick}").is_enabled()
        page.locator(f"#arena-vote-{pick}").click()
        wait_text(page, "#arena-status", f"Vote stored for turn {k + 1}")
        page.wait_for_function("() => document.querySelector('#arena-vote-left').disabled")
        seen.append({"status": page.locator("#arena-status").inner_text(),
                     "instruction": page.locator("#arena-instruction textarea").input_value(),
                     "title_left": page.locator("#arena-title-left").inner_text(),
                     "title_right": page.locator("#arena-title-right").inner_text(),
                     "strip_left": gallery_count(page, "#arena-strip-left"),
                     "strip_right": gallery_count(page, "#arena-strip-right"),
                     "progress": progress})
    if shots is not None:
        wait_images(page)
        page.screenshot(path=str(shots / "arena.png"), full_page=True)
    return seen


def upload_source(page, path) -> str:
    """Start a session on an uploaded picture as a person does (the upload button, then the file
    chooser); returns the status once the session started."""
    with page.expect_file_chooser() as chooser:
        page.locator("#arena-upload").click()
    chooser.value.set_files(str(path))
    wait_text(page, "#arena-status", "New session on your upload")
    return page.locator("#arena-status").inner_text()


def edit_turn(page, instruction: str, turn: int, timeout: float = 120_000) -> dict:
    """Type ``instruction``, press **Edit both** and wait until turn ``turn`` is done; returns what
    the screen shows then: the status, each side's "intent used" line and the history."""
    page.locator("#arena-instruction textarea").fill(instruction)
    page.locator("#arena-edit").click()
    wait_text(page, "#arena-status", f"Turn {turn} done", timeout=timeout)
    wait_text(page, "#arena-intent-left", f"turn {turn}")
    wait_text(page, "#arena-intent-right", f"turn {turn}")
    return {"status": page.locator("#arena-status").inner_text(),
            "intent_left": page.locator("#arena-intent-left").inner_text(),
            "intent_right": page.locator("#arena-intent-right").inner_text(),
            "history": page.locator("#arena-history").inner_text()}


def type_during_edit(page, instruction: str, typed: str, turn: int) -> str:
    """Start turn ``turn``'s edit, type ``typed`` into the instruction box while it runs, and
    return what the box holds once the edit is done."""
    box = page.locator("#arena-instruction textarea")
    box.fill(instruction)
    page.locator("#arena-edit").click()
    wait_text(page, "#arena-img-left .progress-level-inner", "Model A")
    box.fill(typed)
    wait_text(page, "#arena-status", f"Turn {turn} done")
    page.wait_for_timeout(500)   # the browser-side step after the answer
    return box.input_value()


def end_session(page) -> dict:
    """Click "End session": returns the status and both titles (names now shown)."""
    page.locator("#arena-end").click()
    wait_text(page, "#arena-status", "Session ended")
    return {"status": page.locator("#arena-status").inner_text(),
            "title_left": page.locator("#arena-title-left").inner_text(),
            "title_right": page.locator("#arena-title-right").inner_text()}


def label_item(page, name: str, password: str, keys: list[str],
               shots: Path | None = None) -> dict:
    """Sign in on the Label tab and judge one item with the keyboard shortcuts."""
    page.get_by_role("tab", name="Label").click()
    page.locator("#label-name").locator("input, textarea").first.fill(name)
    page.locator("#label-password").locator("input, textarea").first.fill(password)
    page.locator("#label-sign-in").click()
    wait_text(page, "#label-header", "item")
    page.wait_for_selector("#label-item", state="visible")
    header = page.locator("#label-header").inner_text()
    page.locator("#label-rubric").click()       # focus out of the text boxes
    wait_images(page, "#label-item img")
    for key in keys:
        page.keyboard.press(key)
        page.wait_for_timeout(150)
    if shots is not None:
        page.screenshot(path=str(shots / "label.png"), full_page=True)
    page.keyboard.press("Enter")
    wait_text(page, "#label-status", "Saved")
    return {"header": header, "status": page.locator("#label-status").inner_text(),
            "rubric": page.locator("#label-rubric").inner_text()}


def leaderboard(page, shots: Path | None = None) -> dict:
    page.get_by_role("tab", name="Leaderboard").click()
    wait_text(page, "#lb-summary", "human votes")
    page.wait_for_selector("#lb-plot img")
    if shots is not None:
        page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
    wait_text(page, "#lb-style-note", "Style control")
    return {"summary": page.locator("#lb-summary").inner_text(),
            "table": page.locator("#lb-table").inner_text(),
            "style": page.locator("#lb-style").inner_text(),
            "style_note": page.locator("#lb-style-note").inner_text()}
