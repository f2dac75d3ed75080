"""Encryption at rest on real node processes with RocksDB storage.

The checked requirement: after a node with data keys writes a known plaintext value and
stops, no file under its data directory contains that value -- while the same check on a
node without keys does find it (so the check can fail). Then what an operator does with
it: restart and read back, refusal without the keys, rotation with ``generate-key`` and
``rewrap``, removing the old key, and hints (a write kept for a replica that is down)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from leaderless.client import AsyncClient, LeaderlessError
from leaderless.core.hints import HINT_PREFIX
from leaderless.core.keys import prefix_end
from leaderless.runtime.ports import free_port
from leaderless.security.data_keys import generate_entry, parse_data_keys
from leaderless.storage.encrypted import at_rest, record_key_id
from leaderless.storage.rocks import RocksStore
from tests.integration.helpers import DEADLINE_S, NodeProcess, Processes, run_cli, wait_until

pytestmark = pytest.mark.integration
KEYSPACE = "secrets"


def run(coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(coro())


def canary() -> bytes:
    """A value no file could contain by chance. Random bytes, not text: RocksDB compresses
    its files with LZ4, which would replace any 4+ byte run the value shares with nearby
    data (a readable prefix shared with the key, say) by a back-reference, and the control
    check would then miss a value that is really stored in clear."""
    return os.urandom(48)


def start(processes: Processes, name: str, *extra: str, join: str | None = None,
          env: dict[str, str] | None = None) -> tuple[NodeProcess, str]:
    client = f"127.0.0.1:{free_port()}"
    node = processes.start_node(name, None, join, env, "--client", client, *extra)
    return node, client


def wait_ready(node: NodeProcess, members: int = 1) -> None:
    wait_until(lambda: sum(m.state == "alive" for m in node.members().values()) == members,
               f"{node.name} sees {members} live member(s)")


def stop(node: NodeProcess) -> None:
    """A clean stop (SIGTERM): the node closes its store, as an operator's stop would."""
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=DEADLINE_S) == 0, node.log_path.read_text()[-2000:]


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every regular file under ``root`` (read whole, as bytes) that contains ``needle``."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and needle in path.read_bytes():
            found.append(str(path.relative_to(root)))
    return found


def write_key_file(path: Path, *entries: str) -> Path:
    path.write_text("".join(e + "\n" for e in entries))
    path.chmod(0o600)
    return path


async def put_and_check(client_address: str, key: bytes, value: bytes,
                        replication: int | None = 1, consistency: str = "ONE") -> None:
    """Write and read back (creating the keyspace first unless ``replication`` is None)."""
    async with AsyncClient([client_address], timeout_s=15) as client:
        if replication is not None:
            await client.create_keyspace(KEYSPACE, replication=replication,
                                         if_not_exists=True)
        await client.put(KEYSPACE, key, value, consistency=consistency)
        assert await client.get(KEYSPACE, key, consistency="ONE") == value


async def get(client_address: str, key: bytes) -> bytes | None:
    async with AsyncClient([client_address], timeout_s=15) as client:
        return await client.get(KEYSPACE, key, consistency="ONE")


def test_raw_files_hold_no_plaintext_with_keys_and_do_without(
        processes: Processes, tmp_path: Path) -> None:
    key_file = write_key_file(tmp_path / "data.keys", generate_entry("k1"))
    secret, plain, partition = canary(), canary(), canary()

    encrypted, client = start(processes, "enc", "--encryption-key-file", str(key_file))
    control, control_client = start(processes, "plain")
    for node in (encrypted, control):
        wait_ready(node)
    run(lambda: put_and_check(client, partition, secret))
    run(lambda: put_and_check(control_client, partition, plain))
    stop(encrypted)
    stop(control)

    # The control proves the check reads the files where values land.
    assert files_containing(control.data_dir, plain), "the control node's files lack its value"
    assert files_containing(encrypted.data_dir, secret) == []
    # Keys stay plaintext (ranges and Merkle trees need them): documented, and checked here
    # so the scan is known to have read the store's files.
    assert files_containing(encrypted.data_dir / "data", partition)

    # The same keys read it back after a restart.
    again, client = start(processes, "enc", "--encryption-key-file", str(key_file))
    wait_ready(again)
    assert run(lambda: get(client, partition)) == secret
    stop(again)


def test_mismatched_settings_refuse_to_start(processes: Processes, tmp_path: Path) -> None:
    key_file = write_key_file(tmp_path / "data.keys", generate_entry("k1"))
    node, client = start(processes, "n1", "--encryption-key-file", str(key_file))
    wait_ready(node)
    run(lambda: put_and_check(client, b"k", b"v"))
    stop(node)

    without = processes.start_node("n1")  # the same data dir, no keys
    assert without.process.wait(timeout=DEADLINE_S) != 0
    assert "is encrypted at rest" in without.log_path.read_text()

    other = write_key_file(tmp_path / "other.keys", generate_entry("k1"))  # not the same key
    wrong = processes.start_node("n1", None, None, None, "--encryption-key-file", str(other))
    assert wrong.process.wait(timeout=DEADLINE_S) != 0
    assert "does not decrypt under data key 'k1'" in wrong.log_path.read_text()

    plain, plain_client = start(processes, "p1")
    wait_ready(plain)
    run(lambda: put_and_check(plain_client, b"k", b"v"))
    stop(plain)
    late = processes.start_node("p1", None, None, None, "--encryption-key-file", str(key_file))
    assert late.process.wait(timeout=DEADLINE_S) != 0
    assert "written without encryption" in late.log_path.read_text()


def test_rotation_rewrap_and_retiring_the_old_key(processes: Processes, tmp_path: Path) -> None:
    key_file = tmp_path / "data.keys"
    assert run_cli("encryption", "generate-key", "--id", "k1", "--key-file",
                   str(key_file)).returncode == 0
    old_value = canary()
    node, client = start(processes, "n1", "--encryption-key-file", str(key_file))
    wait_ready(node)
    run(lambda: put_and_check(client, b"old", old_value))
    stop(node)

    # Rotate: k2 becomes the primary; k1 stays so that old rows remain readable.
    assert run_cli("encryption", "generate-key", "--id", "k2", "--key-file",
                   str(key_file)).returncode == 0
    new_value = canary()
    node, client = start(processes, "n1", "--encryption-key-file", str(key_file))
    wait_ready(node)
    assert run(lambda: get(client, b"old")) == old_value
    run(lambda: put_and_check(client, b"new", new_value))
    stop(node)
    status = run_cli("encryption", "status", "--data-dir", str(node.data_dir))
    assert status.returncode == 0 and "k1\t" in status.stdout and "k2\t" in status.stdout

    rewrap = run_cli("encryption", "rewrap", "--data-dir", str(node.data_dir),
                     "--key-file", str(key_file))
    assert rewrap.returncode == 0, rewrap.stderr
    assert "from k1" in rewrap.stdout
    status = run_cli("encryption", "status", "--data-dir", str(node.data_dir))
    assert "k1\t" not in status.stdout and "k2\t" in status.stdout

    # Retire k1: only k2 left in the file, and every row still reads.
    lines = [line for line in key_file.read_text().splitlines() if line.startswith("k2:")]
    write_key_file(key_file, *lines)
    node, client = start(processes, "n1", "--encryption-key-file", str(key_file))
    wait_ready(node)
    assert run(lambda: get(client, b"old")) == old_value
    assert run(lambda: get(client, b"new")) == new_value
    stop(node)
    assert files_containing(node.data_dir, old_value) == []
    assert files_containing(node.data_dir, new_value) == []


def test_hints_for_a_down_replica_are_encrypted(processes: Processes, tmp_path: Path) -> None:
    entry = generate_entry("k1")
    env = {"LEADERLESS_ENCRYPTION_KEY": entry}  # the variable, for once
    first, client = start(processes, "h1", env=env)
    wait_ready(first)
    second, _ = start(processes, "h2", join=first.address, env=env)
    wait_ready(first, members=2)
    wait_ready(second, members=2)

    def both_replicas_take_a_write() -> bool:  # once h1's ring has h2 up
        try:
            run(lambda: put_and_check(client, b"warmup", b"x", replication=2,
                                      consistency="ALL"))
        except LeaderlessError:
            return False
        return True

    wait_until(both_replicas_take_a_write, "a write reaches both replicas")
    second.process.send_signal(signal.SIGKILL)
    second.process.wait(timeout=DEADLINE_S)
    # Dead, not just suspect: then the coordinator stores the hint at once.
    wait_until(lambda: getattr(first.members().get("h2"), "state", "dead") == "dead",
               "h1 sees h2 dead")
    secret = canary()
    run(lambda: put_and_check(client, b"hinted", secret, replication=None))
    stop(first)
    assert files_containing(first.data_dir, secret) == []
    # The hint is there (so the check above covered one), encrypted, and opens to the write.
    raw = RocksStore(first.data_dir / "data")
    try:
        hints = list(raw.scan(HINT_PREFIX, prefix_end(HINT_PREFIX)))
        assert hints and all(record_key_id(record) == "k1" for _, record in hints)
        store = at_rest(raw, parse_data_keys(entry, source="test"), where="h1")
        assert any(secret in value for _, value in store.scan(HINT_PREFIX,
                                                               prefix_end(HINT_PREFIX)))
    finally:
        raw.close()
