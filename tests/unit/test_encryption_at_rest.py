"""Encryption at rest: data keys (format, limits), the EncryptedStore (round trips, the
Store behaviour suite, tamper, wrong and missing keys, rotation and rewrap, stores written
without encryption), and the ``leaderless encryption`` commands."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from leaderless.cli import main
from leaderless.core.cells import Cell, decode_cell, encode_cell
from leaderless.core.keys import data_key
from leaderless.security import data_keys as data_keys_module
from leaderless.security.data_keys import (
    DATA_KEYS_MAX,
    KEY_FILE_BYTES_MAX,
    DataKeyError,
    DataKeys,
    generate_entry,
    load_data_keys,
    load_key_file,
    new_key_id,
    parse_data_keys,
)
from leaderless.storage import encrypted as encrypted_module
from leaderless.storage.encrypted import (
    FORMAT_V1,
    MARKER_KEY,
    NONCE_BYTES,
    PLAINTEXT,
    SALT_BYTES,
    DecryptionError,
    EncryptedStore,
    EncryptedStoreError,
    PlaintextStoreError,
    at_rest,
    census,
    record_key_id,
    rewrap,
)
from leaderless.storage.memory import MemoryStore
from leaderless.storage.rocks import RocksStore
from leaderless.storage.store import StorageError, Store

# The engine-neutral Store behaviour suite, run here against the encrypted store (the
# ``store`` fixture below): encryption must be invisible to everything above the Store.
from tests.unit.test_storage import (  # noqa: F401
    test_batch_applies_in_order,
    test_binary_keys_sort_bytewise,
    test_empty_value_is_a_value,
    test_get_write_delete,
    test_partition_scan_with_data_keys,
    test_scan_limit_and_reverse,
    test_scan_longer_than_a_chunk,
    test_scan_order_and_bounds,
    test_scan_skips_deleted,
    test_scan_while_writing,
    test_sync_then_use,
)


def keys_of(*ids: str) -> DataKeys:
    return parse_data_keys(",".join(generate_entry(i) for i in ids), source="test keys")


@pytest.fixture(params=["memory", "rocks", "rocks-buffered"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    inner: Store = (MemoryStore() if request.param == "memory" else
                    RocksStore(tmp_path / "db", buffer_writes=request.param == "rocks-buffered"))
    s = at_rest(inner, keys_of("k1"), where="test")
    yield s
    s.close()


# -- data keys ----------------------------------------------------------------------------

def test_key_file_format_first_entry_is_primary() -> None:
    a, b = generate_entry("k2026b"), generate_entry("k2026a")
    keys = parse_data_keys(f"# data keys\n\n{a}  # newest\n{b}\n", source="f")
    assert keys.primary_id == "k2026b"
    assert list(keys.keys) == ["k2026b", "k2026a"]
    assert keys.primary == base64.b64decode(a.split(":")[1])
    assert keys.key("k2026a") == base64.b64decode(b.split(":")[1])
    assert keys.key("nope") is None


def test_env_var_format_is_comma_separated() -> None:
    a, b = generate_entry("new"), generate_entry("old")
    keys = load_data_keys(None, f" {a} , {b} ")
    assert keys is not None and keys.primary_id == "new" and set(keys.keys) == {"new", "old"}
    assert keys.source == "LEADERLESS_ENCRYPTION_KEY"
    assert load_data_keys(None, None) is None


@pytest.mark.parametrize(("text", "error"), [
    ("", "no data key found"),
    ("# only a comment\n", "no data key found"),
    (base64.b64encode(bytes(32)).decode(), "no key id"),
    ("bad id:" + base64.b64encode(bytes(32)).decode(), "key id 'bad id' is invalid"),
    ("-x:" + base64.b64encode(bytes(32)).decode(), "is invalid"),
    ("k" * 33 + ":" + base64.b64encode(bytes(32)).decode(), "is invalid"),
    ("k1:not base64!", "not valid base64"),
    ("k1:" + base64.b64encode(bytes(16)).decode(), "is 16 bytes; data keys are 32"),
    ("k1:" + base64.b64encode(os.urandom(32)).decode() + "\nk1:"
     + base64.b64encode(os.urandom(32)).decode(), "line 2: key id 'k1' appears twice"),
    ("k1:" + base64.b64encode(bytes(32)).decode() + ",k2:" + base64.b64encode(bytes(32)).decode(),
     "entry 2: key 'k2' is the same key as 'k1'"),
])
def test_bad_keys_are_refused_with_where_and_why(text: str, error: str) -> None:
    with pytest.raises(DataKeyError, match="^src") as info:
        parse_data_keys(text, source="src")
    assert error in str(info.value)


def test_key_count_limit() -> None:
    entries = [generate_entry(f"k{i}") for i in range(DATA_KEYS_MAX + 1)]
    with pytest.raises(DataKeyError, match=f"at most {DATA_KEYS_MAX}"):
        parse_data_keys("\n".join(entries), source="f")
    assert len(parse_data_keys("\n".join(entries[:-1]), source="f").keys) == DATA_KEYS_MAX


def test_key_file_must_be_private_small_and_ascii(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(generate_entry("k1") + "\n")
    path.chmod(0o644)
    with pytest.raises(DataKeyError,
                       match=r"other users may access it \(mode 644\); run `chmod 600"):
        load_key_file(path)
    path.chmod(0o640)  # a service group may read it
    assert load_key_file(path).primary_id == "k1"
    path.chmod(0o600)
    assert load_key_file(path).primary_id == "k1"
    path.write_bytes(b"#" * (KEY_FILE_BYTES_MAX + 1))
    with pytest.raises(DataKeyError, match="larger than"):
        load_key_file(path)
    path.write_bytes("k\u00e9:xx".encode())
    with pytest.raises(DataKeyError, match="not ASCII"):
        load_key_file(path)
    with pytest.raises(DataKeyError, match="cannot read it"):
        load_key_file(tmp_path / "missing")
    with pytest.raises(DataKeyError, match="not both"):
        load_data_keys(path, generate_entry("k1"))


def test_generated_entries_and_ids() -> None:
    first, second = generate_entry("a"), generate_entry("a")
    assert first != second  # random keys
    assert len(base64.b64decode(first.split(":")[1])) == 32
    assert data_keys_module.KEY_ID_PATTERN.match(new_key_id())
    with pytest.raises(DataKeyError):
        generate_entry("no spaces")


# -- the encrypted store ----------------------------------------------------------------

def test_round_trip_and_nothing_plain_in_the_inner_store() -> None:
    inner = MemoryStore()
    store = at_rest(inner, keys_of("k1"), where="mem")
    secret = b"attack at dawn" * 3
    key = data_key("ks", b"user", b"sort")
    store.write([(key, secret), (b"h\x01x", secret)])
    assert store.get(key) == secret
    assert list(store.scan(b"")) == [(key, secret), (b"h\x01x", secret)]
    for row_key, record in inner.scan(b""):
        assert secret not in record
        if row_key != MARKER_KEY:
            assert record[0] == FORMAT_V1 and record_key_id(record) == "k1"
            # format, id length, id, salt, nonce, tag: a constant overhead per value
            assert len(record) == len(secret) + 1 + 1 + 2 + SALT_BYTES + NONCE_BYTES + 16
    store.write([(key, None)])
    assert store.get(key) is None and inner.get(key) is None


def test_cells_go_through_unchanged() -> None:
    store = at_rest(MemoryStore(), keys_of("k1"), where="mem")
    cell = Cell(hlc=123, writer="n1", value=b"v" * 1000, expires_at_ms=5)
    store.write([(data_key("ks", b"p"), encode_cell(cell))])
    raw = store.get(data_key("ks", b"p"))
    assert raw is not None and decode_cell(raw) == cell


def test_same_value_encrypts_differently_and_nonces_never_repeat() -> None:
    inner = MemoryStore()
    store = EncryptedStore(inner, keys_of("k1"))
    store.write([(b"k%d" % i, b"same") for i in range(1000)])
    records = [record for _, record in inner.scan(b"")]
    nonces = {r[2 + 2 + SALT_BYTES:2 + 2 + SALT_BYTES + NONCE_BYTES] for r in records}
    assert len(set(records)) == len(nonces) == 1000


def test_a_new_session_per_store_and_after_the_record_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    inner = MemoryStore()
    keys = keys_of("k1")
    EncryptedStore(inner, keys).write([(b"a", b"1")])
    monkeypatch.setattr(encrypted_module, "SESSION_RECORDS_MAX", 2)
    second = EncryptedStore(inner, keys)
    second.write([(b"b", b"2"), (b"c", b"3"), (b"d", b"4")])  # d starts a third session
    salts = {record[4:4 + SALT_BYTES] for _, record in inner.scan(b"")}
    assert len(salts) == 3
    reader = EncryptedStore(inner, keys)
    assert [v for _, v in reader.scan(b"")] == [b"1", b"2", b"3", b"4"]


def test_session_keys_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encrypted_module, "SESSION_KEYS_CACHED_MAX", 3)
    inner, keys = MemoryStore(), keys_of("k1")
    for i in range(10):  # ten node starts, ten sessions
        EncryptedStore(inner, keys).write([(b"k%d" % i, b"v%d" % i)])
    reader = EncryptedStore(inner, keys)
    for _ in range(2):
        assert [v for _, v in reader.scan(b"")] == [b"v%d" % i for i in range(10)]
    assert len(reader.cipher._sessions) <= 3


Edit = Callable[[bytearray], bytes]


def _tampered(inner: MemoryStore, key: bytes, edit: Edit) -> None:
    record = inner.get(key)
    assert record is not None
    inner.write([(key, edit(bytearray(record)))])


def _flip_last(b: bytearray) -> bytes:
    b[-1] ^= 1
    return bytes(b)


def _flip_salt(b: bytearray) -> bytes:
    b[5] ^= 1
    return bytes(b)


@pytest.mark.parametrize(("edit", "error"), [
    (_flip_last, "does not decrypt under data key 'k1'"),
    (_flip_salt, "does not decrypt under data key 'k1'"),
    (lambda b: bytes(b[:30]), "is truncated"),
    (lambda b: bytes(b[:1]), "is not encrypted"),
    (lambda b: b"", "is not encrypted"),
    (lambda b: bytes([FORMAT_V1, 200]) + bytes(b[2:]), "is truncated"),
    (lambda b: encode_cell(Cell(hlc=1, writer="evil", value=b"x")), "is not encrypted"),
])
def test_tampered_records_fail_with_a_specific_error(edit: Edit, error: str) -> None:
    inner = MemoryStore()
    store = at_rest(inner, keys_of("k1"), where="mem")
    store.write([(b"dkey", b"value")])
    _tampered(inner, b"dkey", edit)
    with pytest.raises(DecryptionError, match=error) as info:
        store.get(b"dkey")
    assert isinstance(info.value, StorageError) and info.value.store_key == b"dkey"
    with pytest.raises(DecryptionError):
        list(store.scan(b"d"))


def test_a_record_moved_to_another_key_does_not_decrypt() -> None:
    inner = MemoryStore()
    store = at_rest(inner, keys_of("k1"), where="mem")
    store.write([(b"dalice", b"alice's value"), (b"dbob", b"bob's value")])
    inner.write([(b"dbob", inner.get(b"dalice"))])
    with pytest.raises(DecryptionError, match=r"key id 'k1'|under data key 'k1'") as info:
        store.get(b"dbob")
    assert info.value.key_id == "k1" and info.value.store_key == b"dbob"
    assert store.get(b"dalice") == b"alice's value"


def test_a_record_relabelled_with_another_key_id_does_not_decrypt() -> None:
    keys = keys_of("k1", "k2")
    inner = MemoryStore()
    store = at_rest(inner, keys, where="mem")
    store.write([(b"dk", b"v")])
    _tampered(inner, b"dk", lambda b: bytes(b[:3]) + b"2" + bytes(b[4:]))  # k1 -> k2
    with pytest.raises(DecryptionError, match="under data key 'k2'"):
        store.get(b"dk")


def test_wrong_key_with_the_same_id_fails_naming_the_id() -> None:
    inner = MemoryStore()
    at_rest(inner, keys_of("k1"), where="mem").write([(b"dk", b"v")])
    other = at_rest(inner, keys_of("k1"), where="mem")  # another key called k1
    with pytest.raises(DecryptionError, match="does not decrypt under data key 'k1'") as info:
        other.get(b"dk")
    assert info.value.key_id == "k1"


def test_missing_key_id_fails_naming_it_and_the_configured_ones() -> None:
    inner = MemoryStore()
    at_rest(inner, keys_of("old"), where="mem").write([(b"dk", b"v")])
    store = at_rest(inner, keys_of("new"), where="mem")
    with pytest.raises(DecryptionError,
                       match=r"encrypted under data key 'old', which is not configured "
                             r"\(configured: new\); add that key back") as info:
        store.get(b"dk")
    assert info.value.key_id == "old"


def test_rotation_old_values_readable_new_writes_primary_then_rewrap() -> None:
    inner = MemoryStore()
    first = keys_of("k1")
    at_rest(inner, first, where="mem").write([(b"d%d" % i, b"v%d" % i) for i in range(5)])
    rotated = parse_data_keys(
        generate_entry("k2") + "\n" + f"k1:{base64.b64encode(first.keys['k1']).decode()}",
        source="rotated")
    store = at_rest(inner, rotated, where="mem")
    assert store.get(b"d3") == b"v3"  # written under k1, still readable
    store.write([(b"d3", b"new"), (b"d9", b"v9")])
    assert census(inner) == {"k1": 4, "k2": 2}
    report = rewrap(inner, rotated)
    assert report.rows == 6 and report.rewrapped == {"k1": 4}
    assert census(inner) == {"k2": 6}
    only_new = parse_data_keys(generate_entry("k2").split(":")[0] + ":"
                               + base64.b64encode(rotated.keys["k2"]).decode(), source="k2")
    after = at_rest(inner, only_new, where="mem")
    assert dict(after.scan(b"d")) == {b"d0": b"v0", b"d1": b"v1", b"d2": b"v2",
                                      b"d3": b"new", b"d4": b"v4", b"d9": b"v9"}
    assert rewrap(inner, only_new).rewrapped == {}  # nothing left to do


def test_rewrap_stops_at_a_record_it_cannot_open() -> None:
    inner = MemoryStore()
    at_rest(inner, keys_of("gone"), where="mem").write([(b"dk", b"v")])
    with pytest.raises(DecryptionError, match="'gone', which is not configured"):
        rewrap(inner, keys_of("k2"))


def test_plaintext_store_is_refused_then_converted_explicitly() -> None:
    inner = MemoryStore()
    inner.write([(b"dk", b"plain value"), (b"h1", b"plain hint")])  # a node without keys
    keys = keys_of("k1")
    with pytest.raises(PlaintextStoreError, match="written without encryption.*rewrap"):
        at_rest(inner, keys, where="/data/n1")
    with pytest.raises(PlaintextStoreError, match="--encrypt-plaintext"):
        rewrap(inner, keys)
    assert at_rest(inner, None, where="/data/n1") is inner  # still fine without keys
    assert census(inner) == {PLAINTEXT: 2}
    report = rewrap(inner, keys, encrypt_plaintext=True)
    assert report.rewrapped == {PLAINTEXT: 2}
    assert census(inner) == {"k1": 2}
    assert all(b"plain" not in record for _, record in inner.scan(b""))
    store = at_rest(inner, keys, where="/data/n1")
    assert store.get(b"dk") == b"plain value" and store.get(b"h1") == b"plain hint"


def test_an_interrupted_conversion_is_refused_and_can_be_run_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    inner = MemoryStore()
    inner.write([(b"d%04d" % i, b"plain%d" % i) for i in range(25)])
    keys = keys_of("k1")
    monkeypatch.setattr(encrypted_module, "REWRAP_BATCH_ROWS", 10)
    real_write, writes = inner.write, []

    def crash_on_third(batch: list[tuple[bytes, bytes | None]]) -> None:
        writes.append(batch)
        if len(writes) == 3:
            raise StorageError("disk gone")
        real_write(batch)

    monkeypatch.setattr(inner, "write", crash_on_third)
    with pytest.raises(StorageError, match="disk gone"):
        rewrap(inner, keys, encrypt_plaintext=True)
    monkeypatch.setattr(inner, "write", real_write)
    assert census(inner) == {"k1": 20, PLAINTEXT: 5}
    with pytest.raises(PlaintextStoreError):  # no marker yet: still refused
        at_rest(inner, keys, where="mem")
    assert rewrap(inner, keys, encrypt_plaintext=True).rewrapped == {PLAINTEXT: 5}
    assert at_rest(inner, keys, where="mem").get(b"d0007") == b"plain7"


def test_an_encrypted_store_is_refused_without_keys() -> None:
    inner = MemoryStore()
    at_rest(inner, keys_of("k1"), where="mem")  # an empty store is marked at once
    with pytest.raises(EncryptedStoreError, match="encrypted at rest.*--encryption-key-file"):
        at_rest(inner, None, where="/data/n1")


def test_a_plaintext_row_in_an_encrypted_store_is_not_accepted() -> None:
    inner = MemoryStore()
    at_rest(inner, keys_of("k1"), where="mem").write([(b"dk", b"v")])
    inner.write([(b"dinjected", encode_cell(Cell(hlc=1, writer="x", value=b"evil")))])
    keys = keys_of("k1")
    with pytest.raises(DecryptionError, match="is not encrypted"):
        rewrap(inner, keys, encrypt_plaintext=True)


# -- the commands -----------------------------------------------------------------------

def test_generate_key_prints_or_adds_a_primary_to_a_private_file(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["encryption", "generate-key", "--id", "k1"])
    assert out.exit_code == 0, out.output
    assert parse_data_keys(out.stdout, source="out").primary_id == "k1"
    key_file = tmp_path / "keys"
    for key_id in ("k1", "k2"):
        out = runner.invoke(main, ["encryption", "generate-key", "--id", key_id,
                                   "--key-file", str(key_file)])
        assert out.exit_code == 0, out.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    keys = load_key_file(key_file)
    assert keys.primary_id == "k2" and list(keys.keys) == ["k2", "k1"]
    assert key_file.read_text().startswith("# leaderless data keys")
    out = runner.invoke(main, ["encryption", "generate-key", "--id", "k2",
                               "--key-file", str(key_file)])
    assert out.exit_code == 2 and "already has a key with id 'k2'" in out.output


def _files_contain(root: Path, needle: bytes) -> bool:
    return any(needle in p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_rewrap_command_encrypts_a_stopped_nodes_rocksdb_and_compacts(tmp_path: Path) -> None:
    data_dir = tmp_path / "n1"
    secret = b"plaintext-canary-" + os.urandom(8).hex().encode()
    plain = RocksStore(data_dir / "data")
    plain.write([(data_key("ks", b"p%d" % i), secret + b"%d" % i) for i in range(100)])
    plain.sync()
    plain.close()
    assert _files_contain(data_dir, secret)
    key_file = tmp_path / "keys"
    key_file.write_text(generate_entry("k1") + "\n")
    key_file.chmod(0o600)
    runner = CliRunner()
    out = runner.invoke(main, ["encryption", "status", "--data-dir", str(data_dir)])
    assert out.exit_code == 0 and out.stdout == "plaintext\t100\n"
    out = runner.invoke(main, ["encryption", "rewrap", "--data-dir", str(data_dir),
                               "--key-file", str(key_file)])
    assert out.exit_code == 2 and "--encrypt-plaintext" in out.output
    out = runner.invoke(main, ["encryption", "rewrap", "--data-dir", str(data_dir),
                               "--key-file", str(key_file), "--encrypt-plaintext"])
    assert out.exit_code == 0, out.output
    assert "100 rows; re-encrypted under 'k1': 100 from plaintext" in out.stdout
    assert not _files_contain(data_dir, secret)  # the old versions were compacted away
    out = runner.invoke(main, ["encryption", "status", "--data-dir", str(data_dir)])
    assert out.stdout == "k1\t100\n"
    store = at_rest(RocksStore(data_dir / "data"), load_key_file(key_file), where="n1")
    assert store.get(data_key("ks", b"p7")) == secret + b"7"
    store.close()


def test_rewrap_command_refuses_a_running_node_and_missing_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "n1"
    RocksStore(data_dir / "data").close()
    runner = CliRunner()
    out = runner.invoke(main, ["encryption", "rewrap", "--data-dir", str(data_dir)],
                        env={"LEADERLESS_ENCRYPTION_KEY": None})
    assert out.exit_code == 2 and "no data keys" in out.output
    out = runner.invoke(main, ["encryption", "status", "--data-dir", str(tmp_path / "none")])
    assert out.exit_code == 2 and "holds no node store" in out.output
    from leaderless.runtime.datadir import DataDir
    running = DataDir(data_dir)
    running.open()  # what a running node holds
    try:
        out = runner.invoke(main, ["encryption", "rewrap", "--data-dir", str(data_dir)],
                            env={"LEADERLESS_ENCRYPTION_KEY": generate_entry("k1")})
        assert out.exit_code == 3 and "in use by another running node" in out.output
    finally:
        running.close()
