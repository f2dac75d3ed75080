"""Issue 5's check with every security feature on at once, on real processes: a 3-node
cluster started with mutual TLS (certificates made by ``leaderless certs``), an encrypted
gossip keyring, authentication with a bootstrap admin password file, and encryption at rest.

One cluster start (plus a rogue node from another CA) carries every assertion: the rogue
cannot join and both sides log why; clients need a token, TLS and the right roles; TOTP;
a live keyring rotation keeps gossip flowing; the node port wants a client certificate; the
denials show in /metrics; and the stopped nodes' files hold no written value."""

from __future__ import annotations

import asyncio
import os
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyotp
import pytest

from leaderless.api.client import Client
from leaderless.client import AsyncClient, ClientTls
from leaderless.client.errors import (
    BadCredentialsError,
    ConnectionLostError,
    NoNodeAvailableError,
    PermissionDeniedError,
    TotpRequiredError,
    UnauthenticatedError,
)
from leaderless.config import parse_host_port
from leaderless.security.data_keys import generate_entry
from leaderless.security.tls import client_context
from tests.integration.helpers import (
    LEADERLESS,
    NodeProcess,
    Processes,
    clean_env,
    run_cli,
    wait_until,
)
from tests.integration.test_auth import (
    ADMIN_PASSWORD,
    PASSWORD,
    admin_login,
    http,
    set_up_tenants,
    wrong_code,
)
from tests.integration.test_encryption_at_rest import files_containing, stop, write_key_file
from tests.integration.test_keyring import delivered, key_id, keyring_file, new_key
from tests.integration.test_ops import get, start
from tests.unit.test_metrics import Scrape

pytestmark = pytest.mark.integration

NAMES = ("s1", "s2", "s3")
INFO = ("--log-level", "info")
"""The nodes log each delivered user event at info: the rotation check reads them."""
SECRET = b"tenant-b-secret-value"


class Pki:
    """The cluster CA (nodes s1-s3, admin client ``ops``) and another CA (node ``rogue``),
    made through the CLI as an operator would."""

    def __init__(self, root: Path) -> None:
        self.cluster = root / "cluster-ca"
        self.other = root / "other-ca"
        for ca in (self.cluster, self.other):
            cli_ok("certs", "init", "--out", str(ca))
        for name in NAMES:
            cli_ok("certs", "issue", name, "--ca", str(self.cluster))
        cli_ok("certs", "issue-client", "ops", "--ca", str(self.cluster))
        cli_ok("certs", "issue", "rogue", "--ca", str(self.other))
        self.ca = self.cluster / "ca.crt"

    def node_flags(self, name: str, ca: Path | None = None) -> list[str]:
        ca = ca or self.cluster
        return ["--tls-ca", str(ca / "ca.crt"), "--tls-cert", str(ca / f"{name}.crt"),
                "--tls-key", str(ca / f"{name}.key")]

    def env(self, *, client_certificate: bool = True) -> dict[str, str]:
        """What the CLI reads to reach a TLS cluster (the ``ops`` client certificate)."""
        env = {"LEADERLESS_TLS_CA": str(self.ca)}
        if client_certificate:
            env |= {"LEADERLESS_TLS_CERT": str(self.cluster / "ops.crt"),
                    "LEADERLESS_TLS_KEY": str(self.cluster / "ops.key")}
        return env


def cli_ok(*args: str) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def tls_cli(pki: Pki, *args: str, client_certificate: bool = True
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LEADERLESS, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env=clean_env(pki.env(client_certificate=client_certificate)))


def admin_view(pki: Pki, node: NodeProcess, what: str) -> Any:
    """``members`` or ``status`` asked on the node port with the ``ops`` client certificate
    (None if the node does not answer)."""
    context = client_context(pki.ca, pki.cluster / "ops.crt", pki.cluster / "ops.key")

    async def ask() -> Any:
        async with Client(parse_host_port(node.address), timeout_s=5.0,
                          ssl_context=context) as client:
            return await (client.members() if what == "members" else client.status())

    try:
        return asyncio.run(ask())
    except (OSError, TimeoutError, ConnectionError):
        return None


def alive(pki: Pki, node: NodeProcess) -> set[str]:
    return {m.name for m in admin_view(pki, node, "members") or () if m.state == "alive"}


def gossip_drops(pki: Pki, node: NodeProcess) -> dict[str, int]:
    status = admin_view(pki, node, "status")
    assert status is not None, f"{node.name} does not answer its admin status"
    malformed: dict[str, int] = status.runtime.get("dropped_malformed_total", {})
    return {kind: n for kind, n in malformed.items() if kind.startswith("gossip_")}


def metrics(url: str, token: str) -> Scrape:
    request = urllib.request.Request(url + "/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return Scrape(response.read())


@asynccontextmanager
async def closing(client: AsyncClient) -> AsyncIterator[AsyncClient]:
    """A client that is not connected yet (``async with AsyncClient`` would connect before
    a login, and auth refuses that), closed at the end."""
    try:
        yield client
    finally:
        await client.close()


def logged(node: NodeProcess, msg: str, **fields: str) -> list[dict[str, Any]]:
    return [line for line in node.log() if line.get("msg") == msg
            and all(line.get(k) == v for k, v in fields.items())]


@pytest.mark.timeout(300)
def test_everything_on_at_once(processes: Processes, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    pki = Pki(tmp_path)
    # urllib (test_ops.get, test_auth.http) trusts the cluster CA as any HTTPS tool would.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    old_key = new_key()
    keyring = keyring_file(tmp_path / "keyring", old_key)
    password_file = tmp_path / "admin-password"
    password_file.write_text(ADMIN_PASSWORD + "\n")
    password_file.chmod(0o600)
    data_keys = write_key_file(tmp_path / "data.keys", generate_entry("k1"))
    common = ["--gossip-keyring", keyring, "--auth", "--admin-password-file",
              str(password_file), "--encryption-key-file", str(data_keys), *INFO]

    first, first_url = start(processes, NAMES[0], None, *pki.node_flags(NAMES[0]), *common)
    urls = [first_url.replace("http://", "https://")]
    wait_until(lambda: get(urls[0] + "/health/live")[0] == 200, "the first node is live")
    nodes = [first]
    for name in NAMES[1:]:
        node, url = start(processes, name, first.address, *pki.node_flags(name), *common)
        nodes.append(node)
        urls.append(url.replace("http://", "https://"))
    wait_until(lambda: all(get(url + "/health/ready")[0] == 200 for url in urls)
               and all(alive(pki, n) == set(NAMES) for n in nodes),
               "all nodes are ready and see each other alive", timeout_s=60)

    # A node whose certificate comes from another CA (same keyring, same flags otherwise).
    rogue, _ = start(processes, "rogue", first.address,
                     *pki.node_flags("rogue", pki.other), *common)

    admin_token = admin_login(urls[0])
    assert http("GET", urls[1] + "/v1/keyspaces")[0] == 401  # HTTPS, but no token
    assert http("GET", urls[1] + "/v1/keyspaces", token="forged")[0] == 401
    status, ring = http("GET", urls[0] + "/v1/ring", token=admin_token)
    assert status == 200
    clients = [m["client_address"] for m in ring["members"]]
    partition, canary = os.urandom(16), os.urandom(48)
    asyncio.run(clients_scenario(pki, clients, partition, canary))

    # The refusals are counted where they happened: /metrics shows them (summed over nodes).
    scrapes = [metrics(url, admin_token) for url in urls]

    def total(event: str) -> float:
        return sum(s.value("leaderless_auth_events_total", event=event) for s in scrapes)

    assert total("permission_denied") >= 2  # the reader's put, the tenant's get
    assert total("unauthenticated") >= 1  # the forged token (a missing one is not counted)
    assert total("login_failed") >= 1  # the wrong TOTP code
    assert total("login") >= 5

    rotate_keyring(pki, nodes, old_key)

    # An admin request on the node port needs a client certificate, and says so.
    refused = tls_cli(pki, "members", "--node", first.address, client_certificate=False)
    assert refused.returncode != 0 and "LEADERLESS_TLS_CERT" in refused.stderr, refused.stderr
    assert tls_cli(pki, "members", "--node", first.address).returncode == 0

    # The rogue never became a member, and both sides logged why.
    wait_until(lambda: any("certificate verify failed" in line.get("error", "")
                           for line in logged(rogue, "join_push_pull_failed")),
               "the rogue logs that the seed's certificate failed verification")
    # TLS 1.3: the joiner checks the seed's certificate first and hangs up, so the seed
    # logs that the peer may not trust its CA (with TLS 1.2 it would name the failed check).
    wait_until(lambda: any(("another cluster's CA" in line.get("error", "")
                            or "certificate verify failed" in line.get("error", ""))
                           for line in logged(first, "dropped_malformed",
                                              kind="tls_handshake")),
               "the seed logs the refused TLS handshake and why")
    assert all(alive(pki, n) == set(NAMES) for n in nodes)
    assert all("rogue" not in {m.name for m in admin_view(pki, n, "members")} for n in nodes)
    assert rogue.process.poll() is None  # refused, not crashed: it keeps trying

    # At rest: the stopped nodes' files hold the canary's key (so the scan read the store)
    # but not its value.
    for node in nodes:
        stop(node)
    assert all(files_containing(n.data_dir, canary) == [] for n in nodes)
    assert all(files_containing(n.data_dir / "data", partition) for n in nodes)


async def clients_scenario(pki: Pki, clients: list[str], partition: bytes,
                           canary: bytes) -> None:
    tls = ClientTls(pki.ca)
    # No token: refused before anything else.
    with pytest.raises(UnauthenticatedError):
        async with AsyncClient(clients, timeout_s=10, tls=tls):
            pass
    # Plaintext to the TLS client port: a clear failure naming TLS, not a hang.
    with pytest.raises((ConnectionLostError, NoNodeAvailableError)) as plain:
        async with AsyncClient(clients, timeout_s=10, connect_timeout_s=2):
            pass
    assert "TLS" in str(plain.value)

    async with closing(AsyncClient(clients, timeout_s=10, tls=tls)) as admin:
        await admin.login("admin", ADMIN_PASSWORD)
        await set_up_tenants(admin)
        await admin.create_keyspace("vault", if_not_exists=True)
        await admin.put("vault", partition, canary, consistency="ALL")  # on every node

        async with closing(AsyncClient(clients, timeout_s=10, tls=tls)) as reader:
            await reader.login("reader1", PASSWORD)
            assert await reader.get("shared", "k") == b"shared value"
            with pytest.raises(PermissionDeniedError):
                await reader.put("shared", "k", b"overwritten")
        assert await admin.get("shared", "k") == b"shared value"

        async with closing(AsyncClient(clients, timeout_s=10, tls=tls)) as alice:
            await alice.login("alice", PASSWORD)
            assert [k.name for k in await alice.list_keyspaces()] == ["tenant_a"]
            with pytest.raises(PermissionDeniedError) as denied:
                await alice.get("tenant_b", "k")
            assert SECRET.decode() not in denied.value.message

        uri = await admin.enable_totp("carol")
        totp = pyotp.parse_uri(uri)
        assert isinstance(totp, pyotp.TOTP)
        async with closing(AsyncClient(clients, timeout_s=10, tls=tls)) as carol:
            with pytest.raises(TotpRequiredError):
                await carol.login("carol", PASSWORD)
            with pytest.raises(BadCredentialsError):
                await carol.login("carol", PASSWORD, wrong_code(uri))
            await carol.login("carol", PASSWORD, totp.now())
            assert await carol.get("shared", "k") == b"shared value"


def rotate_keyring(pki: Pki, nodes: list[NodeProcess], old_key: str) -> None:
    """install -> use -> remove through the CLI with the ops client certificate; a user
    event sealed under the new key reaches every node; nobody drops a datagram or dies."""
    new = new_key()
    addresses = [n.address for n in nodes]
    steps = (("install", new, f"key {key_id(new)} installed on 3/3 nodes"),
             ("use", new, "now primary on 3/3 nodes"),
             ("remove", old_key, f"key {key_id(old_key)} removed on 3/3 nodes"))
    for i, (step, key, done) in enumerate(steps):
        result = tls_cli(pki, "keyring", step, key, "--node", addresses[i])
        assert result.returncode == 0 and done in result.stdout, (step, result.stderr)
        if step != "install":
            event = f"after-{step}"
            sent = tls_cli(pki, "event", "send", event, "rotation", "--node", addresses[0])
            assert sent.returncode == 0, sent.stderr
            wait_delivered(nodes, event)
    assert all(alive(pki, n) == set(NAMES) for n in nodes)
    assert all(gossip_drops(pki, n) == {} for n in nodes)
    assert all(logged(n, "member", kind="dead") == [] for n in nodes)


def wait_delivered(nodes: list[NodeProcess], event: str) -> None:
    wait_until(lambda: all(delivered(n, event) for n in nodes),
               f"every node delivered the user event {event!r}")
