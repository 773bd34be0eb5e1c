"""Password guessing: failed sign-ins lock a name, and a client address, for a while; the right
password is refused during the lock and works after it.  The guard's clock is injected, so the
lock expires without sleeping.  Checked on :class:`ui.config.Credentials` itself, through the
Label tab and through the app's own sign-in page (``--auth``) of a launched app."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from mteditlab.editors.reference import IdentityEditor, OracleEditor
from ui.config import Credentials, SignInGuard
from ui.testing import app_config, make_engine, running_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402


class Clock:
    """A settable wall clock (seconds since the epoch)."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def guarded(text: str, clock: Clock, **limits) -> Credentials:
    return Credentials(Credentials.parse(text, "test").entries, SignInGuard(clock=clock, **limits))


def test_failures_lock_a_name_then_the_lock_expires():
    clock = Clock()
    creds = guarded("alice:wonderland,bob:builder", clock, name_limit=5, lock_s=600)
    for _ in range(4):
        assert not creds.check("alice", "guess")
    assert creds.lockout("alice") is None
    assert not creds.check("alice", "guess")                     # the fifth: locked
    refusal = creds.lockout("alice")
    assert refusal and "try again in 10 minutes" in refusal and "UTC" in refusal
    assert not creds.check("alice", "wonderland")                # refused during the lock
    assert creds.check("bob", "builder")                         # other names are not locked
    clock.now += 599
    assert not creds.check("alice", "wonderland")
    clock.now += 2
    assert creds.lockout("alice") is None
    assert creds.check("alice", "wonderland")                    # after the lock, at once
    for _ in range(4):                                           # a success starts afresh
        assert not creds.check("alice", "guess")
    assert creds.check("alice", "wonderland")


def test_failures_spread_over_the_window_do_not_lock():
    clock = Clock()
    creds = guarded("alice:wonderland", clock, name_limit=3, window_s=60)
    for _ in range(6):
        assert not creds.check("alice", "guess")
        clock.now += 31
    assert creds.check("alice", "wonderland")


def test_unknown_names_lock_like_known_ones():
    clock = Clock()
    creds = guarded("alice:wonderland", clock, name_limit=2)
    for name in ("alice", "mallory"):
        creds.check(name, "x"), creds.check(name, "y")
    assert creds.lockout("alice") == creds.lockout("mallory")


def test_one_client_guessing_many_names_is_slowed_down():
    clock = Clock()
    creds = guarded("alice:wonderland,bob:builder", clock, name_limit=5, client_limit=6,
                    lock_s=300)
    for k in range(6):
        assert not creds.check(f"user{k}", "guess", client="10.0.0.9")
    assert "your address" in creds.lockout("alice", client="10.0.0.9")
    assert not creds.check("alice", "wonderland", client="10.0.0.9")
    assert creds.check("alice", "wonderland", client="10.0.0.7")
    clock.now += 301
    assert creds.check("bob", "builder", client="10.0.0.9")


def test_parallel_guesses_get_no_more_tries_than_the_limit():
    clock = Clock()
    creds = guarded("alice:wonderland", clock, name_limit=5)
    guesses = [f"guess{k}" for k in range(19)] + ["wonderland"]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda pw: creds.check("alice", pw), guesses))
    assert not any(results)
    assert creds.lockout("alice")


def test_the_label_tab_locks_names_and_addresses(tmp_path):
    clock = Clock()
    annotators = guarded("alice:wonderland", clock, name_limit=3, client_limit=5, window_s=60,
                         lock_s=120)
    config = app_config(tmp_path / "data", annotators=annotators)
    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(config, engine=engine) as (url, _, ctx):
        def sign_in(c, name, password):
            out = c.predict(name, password, api_name="/label_sign_in")
            return out[0], out[-1]                                  # header, status

        first, second = (Client(url, verbose=False, download_files=False) for _ in range(2))
        for _ in range(2):
            assert "wrong password" in sign_in(first, "alice", "guess")[1]
        assert "try again in 2 minutes" in sign_in(first, "alice", "guess")[1]   # now locked
        header, status = sign_in(first, "alice", "wonderland")
        assert "Signed in" not in header and "Too many failed sign-ins for this name" in status
        assert "wrong password" not in status
        clock.now += 121
        assert "Signed in as **alice**" in sign_in(first, "alice", "wonderland")[0]
        for k in range(5):                                  # many names from one address
            assert "Signed in" not in sign_in(second, f"user{k}", "guess")[0]
        assert annotators.lockout("alice", client="127.0.0.1")
        header, status = sign_in(second, "alice", "wonderland")
        assert "Signed in" not in header and "from your address: try again" in status, status
        clock.now += 121
        assert "Signed in as **alice**" in sign_in(second, "alice", "wonderland")[0]


def test_the_admin_sign_in_says_when_a_locked_name_may_try_again(tmp_path):
    clock = Clock()
    admins = guarded("root:secret", clock, name_limit=2, lock_s=300)
    config = app_config(tmp_path / "data", admins=admins)
    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(config, engine=engine) as (url, _, ctx):
        c = Client(url, verbose=False, download_files=False)

        def sign_in(password):
            return c.predict("root", password, api_name="/admin_sign_in")[0]

        assert "wrong password" in sign_in("guess")
        assert "try again in 5 minutes" in sign_in("guess")          # the second failure locks
        locked = sign_in("secret")
        assert "Signed in" not in locked and "Too many failed sign-ins" in locked, locked
        clock.now += 301
        assert "Signed in as admin **root**" in sign_in("secret")


def test_the_sign_in_page_locks_names_and_addresses(tmp_path):
    clock = Clock()
    auth = guarded("carol:s3cret", clock, name_limit=3, client_limit=5, window_s=60, lock_s=300)
    config = app_config(tmp_path / "data", auth=auth)
    engine = make_engine(OracleEditor(), IdentityEditor())
    with running_app(config, engine=engine) as (url, _, ctx):
        def login(name, password):
            return httpx.post(url + "login", data={"username": name, "password": password},
                              timeout=60)

        for _ in range(2):
            assert login("carol", "guess").status_code == 400
        for password in ("guess", "s3cret"):                    # the third failure locks
            locked = login("carol", password)
            assert locked.status_code == 429 and "try again in 5 minutes" in locked.text
        clock.now += 301
        assert login("carol", "s3cret").status_code == 200
        for k in range(4):                                      # many names, one address
            assert login(f"user{k}", "guess").status_code == 400
        for name, password in (("user4", "guess"), ("carol", "s3cret")):
            locked = login(name, password)
            assert locked.status_code == 429 and "your address" in locked.text
        clock.now += 301
        assert login("carol", "s3cret").status_code == 200
