"""Launch the app for tests and benchmarks: in-process on a free port, around given editors."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from .config import AppConfig, Credentials


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_engine(a, b, names=None, max_batch: int = 16):
    """An :class:`~mteditlab.app.engine.Engine` around two editor objects (``names``: the store
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
