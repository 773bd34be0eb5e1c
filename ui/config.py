"""Configuration of ``python app.py``: flags, environment variables and credentials.

Nothing heavy is imported here (no gradio, torch or duckdb) so that ``python app.py --help``
answers at once.

Every flag has an environment variable (flags win), so the same ``app.py`` runs locally and as a
Hugging Face Space, where configuration comes from the Space's variables and secrets:

==========================  ===============================  ===================================
flag                        environment variable             default
==========================  ===============================  ===================================
``--editor-a/-b``           ``MTEDITLAB_EDITOR_A/_B``        ``mini`` / ``mini``
``--adapter-a/-b``          ``MTEDITLAB_ADAPTER_A/_B``       none / ``checkpoints/mini/grpo``
``--model-a/-b``            ``MTEDITLAB_MODEL_A/_B``         the editor's default weights
``--intent-a/-b``           ``MTEDITLAB_INTENT_A/_B``        ``rule`` (on world scenes; an
                                                             uploaded photo: none, unless
                                                             ``served:URL``, see ui/intents.py)
``--data-dir``              ``MTEDITLAB_DATA``               ``./data`` (``/data/mteditlab`` on
                                                             a Space with persistent storage)
``--host`` / ``--port``     ``GRADIO_SERVER_NAME/_PORT``     gradio's (127.0.0.1:7860)
``--annotators``            ``MTEDITLAB_ANNOTATORS``         none: labeling closed
``--admin``                 ``MTEDITLAB_ADMIN``              none: admin views closed
``--hf-annotators``         ``MTEDITLAB_HF_ANNOTATORS``      none (``*`` = any HF user)
``--reward-model``          ``MTEDITLAB_REWARD_MODEL``       ``checkpoints/mini/calibrated``
``--min-battles``           ``MTEDITLAB_MIN_BATTLES``        20 (fewer: provisional, unranked)
``--queue-selection``       ``MTEDITLAB_QUEUE_SELECTION``    ``active`` (or ``uniform``)
``--hub-dataset``           ``MTEDITLAB_HUB_DATASET``        none (``user/name``: Parquet
                                                             snapshots of the labels pushed
                                                             there, resumed on a fresh start;
                                                             ``file:DIR`` for a local folder)
``--hub-every``             ``MTEDITLAB_HUB_EVERY``          5 (minutes between snapshots)
``--threads``               ``MTEDITLAB_THREADS``            auto (half the available cores)
``--take-turns``            ``MTEDITLAB_TAKE_TURNS``         off (both sides run at once)
``--in-process-editors``    ``MTEDITLAB_IN_PROCESS_EDITORS`` off (a process per side's editor)
``--auth``                  ``MTEDITLAB_AUTH``               none: the app is public
==========================  ===============================  ===================================

Credentials are ``name:password`` pairs separated by commas or newlines, or ``@FILE`` naming a
file with one pair per line; a password may be given as ``sha256:<hex digest>``.  Failed
sign-ins lock the name, and the client address, for a while (:class:`SignInGuard`); behind a
reverse proxy, list it in ``FORWARDED_ALLOW_IPS`` so that clients' own addresses are seen.
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import dataclasses
import hashlib
import hmac
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from mteditlab.registry import registered_names

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADAPTER = "checkpoints/mini/grpo"
DEFAULT_REWARD_MODEL = "checkpoints/mini/calibrated"
ALL_EDITORS = registered_names("mteditlab.editors", "register_editor")   # without importing torch
NONE_WORDS = ("", "none", "no", "off", "-")
DEFAULT_INTENT = "rule"


class ConfigError(ValueError):
    """A flag or environment variable has a bad value; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class SideSpec:
    """What one arena side runs: an editor backend, optional base weights, optional LoRA, and the
    intent reconstructor that tells its editor what each instruction means (a spec of
    :mod:`mteditlab.reconstructors`: ``rule``, ``mini[:DIR]``, ``served:URL``, ``concat``,
    ``none``; see :mod:`ui.intents`)."""

    editor: str = "mini"
    lora: str | None = None    # adapter directory (relative to the repo root or absolute)
    model: str | None = None   # base weights: a mini checkpoint dir, or a model id / dir
    intent: str = DEFAULT_INTENT   # the side's intent reconstructor

    def describe(self) -> str:
        text = self.editor + (f" @ {self.model}" if self.model else "")
        return text + (f" + LoRA {self.lora}" if self.lora else "")


# the client address of the HTTP request being served, where the web server's own routes call
# the credentials check (set by ui.build); gradio event handlers have gradio's request instead
SIGN_IN_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mteditlab_sign_in_client", default=None)


def current_client() -> str | None:
    """The client address of the request being served: that of the gradio event being run
    (read without importing gradio), else :data:`SIGN_IN_CLIENT`, else None."""
    context = sys.modules.get("gradio.context")
    request = context.LocalContext.request.get(None) if context is not None else None
    client = getattr(getattr(request, "client", None), "host", None)
    return client or SIGN_IN_CLIENT.get()


@dataclasses.dataclass
class SignInGuard:
    """Failed sign-ins counted per name and per client address.  ``name_limit`` failures of a
    name (known or not), or ``client_limit`` failures from an address, within ``window_s``
    seconds lock it for ``lock_s`` seconds: every sign-in with that name or from that address
    is refused meanwhile, the right password too, and the attempts are not counted.  A success
    clears its name's failures (not its address's).  ``clock``: wall-clock seconds since the
    epoch (tests inject one).  Thread-safe: parallel attempts get no more tries."""

    name_limit: int = 5
    client_limit: int = 20
    window_s: float = 600.0
    lock_s: float = 900.0
    clock: Callable[[], float] = time.time
    _failures: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    _locked: dict = dataclasses.field(default_factory=dict)   # key -> locked until
    _mutex: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def settle(self, name: str, client: str | None, matched: bool) -> bool:
        """Whether a sign-in whose password ``matched`` is accepted; counts it when refused."""
        keys = self._keys(name, client)
        with self._mutex:
            now = self.clock()
            if self._refusal(keys, now) is not None:
                return False
            if matched:
                self._failures.pop(keys[0][0], None)
                return True
            for key, limit, _ in keys:
                recent = [t for t in self._failures[key] if t > now - self.window_s] + [now]
                self._failures[key] = recent
                if len(recent) >= limit:
                    self._locked[key] = now + self.lock_s
                    del self._failures[key]
            if len(self._failures) + len(self._locked) > 4096:
                self._forget(now)
            return False

    def refusal(self, name: str, client: str | None) -> str | None:
        """Why a sign-in with ``name`` from ``client`` is refused now and when to try again,
        or None when it is not locked."""
        with self._mutex:
            return self._refusal(self._keys(name, client), self.clock())

    def _keys(self, name: str, client: str | None) -> list[tuple]:
        """(key, failures that lock it, whom a refusal names) for a sign-in."""
        keys = [(("name", name.strip()), self.name_limit, "for this name")]
        if client:
            keys.append((("client", client), self.client_limit, "from your address"))
        return keys

    def _refusal(self, keys: list[tuple], now: float) -> str | None:
        for key, _, whom in keys:
            until = self._locked.get(key, 0.0)
            if until > now:
                minutes = math.ceil((until - now) / 60)
                return (f"Too many failed sign-ins {whom}: try again in {minutes} minute"
                        f"{'s' if minutes != 1 else ''} (after "
                        f"{time.strftime('%H:%M', time.gmtime(until))} UTC).")
        return None

    def _forget(self, now: float) -> None:
        """Drop expired locks and failures outside the window (keeps memory bounded)."""
        self._locked = {k: t for k, t in self._locked.items() if t > now}
        for key in [k for k, times in self._failures.items() if times[-1] <= now - self.window_s]:
            del self._failures[key]


@dataclasses.dataclass(frozen=True)
class Credentials:
    """name -> password (plain, or ``sha256:<hex>``); checked in constant time, with failed
    sign-ins locking names and client addresses for a while (``guard``)."""

    entries: tuple[tuple[str, str], ...] = ()
    guard: SignInGuard = dataclasses.field(default_factory=SignInGuard, compare=False,
                                           repr=False)

    @classmethod
    def parse(cls, text: str | None, what: str) -> "Credentials":
        if not text or not text.strip():
            return cls()
        text = text.strip()
        if text.startswith("@"):
            path = Path(text[1:]).expanduser()
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(f"{what}: cannot read credentials file {path}: {exc}") from None
        entries = {}
        for raw in text.replace(",", "\n").splitlines():
            raw = raw.strip()
            if not raw or raw.startswith("#"):
                continue
            name, sep, password = raw.partition(":")
            if not sep or not name.strip() or not password:
                raise ConfigError(f"{what}: expected name:password, got {raw.split(':')[0]!r}:…")
            entries[name.strip()] = password
        return cls(tuple(sorted(entries.items())))

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.entries]

    def check(self, name: str, password: str, client: str | None = None) -> bool:
        """True when ``name`` exists, ``password`` matches (constant-time compare) and neither
        the name nor the client address is locked (:class:`SignInGuard`).  ``client``: the
        address signing in, by default that of the request being served
        (:func:`current_client`).  :meth:`lockout` says why a refused sign-in was refused."""
        if not isinstance(name, str) or not isinstance(password, str):
            return False
        return self.guard.settle(name, client or current_client(),
                                 self._matches(name.strip(), password))

    def lockout(self, name: str, client: str | None = None) -> str | None:
        """Why sign-ins with ``name`` from ``client`` (default as in :meth:`check`) are refused
        now and when to try again, or None when they are not locked."""
        return self.guard.refusal(name if isinstance(name, str) else "",
                                  client or current_client())

    def _matches(self, name: str, password: str) -> bool:
        typed = password.encode("utf-8", "surrogatepass")   # any str, half characters too
        stored = dict(self.entries).get(name)
        if stored is None:
            hmac.compare_digest(typed, b"x" * 16)  # same work for unknown names
            return False
        if stored.startswith("sha256:"):
            digest = hashlib.sha256(typed).hexdigest()
            return hmac.compare_digest(digest, stored[len("sha256:"):].lower())
        return hmac.compare_digest(typed, stored.encode())


@dataclasses.dataclass(frozen=True)
class AppConfig:
    side_a: SideSpec = SideSpec("mini", None)
    side_b: SideSpec = SideSpec("mini", DEFAULT_ADAPTER)
    data_dir: Path | None = None          # None: labeling's default (see resolved_data_dir)
    host: str | None = None
    port: int | None = None
    share: bool = False
    annotators: Credentials = Credentials()
    admins: Credentials = Credentials()
    hf_annotators: tuple[str, ...] = ()   # HF usernames allowed to label ('*' = everyone)
    auth: Credentials = Credentials()     # basic auth in front of the whole app
    anonymous: bool = True                # arena: shuffle the sides, hide names until the end
    device: str | None = None
    steps: int | None = None              # default sampling steps (None: the editors' own)
    strict: bool = False                  # fail instead of falling back when an editor is missing
    max_batch: int = 16                   # edits batched per editor call under load
    concurrency: int = 32                 # gradio queue default concurrency limit
    threads: int | None = None            # torch intra-op threads (None: half the cores)
    take_turns: bool = False              # the sides' batches take turns instead of sharing
    in_process_editors: bool = False      # editors in the web process (default: one process each)
    seed_queue: int = 0                   # labeling items to generate at start when the queue is empty
    reward_model: str | None = DEFAULT_REWARD_MODEL  # calibrated reward model dir (its report)
    min_battles: int = 20                 # leaderboard: fewer battles = provisional, not ranked
    queue_selection: str = "active"       # label queue: model pair by uncertainty, or uniform
    hub_dataset: str | None = None        # snapshot target: user/name (HF dataset) or file:DIR
    hub_every: float = 5.0                # minutes between snapshot pushes
    title: str = "MT-EditLab"

    def resolved_data_dir(self) -> Path:
        """``data_dir``, else labeling's default (:func:`labeling.connection.data_dir`)."""
        from labeling.connection import data_dir   # imports duckdb: not at --help time

        return data_dir(self.data_dir)


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None else value


def _opt(value: str | None) -> str | None:
    return None if value is None or value.strip().lower() in NONE_WORDS else value.strip()


def _bool_env(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="MT-EditLab: multi-turn image-editing arena, labeling and leaderboard "
                    "(Gradio; runs locally or as a Hugging Face Space).",
        epilog="Every flag can also be set by the environment variable shown in brackets. "
               "Credentials: 'name:password' pairs separated by commas, or @FILE with one per "
               "line; a password may be 'sha256:<hex>'. See ui/config.py.",
    )
    g = parser.add_argument_group("arena sides (default: mini base vs mini + the RL adapter)")
    for side, editor, adapter in (("a", "mini", None), ("b", "mini", "default")):
        up = side.upper()
        g.add_argument(f"--editor-{side}", default=_env(f"MTEDITLAB_EDITOR_{up}", editor),
                       choices=ALL_EDITORS, help=f"editor of side {up} [MTEDITLAB_EDITOR_{up}] "
                       f"(default {editor})")
        g.add_argument(f"--adapter-{side}", default=_env(f"MTEDITLAB_ADAPTER_{up}", adapter),
                       help=f"LoRA adapter directory for side {up}, or 'none' "
                       f"[MTEDITLAB_ADAPTER_{up}] (default "
                       + (f"{DEFAULT_ADAPTER} when side B is mini, else none)" if adapter else
                          "none)"))
        g.add_argument(f"--model-{side}", default=_env(f"MTEDITLAB_MODEL_{up}"),
                       help=f"base weights of side {up}: a mini checkpoint directory or a model "
                       f"id / local pipeline directory [MTEDITLAB_MODEL_{up}]")
        g.add_argument(f"--intent-{side}", default=_env(f"MTEDITLAB_INTENT_{up}", DEFAULT_INTENT),
                       metavar="SPEC", help=f"intent reconstructor of side {up}: rule, mini[:DIR], "
                       "served:URL (an OpenAI-compatible chat endpoint, options on its query: "
                       "?model=NAME&timeout=S&retries=N), concat or none. rule and mini read "
                       "only scenes of the built-in world: on other images the editor gets the "
                       f"instruction as typed [MTEDITLAB_INTENT_{up}] (default {DEFAULT_INTENT})")
    g.add_argument("--strict", action="store_true", default=_bool_env("MTEDITLAB_STRICT", False),
                   help="exit with an error when an editor or adapter cannot be loaded, instead "
                   "of falling back to a reference editor with a notice [MTEDITLAB_STRICT]")
    g.add_argument("--device", default=_env("MTEDITLAB_DEVICE"),
                   help="torch device for the editors (default: cpu for mini, auto for the "
                   "real backends) [MTEDITLAB_DEVICE]")
    g.add_argument("--steps", type=int, default=None,
                   help="default number of sampling steps (the UI can change it per turn)")
    g.add_argument("--no-anonymous", dest="anonymous", action="store_false",
                   default=_bool_env("MTEDITLAB_ANONYMOUS", True),
                   help="show the model names from the start instead of when the session ends "
                   "[MTEDITLAB_ANONYMOUS=0]")

    g = parser.add_argument_group("data and server")
    g.add_argument("--data-dir",
                   help="data directory holding labels.duckdb and images/ [MTEDITLAB_DATA] "
                   "(default ./data; /data/mteditlab on a Space with persistent storage)")
    g.add_argument("--host", default=None,
                   help="address to listen on (default gradio's: $GRADIO_SERVER_NAME or "
                   "127.0.0.1; 0.0.0.0 to serve the network)")
    g.add_argument("--port", type=int, default=None,
                   help="port (default $GRADIO_SERVER_PORT or the first free from 7860)")
    g.add_argument("--share", action="store_true", help="create a public gradio.live link "
                   "(needs internet)")
    g.add_argument("--concurrency", type=int, default=32,
                   help="events processed at once (edits are batched per editor anyway)")
    g.add_argument("--max-batch", type=int, default=16,
                   help="largest batch of concurrent edits sent to one editor call")
    g.add_argument("--threads", default=_env("MTEDITLAB_THREADS", "auto"), metavar="N",
                   help="torch intra-op threads of each side's editor, or 'auto': half the "
                   "cores the app may use (the sides run at once), at least 1, at most 8. "
                   "Give fewer when another heavy job shares the "
                   "machine; idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE unless set) "
                   "[MTEDITLAB_THREADS] (default auto)")
    g.add_argument("--take-turns", dest="take_turns", action="store_true",
                   default=_bool_env("MTEDITLAB_TAKE_TURNS", False),
                   help="run one side's batch at a time with every thread, instead of both "
                   "sides at once on half the threads each (the editors then run in the web "
                   "server's process) [MTEDITLAB_TAKE_TURNS]")
    g.add_argument("--in-process-editors", dest="in_process_editors", action="store_true",
                   default=_bool_env("MTEDITLAB_IN_PROCESS_EDITORS", False),
                   help="run the editors in the web server's process instead of a process per "
                   "side (for tests and tiny setups: the editors then share Python's GIL with "
                   "the server) [MTEDITLAB_IN_PROCESS_EDITORS]")
    g.add_argument("--reward-model", default=_env("MTEDITLAB_REWARD_MODEL", DEFAULT_REWARD_MODEL),
                   help="directory of the calibrated reward model (python -m "
                   "training.reward_model --out DIR); the leaderboard shows its held-out "
                   f"agreement with the labels [MTEDITLAB_REWARD_MODEL] (default "
                   f"{DEFAULT_REWARD_MODEL})")
    g.add_argument("--min-battles", type=int, default=_env("MTEDITLAB_MIN_BATTLES", "20"),
                   metavar="N", help="leaderboard: models with fewer battles are shown apart "
                   "as provisional and not ranked [MTEDITLAB_MIN_BATTLES] (default 20)")
    g.add_argument("--queue-selection", choices=("active", "uniform"),
                   default=_env("MTEDITLAB_QUEUE_SELECTION", "active"),
                   help="label queue: which model pair an annotator judges next. active: the "
                   "pair whose rating difference one more judgment makes most certain "
                   "(Chatbot Arena's rule on the Bradley–Terry fit); uniform: every pair with "
                   "open items equally often [MTEDITLAB_QUEUE_SELECTION] (default active)")
    g.add_argument("--hub-dataset", default=_env("MTEDITLAB_HUB_DATASET"), metavar="REPO",
                   help="keep the labels across restarts: push Parquet snapshots of the label "
                   "store to this Hugging Face dataset repo (user/name, created private; token "
                   "from HF_TOKEN) and, when the store starts empty, resume from the last one; "
                   "file:DIR uses a local folder instead [MTEDITLAB_HUB_DATASET]")
    g.add_argument("--hub-every", type=float,
                   default=_env("MTEDITLAB_HUB_EVERY", "5"), metavar="MIN",
                   help="minutes between snapshot pushes [MTEDITLAB_HUB_EVERY] (default 5)")
    g.add_argument("--seed-queue", type=int, default=0, metavar="N",
                   help="when the labeling queue is empty at start, fill it with N world test "
                   "sessions edited by both sides (plus gold items), in the background once the "
                   "server is up, with a progress bar in the console")

    g = parser.add_argument_group("access")
    g.add_argument("--annotators", default=_env("MTEDITLAB_ANNOTATORS"),
                   help="annotator credentials for the Label tab [MTEDITLAB_ANNOTATORS]")
    g.add_argument("--admin", default=_env("MTEDITLAB_ADMIN"),
                   help="admin credentials for exports and per-annotator views "
                   "[MTEDITLAB_ADMIN]")
    g.add_argument("--hf-annotators", default=_env("MTEDITLAB_HF_ANNOTATORS"),
                   help="on a Space with hf_oauth: comma-separated HF usernames allowed to "
                   "label, '*' for any signed-in user [MTEDITLAB_HF_ANNOTATORS]")
    g.add_argument("--auth", default=_env("MTEDITLAB_AUTH"),
                   help="basic-auth credentials in front of the whole app [MTEDITLAB_AUTH]")
    return parser


def config_from_args(argv: list[str] | None = None) -> AppConfig:
    args = build_parser().parse_args(argv)
    port = args.port
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {port}")
    if not args.hub_every > 0:
        raise ConfigError(f"--hub-every must be > 0 minutes, got {args.hub_every}")
    hub = _opt(args.hub_dataset)
    if hub and not (hub.startswith("file:") or re.fullmatch(r"(hf:)?[\w.-]+/[\w.-]+", hub)):
        raise ConfigError(f"--hub-dataset: expected a dataset repo id user/name or file:DIR, "
                          f"got {hub!r}")
    if args.queue_selection not in ("active", "uniform"):
        raise ConfigError(f"--queue-selection: active or uniform, got {args.queue_selection!r}")
    if args.steps is not None and not 1 <= args.steps <= 100:
        raise ConfigError(f"--steps must be 1..100, got {args.steps}")
    for flag, editor in (("--editor-a", args.editor_a), ("--editor-b", args.editor_b)):
        if editor not in ALL_EDITORS:
            raise ConfigError(f"{flag}: unknown editor {editor!r}; one of {', '.join(ALL_EDITORS)}")
    threads_text = str(args.threads).strip().lower()
    if threads_text in ("", "auto", "0"):
        threads = None
    else:
        try:
            threads = int(threads_text)
        except ValueError:
            threads = -1
        if not 1 <= threads <= 1024:
            raise ConfigError(f"--threads must be a whole number 1..1024 or auto, got "
                              f"{args.threads!r}")
    hf = tuple(n.strip() for n in (args.hf_annotators or "").split(",") if n.strip())
    from .intents import check_spec   # imports the reconstructors (torch): after --help

    intent_a, intent_b = check_spec(args.intent_a, "--intent-a"), check_spec(args.intent_b, "--intent-b")
    adapter_b = args.adapter_b
    if adapter_b == "default":  # the shipped RL adapter belongs to the mini editor only
        adapter_b = DEFAULT_ADAPTER if args.editor_b == "mini" and not args.model_b else None
    return AppConfig(
        side_a=SideSpec(args.editor_a, _opt(args.adapter_a), _opt(args.model_a), intent_a),
        side_b=SideSpec(args.editor_b, _opt(adapter_b), _opt(args.model_b), intent_b),
        data_dir=Path(args.data_dir) if args.data_dir else None,
        host=args.host, port=port, share=args.share,
        annotators=Credentials.parse(args.annotators, "--annotators"),
        admins=Credentials.parse(args.admin, "--admin"),
        hf_annotators=hf,
        auth=Credentials.parse(args.auth, "--auth"),
        anonymous=args.anonymous, device=args.device, steps=args.steps, strict=args.strict,
        max_batch=max(1, args.max_batch), concurrency=max(1, args.concurrency),
        threads=threads, take_turns=args.take_turns, in_process_editors=args.in_process_editors,
        seed_queue=max(0, args.seed_queue), reward_model=_opt(args.reward_model),
        min_battles=max(0, args.min_battles), queue_selection=args.queue_selection,
        hub_dataset=hub, hub_every=args.hub_every,
    )


def resolve_path(path: str | None) -> Path | None:
    """A path flag: absolute as given, relative to the working directory when it exists
    there, else relative to the repository root (so defaults work from any directory)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def on_spaces() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def oauth_available() -> bool:
    """HF OAuth can work: a Space with ``hf_oauth: true`` (it sets OAUTH_CLIENT_ID) and
    gradio's OAuth extra installed (``authlib``; ``gradio[oauth]`` in the requirements)."""
    import importlib.util

    return (on_spaces() and bool(os.environ.get("OAUTH_CLIENT_ID"))
            and importlib.util.find_spec("authlib") is not None)
