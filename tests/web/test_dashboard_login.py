"""The dashboard with auth off and on, in a real browser (Playwright driving Debian's
chromium, headless) against real node processes: with auth off the page shows the cluster
and no form; with ``--auth`` it shows a login form, a wrong password an error, the right
one the live dashboard with the user's name; a revoked session and "Log out" return to the
form; too many failures show the wait; an unreachable node says so. The stream itself
refuses a caller without a token and ends a stream whose token is revoked. Screenshots go
under the test's tmp dir and, when set, ``$LEADERLESS_TEST_ARTIFACTS``.

Skipped, with the reason, where chromium or the Python package ``playwright`` is missing.
Waits are deadlines, never timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyotp
import pytest

from leaderless.client import AsyncClient
from tests.integration.helpers import NodeProcess, Processes, wait_until
from tests.integration.test_ops import get, start, start_ready_cluster
from tests.web.test_dashboard import (
    CHROMIUM_ARGS,
    DEADLINE_MS,
    chromium_or_skip,
    save_screenshot,
)

if TYPE_CHECKING:
    from playwright.sync_api import ViewportSize

pytestmark = pytest.mark.integration

ADMIN = "admin"
"""The user an auth-enabled cluster creates first (``security.auth.ADMIN_USER``)."""
ADMIN_PASSWORD = "dashboard-admin-secret-7"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
WATCHER = "watcher"
"""A user with TOTP and no role: logging in is enough to watch the dashboard."""
WATCHER_PASSWORD = "watching-the-cluster-9"
LOGIN_ATTEMPTS_MAX = 20
"""Wrong passwords tried before giving up on seeing the back-off (the node allows 5)."""


def request(url: str, method: str = "GET", body: Any = None, token: str | None = None
            ) -> tuple[int, Any]:
    """(status, decoded JSON body or None) of one HTTP request; status 0 if unreachable."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method),
                                    timeout=10) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def login(url: str, password: str = ADMIN_PASSWORD) -> str | None:
    """A session token for the admin, or None while the node cannot log it in."""
    status, body = request(url + "/v1/auth/login", "POST",
                           {"user": ADMIN, "password": password})
    return body["token"] if status == 200 else None


def start_auth_cluster(processes: Processes, tmp_path: Path, names: tuple[str, ...]
                       ) -> tuple[list[NodeProcess], list[str], str]:
    """Nodes started with ``--auth`` and a known admin password; (nodes, HTTP URLs, an
    admin token) once every node is ready, logs the admin in and sees all of them alive."""
    password_file = tmp_path / "admin-password"
    password_file.write_text(ADMIN_PASSWORD + "\n")
    password_file.chmod(0o600)
    extra = ("--auth", "--admin-password-file", str(password_file))
    first, first_url = start(processes, names[0], None, *extra)
    wait_until(lambda: get(first_url + "/health/live")[0] == 200, "the first node is live")
    others = [start(processes, name, first.address, *extra) for name in names[1:]]
    nodes = [first, *(node for node, _ in others)]
    urls = [first_url, *(url for _, url in others)]
    wait_until(lambda: all(get(url + "/health/ready")[0] == 200 for url in urls),
               "every node is ready", timeout_s=60)
    tokens: list[str] = []

    def logged_in() -> bool:
        token = login(first_url)
        if token:
            tokens.append(token)
        return bool(tokens)

    wait_until(logged_in, "the admin can log in", timeout_s=60)

    def all_alive() -> bool:
        for url in urls:
            status, body = request(url + "/api/cluster", token=tokens[0])
            if status != 200 or sum(m["state"] == "alive" for m in body["members"]) != len(urls):
                return False
        return True

    wait_until(all_alive, "every node sees all of them alive", timeout_s=60)
    return nodes, urls, tokens[0]


@contextmanager
def browser_page(executable: str, viewport: ViewportSize
                 ) -> Iterator[tuple[Any, list[str]]]:
    """A fresh page (its own cookies) and the list its uncaught script errors go to."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            page = browser.new_context(viewport=viewport).new_page()
            page.set_default_timeout(DEADLINE_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def create_totp_user(url: str, token: str) -> pyotp.TOTP:
    """The watcher, with TOTP on (through the native client, as the admin); its TOTP."""
    status, ring = request(url + "/v1/ring", token=token)
    assert status == 200, ring
    clients = [m["client_address"] for m in ring["members"]]

    async def go() -> str:
        admin = AsyncClient(clients, timeout_s=10)
        try:
            await admin.login(ADMIN, ADMIN_PASSWORD)
            await admin.create_user(WATCHER, WATCHER_PASSWORD)
            return await admin.enable_totp(WATCHER)
        finally:
            await admin.close()

    totp = pyotp.parse_uri(asyncio.run(go()))
    assert isinstance(totp, pyotp.TOTP)
    return totp


def wrong_code(totp: pyotp.TOTP) -> str:
    """A code no step near now accepts."""
    now = time.time()
    near = {totp.at(now + steps * totp.interval) for steps in range(-2, 3)}
    return next(code for code in (f"{n:06d}" for n in range(10**6)) if code not in near)


def wait_live(page: Any, node: str, members: int) -> None:
    """The dashboard shows ``node``'s view with ``members`` alive and its charts grow."""
    page.wait_for_function(f"document.getElementById('node-name').textContent === '{node}'")
    page.wait_for_function("document.querySelectorAll('#members tbody tr[data-state=alive]')"
                           f".length === {members}")
    before = page.evaluate("window.dashboard.points('cpu')")
    page.wait_for_function(f"window.dashboard.points('cpu') >= {before + 2}")


def wait_fits_width(page: Any) -> None:
    """Nothing makes the page scroll sideways (wide tables scroll inside their panel),
    once the charts have followed a new viewport size."""
    page.wait_for_function("document.documentElement.scrollWidth <= window.innerWidth + 1")


def stored_tokens(page: Any) -> str:
    """Everything script-visible storage holds: the session must not be there."""
    return str(page.evaluate(
        "JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage),"
        " document.cookie])"))


def error_text(page: Any) -> str:
    return str(page.locator("#login-error").text_content() or "")


@pytest.mark.timeout(300)
def test_dashboard_without_auth_has_no_login(processes: Processes, tmp_path: Path) -> None:
    executable = chromium_or_skip()
    _, urls = start_ready_cluster(processes, ("open1",))
    assert request(urls[0] + "/v1/auth/whoami") == (200, {"user": None, "auth": False})
    with browser_page(executable, DESKTOP) as (page, errors):
        page.goto(urls[0] + "/")
        wait_live(page, "open1", 1)
        assert page.locator("#login").is_hidden()
        assert page.locator("#session").is_hidden()
        assert "not enabled" in (page.locator("#auth-note").text_content() or "")
        assert page.evaluate("window.dashboard.auth.enabled") is False
        save_screenshot(page, tmp_path, "dashboard-auth-off.png")
        page.set_viewport_size(PHONE)
        page.wait_for_function("window.dashboard.points('cpu') >= 1")
        wait_fits_width(page)
        save_screenshot(page, tmp_path, "dashboard-auth-off-phone.png")
        assert errors == [], errors


@pytest.mark.timeout(420)
def test_dashboard_login_logout_and_session_end(processes: Processes,
                                                tmp_path: Path) -> None:
    executable = chromium_or_skip()
    nodes, urls, token = start_auth_cluster(processes, tmp_path, ("lg1", "lg2", "lg3"))
    url = urls[0]
    totp = create_totp_user(url, token)  # before the browser: Playwright runs its own loop

    # The stream itself: no token, 401 unauthenticated; a revoked token ends it.
    status, body = request(url + "/api/dashboard/stream")
    assert status == 401 and body["error"] == "unauthenticated", (status, body)
    assert request(url + "/v1/auth/whoami")[0] == 401
    stream = urllib.request.urlopen(urllib.request.Request(
        url + "/api/dashboard/stream", headers={"Authorization": f"Bearer {token}"}),
        timeout=30)
    try:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert _next_event(stream)[0] == "snapshot"
        assert request(url + "/v1/auth/logout", "POST", token=token)[0] == 200
        name, data = _next_event(stream, skip="snapshot")
        assert name == "unauthenticated" and data["error"] == "unauthenticated", data
    finally:
        stream.close()

    with browser_page(executable, DESKTOP) as (page, errors):
        page.goto(url + "/")
        # The form, focused on the user field, every input labelled.
        page.wait_for_selector("#login-form")
        assert page.locator("#dashboard").is_hidden()
        page.wait_for_function("document.activeElement.id === 'login-user'")
        assert page.get_by_label("User").count() == 1
        assert page.get_by_label("Password").count() == 1
        assert page.locator("#totp-row").is_hidden()
        save_screenshot(page, tmp_path, "dashboard-login.png")

        # A wrong password: an error that does not say which part was wrong.
        page.keyboard.type(ADMIN)
        page.keyboard.press("Tab")
        page.keyboard.type("not-the-password-at-all")
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('login-error').textContent !== ''")
        assert error_text(page) == "Wrong user name or password."
        assert page.locator("#dashboard").is_hidden()
        assert page.evaluate("document.activeElement.id") == "login-password"
        save_screenshot(page, tmp_path, "dashboard-login-error.png")

        # The right one, by keyboard: the dashboard, live, with the user's name.
        page.keyboard.type(ADMIN_PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_selector("#dashboard", state="visible")
        wait_live(page, "lg1", 3)
        assert page.locator("#user-name").text_content() == ADMIN
        assert page.locator("#login").is_hidden()
        assert page.evaluate("window.dashboard.auth.user") == ADMIN
        page.wait_for_selector("#keyspaces tbody tr")
        assert "could not load" not in (page.locator("#keyspaces").text_content() or "")
        cookies = {c["name"]: c for c in page.context.cookies()}
        session = cookies["leaderless_token"]
        assert session["httpOnly"] and session["sameSite"] == "Strict"
        assert session["value"] not in stored_tokens(page)
        save_screenshot(page, tmp_path, "dashboard-logged-in.png")
        page.set_viewport_size(PHONE)
        page.wait_for_function("window.dashboard.points('cpu') >= 1")
        wait_fits_width(page)
        assert page.locator("#logout").is_visible()
        save_screenshot(page, tmp_path, "dashboard-logged-in-phone.png")
        page.set_viewport_size(DESKTOP)

        # The session revoked elsewhere: the stream ends and the page returns to the form.
        assert request(url + "/v1/auth/logout", "POST", token=session["value"])[0] == 200
        page.wait_for_selector("#login-form", state="visible")
        assert "session has ended" in error_text(page)
        assert page.locator("#dashboard").is_hidden()

        # Log in again, then "Log out" (keyboard): the form, and the session really ended.
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Log in").click()
        wait_live(page, "lg1", 3)
        page.get_by_role("button", name="Log out").focus()
        page.keyboard.press("Enter")
        page.wait_for_function("!document.getElementById('login').hidden"
                               " || !document.getElementById('notice').hidden")
        assert page.locator("#notice").is_hidden(), page.locator("#notice").text_content()
        assert error_text(page) == "You are logged out."
        page.reload()
        page.wait_for_selector("#login-form", state="visible")
        assert page.locator("#dashboard").is_hidden()
        page.set_viewport_size(PHONE)
        wait_fits_width(page)
        save_screenshot(page, tmp_path, "dashboard-login-phone.png")
        page.set_viewport_size(DESKTOP)

        # A user with TOTP, in a browser of its own: the code is asked only after the
        # password, a wrong code is refused like a wrong password, the right one logs in.
        other = page.context.browser.new_context(viewport=DESKTOP).new_page()
        other.on("pageerror", lambda exc: errors.append(str(exc)))
        other.set_default_timeout(DEADLINE_MS)
        other.goto(url + "/")
        other.get_by_label("User").fill(WATCHER)
        other.get_by_label("Password").fill(WATCHER_PASSWORD)
        other.get_by_role("button", name="Log in").click()
        other.wait_for_selector("#totp-row", state="visible")
        other.wait_for_function("document.activeElement.id === 'login-totp'")
        assert "code from your authenticator app" in error_text(other)
        other.get_by_label("Authenticator code").fill(wrong_code(totp))
        other.get_by_role("button", name="Log in").click()
        other.wait_for_function(
            "document.getElementById('login-error').textContent.startsWith('Wrong')")
        assert error_text(other) == "Wrong user name, password or authenticator code."
        assert other.locator("#dashboard").is_hidden()
        save_screenshot(other, tmp_path, "dashboard-login-totp.png")
        other.get_by_label("Password").fill(WATCHER_PASSWORD)
        other.get_by_label("Authenticator code").fill(totp.now())
        other.get_by_role("button", name="Log in").click()
        wait_live(other, "lg1", 3)
        assert other.locator("#user-name").text_content() == WATCHER
        other.context.close()

        # Wrong passwords until the node backs off: the wait is shown, the button waits.
        page.get_by_label("User").fill(ADMIN)
        for _ in range(LOGIN_ATTEMPTS_MAX):
            page.get_by_label("Password").fill("still-not-the-password")
            page.get_by_role("button", name="Log in").click()
            page.wait_for_function(
                "document.getElementById('login-error').textContent !== ''"
                " && document.getElementById('login-form').getAttribute('aria-busy')"
                " === 'false'")
            if "Too many" in error_text(page):
                break
        message = error_text(page)
        assert re.fullmatch(r"Too many failed attempts\. Try again in \d+ s\.", message), message
        assert page.locator("#login-submit").is_disabled()
        save_screenshot(page, tmp_path, "dashboard-login-throttled.png")
        page.wait_for_function("!document.getElementById('login-submit').disabled",
                               timeout=360_000)

        # The node gone: the form says it cannot reach it.
        nodes[0].process.send_signal(signal.SIGKILL)
        nodes[0].process.wait(timeout=10)
        page.get_by_label("Password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_function(
            "document.getElementById('login-error').textContent.startsWith('Could not reach')")
        assert errors == [], errors


def _next_event(stream: Any, skip: str = "") -> tuple[str, Any]:
    """The next server-sent event (name, decoded data) other than ``skip`` events."""
    name, data = "message", ""
    for raw in stream:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data += line[len("data: "):]
        elif not line and data:
            if name != skip:
                return name, json.loads(data)
            name, data = "message", ""
    raise AssertionError("the stream ended without another event")
