"""security.auth: grants and principals, the token format, TOTP, the password policy and
the login back-off, as pure functions of their inputs (time is an argument)."""

from __future__ import annotations

import base64

import hypothesis.strategies as st
import msgspec
import pyotp
import pytest
from hypothesis import given

from leaderless.security.auth import (
    ADMIN_GRANT,
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    FAILURE_MEMORY_S,
    FAILURES_FREE,
    THROTTLE_ENTRIES_MAX,
    TOKEN_CHARS_MAX,
    TOTP_STEP_S,
    USERS_KEY,
    AuthInputError,
    Grant,
    LoginThrottle,
    Principal,
    TokenClaims,
    TokenError,
    UserRecord,
    UserTable,
    check_grant,
    check_name,
    check_password,
    decode_table,
    encode_record,
    sign_token,
    totp_code,
    totp_match,
    totp_step,
    totp_uri,
    verify_token,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
NOW = 1_800_000_000.0


def principal(*grants: Grant) -> Principal:
    return Principal("alice", ("r",), grants, "tid", NOW + 60, False)


# -- grants ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("grant", "level", "keyspace", "key", "allowed"), [
    (Grant("read", "orders"), "read", "orders", b"k", True),
    (Grant("read", "orders"), "write", "orders", b"k", False),
    (Grant("write", "orders"), "read", "orders", b"k", True),
    (Grant("write", "orders"), "admin", "orders", None, False),
    (Grant("admin", "orders"), "write", "orders", b"k", True),
    (Grant("read", "orders"), "read", "users", b"k", False),
    (Grant("read", "*"), "read", "anything", None, True),
    (Grant("read", "t", b"acme/"), "read", "t", b"acme/1", True),
    (Grant("read", "t", b"acme/"), "read", "t", b"acme", False),
    (Grant("read", "t", b"acme/"), "read", "t", b"other/1", False),
    (Grant("read", "t", b"acme/"), "read", "t", None, False),  # a scan of all of t
    (Grant("read", "t"), "read", "t", None, True),
])
def test_principal_allows_by_level_keyspace_and_prefix(
        grant: Grant, level: str, keyspace: str, key: bytes | None, allowed: bool) -> None:
    assert principal(grant).allows(level, keyspace, key) is allowed


def test_any_grant_allowing_is_enough_and_no_grant_allows_nothing() -> None:
    p = principal(Grant("read", "a"), Grant("write", "b", b"x"))
    assert p.allows("write", "b", b"xy")
    assert p.allows("read", "a")
    assert not p.allows("write", "a", b"k")
    assert not principal().allows("read", "a", b"k")
    assert principal(ADMIN_GRANT).allows("admin", "anything")


def test_sees_only_keyspaces_it_has_a_grant_on() -> None:
    tenant = principal(Grant("read", "acme", b"p/"))
    assert tenant.sees_keyspace("acme")
    assert not tenant.sees_keyspace("globex")
    assert principal(Grant("read", "*")).sees_keyspace("globex")


def test_grant_checks_name_level_and_prefix() -> None:
    check_grant(Grant("write", "orders", b"p"))
    check_grant(Grant("admin", "*"))
    with pytest.raises(AuthInputError, match="level 'owner' is unknown"):
        check_grant(Grant("owner", "orders"))
    with pytest.raises(AuthInputError, match="keyspace name"):
        check_grant(Grant("read", "bad name"))
    with pytest.raises(AuthInputError, match="at most 1024 bytes"):
        check_grant(Grant("read", "orders", b"x" * 1025))


def test_grant_survives_json_for_the_api() -> None:
    grant = Grant("read", "orders", b"\x00p")
    assert msgspec.json.decode(msgspec.json.encode(grant), type=Grant) == grant


# -- names and passwords ----------------------------------------------------------------------


def test_password_policy_names_the_minimum() -> None:
    check_password("twelve chars")
    with pytest.raises(AuthInputError, match="has 5 characters; it needs at least 12"):
        check_password("short")
    with pytest.raises(AuthInputError, match="the limit is 1024"):
        check_password("x" * 1025)


@pytest.mark.parametrize("name", ["alice", "ci-bot", "bob@example.org", "A1", "x" * 64])
def test_valid_names(name: str) -> None:
    check_name("user", name)


@pytest.mark.parametrize("name", ["", "-lead", "has space", "x" * 65, "slash/", "ünï"])
def test_invalid_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(AuthInputError, match="user name .* is invalid: use 1-64"):
        check_name("user", name)


def test_tables_round_trip_and_absent_is_empty() -> None:
    record = UserRecord("alice", "u1", "$argon2id$...", ("r",), NOW, "JBSWY3DPEHPK3PXP", 7)
    table = UserTable(3, {"alice": record})
    assert decode_table(USERS_KEY, encode_record(table)) == table
    assert decode_table(USERS_KEY, None) == UserTable(0, {})


# -- tokens -----------------------------------------------------------------------------------


def claims(kind: str = "session", expires_at: float = NOW + 3600) -> TokenClaims:
    return TokenClaims("id1", "alice", "u1", kind, NOW, expires_at)


def test_signed_token_verifies_to_its_claims() -> None:
    token = sign_token(claims(), SECRET)
    assert token.startswith("ll1.")
    assert verify_token(token, SECRET, NOW + 10) == claims()
    api = sign_token(claims("api"), SECRET)
    assert verify_token(api, SECRET, NOW).kind == "api"


def test_expired_token_is_refused() -> None:
    token = sign_token(claims(expires_at=NOW + 5), SECRET)
    with pytest.raises(TokenError) as refused:
        verify_token(token, SECRET, NOW + 5)
    assert refused.value.reason == "expired"


def test_token_signed_with_another_secret_is_refused() -> None:
    with pytest.raises(TokenError) as refused:
        verify_token(sign_token(claims(), OTHER_SECRET), SECRET, NOW)
    assert refused.value.reason == "bad_signature"


def test_tampered_claims_are_refused() -> None:
    version, body, mac = sign_token(claims(), SECRET).split(".")
    forged = TokenClaims("id1", "admin", "u1", "session", NOW, NOW + 3600)
    forged_body = base64.urlsafe_b64encode(msgspec.msgpack.encode(forged)).rstrip(b"=")
    with pytest.raises(TokenError) as refused:
        verify_token(f"{version}.{forged_body.decode()}.{mac}", SECRET, NOW)
    assert refused.value.reason == "bad_signature"


@pytest.mark.parametrize("token", ["", "ll1", "ll1.a.b.c", "ll2.abc.def", "ll1.abc.!!!",
                                   "x" * (TOKEN_CHARS_MAX + 1)])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(TokenError):
        verify_token(token, SECRET, NOW)


@given(st.text(max_size=300))
def test_random_text_is_never_a_token(text: str) -> None:
    with pytest.raises(TokenError):
        verify_token(text, SECRET, NOW)


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_every_flipped_byte_is_refused(position: int, value: int) -> None:
    token = sign_token(claims(), SECRET)
    position %= len(token)
    flipped = token[:position] + chr(value) + token[position + 1:]
    if flipped == token:
        return
    with pytest.raises(TokenError):
        verify_token(flipped, SECRET, NOW)


# -- TOTP -------------------------------------------------------------------------------------


def test_totp_codes_match_the_rfc_implementation() -> None:
    secret = pyotp.random_base32()
    assert totp_code(secret, totp_step(NOW)) == pyotp.TOTP(secret).at(NOW)


def test_totp_accepts_one_step_either_side_and_returns_its_step() -> None:
    secret = pyotp.random_base32()
    step = totp_step(NOW)
    for offset in (-1, 0, 1):
        assert totp_match(secret, totp_code(secret, step + offset), NOW, 0) == step + offset
    assert totp_match(secret, totp_code(secret, step + 2), NOW, 0) is None
    assert totp_match(secret, totp_code(secret, step - 2), NOW, 0) is None


def test_totp_code_is_good_once() -> None:
    secret = pyotp.random_base32()
    code = pyotp.TOTP(secret).at(NOW)
    used = totp_match(secret, code, NOW, 0)
    assert used == totp_step(NOW)
    assert totp_match(secret, code, NOW, used) is None
    assert totp_match(secret, code, NOW + TOTP_STEP_S, used) is None  # still in its window
    later = pyotp.TOTP(secret).at(NOW + TOTP_STEP_S)
    assert totp_match(secret, later, NOW + TOTP_STEP_S, used) == used + 1


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "12 345"])
def test_totp_refuses_malformed_codes(code: str) -> None:
    assert totp_match(pyotp.random_base32(), code, NOW, 0) is None


def test_totp_uri_carries_secret_user_and_issuer() -> None:
    secret = pyotp.random_base32()
    uri = totp_uri(secret, "alice")
    assert uri.startswith("otpauth://totp/leaderless:alice?")
    assert f"secret={secret}" in uri
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.at(NOW) == pyotp.TOTP(secret).at(NOW)


# -- login back-off ----------------------------------------------------------------------------


def test_back_off_starts_after_the_free_failures_and_doubles_to_the_cap() -> None:
    throttle = LoginThrottle()
    now = NOW
    for _ in range(FAILURES_FREE):
        assert throttle.retry_after("alice", "10.0.0.1", now) == 0
        throttle.failed("alice", "10.0.0.1", now)
    assert throttle.retry_after("alice", "10.0.0.1", now) == 0
    waits = []
    for _ in range(12):
        throttle.failed("alice", "10.0.0.1", now)
        waits.append(throttle.retry_after("alice", "10.0.0.1", now))
        now += waits[-1]
    assert waits[:3] == [BACKOFF_INITIAL_S, 2 * BACKOFF_INITIAL_S, 4 * BACKOFF_INITIAL_S]
    assert waits[-1] == BACKOFF_MAX_S
    assert throttle.retry_after("alice", "10.0.0.1", now) == 0  # waited it out


def test_back_off_is_per_user_and_per_address() -> None:
    throttle = LoginThrottle()
    for i in range(FAILURES_FREE + 1):
        throttle.failed("alice", f"10.0.0.{i}", NOW)  # one user, many addresses
    assert throttle.retry_after("alice", "10.9.9.9", NOW) > 0
    assert throttle.retry_after("bob", "10.0.0.1", NOW) == 0
    for i in range(FAILURES_FREE + 1):
        throttle.failed(f"user{i}", "10.1.1.1", NOW)  # one address, many users
    assert throttle.retry_after("carol", "10.1.1.1", NOW) > 0
    assert throttle.retry_after("carol", "10.1.1.2", NOW) == 0


def test_success_clears_the_user_not_the_address() -> None:
    throttle = LoginThrottle()
    for _ in range(FAILURES_FREE + 1):
        throttle.failed("alice", "10.0.0.1", NOW)
    throttle.succeeded("alice")
    assert throttle.retry_after("alice", "10.0.0.2", NOW) == 0
    assert throttle.retry_after("alice", "10.0.0.1", NOW) > 0


def test_failures_are_forgotten_after_a_quiet_period() -> None:
    throttle = LoginThrottle()
    for _ in range(FAILURES_FREE):
        throttle.failed("alice", "a", NOW)
    later = NOW + FAILURE_MEMORY_S + 1
    throttle.failed("alice", "a", later)  # counts as the first again
    assert throttle.retry_after("alice", "a", later) == 0


def test_tracked_entries_are_bounded() -> None:
    throttle = LoginThrottle()
    for i in range(THROTTLE_ENTRIES_MAX + 50):
        throttle.failed(f"user{i}", f"peer{i}", NOW)
    assert len(throttle) == 2 * THROTTLE_ENTRIES_MAX
