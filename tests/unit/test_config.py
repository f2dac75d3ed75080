"""Configuration: sources, precedence, defaults and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from leaderless.config import (
    ConfigError,
    env_var,
    load_config,
    parse_host_port,
    settings,
)
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import Address


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load_config({}, env={})
    assert config.bind == Address("127.0.0.1", 7946)
    assert config.advertise == config.bind
    assert config.join == ()
    assert config.name.endswith("-7946")
    assert config.data_dir.name == config.name
    assert config.log_format == "json"
    assert config.log_level == "info"
    assert config.membership == MembershipConfig()


def test_precedence_toml_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "from-toml"\nzone = "z-toml"\nweight = 2.0\n'
                           'bind = "127.0.0.1:7001"\n[membership]\nprobe_interval_s = 1.0\n')
    env = {"LEADERLESS_ZONE": "z-env", "LEADERLESS_WEIGHT": "3",
           "LEADERLESS_MEMBERSHIP_PROBE_INTERVAL_S": "0.8"}
    config = load_config({"weight": 4.0}, env=env, config_file=path)
    assert config.name == "from-toml"  # only in the file
    assert config.zone == "z-env"  # env beats the file
    assert config.weight == 4.0  # flags beat env
    assert config.bind == Address("127.0.0.1", 7001)
    assert config.membership.probe_interval_s == 0.8


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "via-env-file"\n')
    config = load_config({}, env={"LEADERLESS_CONFIG": str(path)})
    assert config.name == "via-env-file"


def test_none_flags_are_ignored() -> None:
    config = load_config({"name": None, "join": [], "tags": []},
                         env={"LEADERLESS_NAME": "env-name"})
    assert config.name == "env-name"


def test_join_and_tags_accept_lists_and_commas() -> None:
    config = load_config({"join": ["10.0.0.1:7946,10.0.0.2:7946", "seed.local:8000"],
                          "tags": ["rack=r1", "role=db,tier=gold"]}, env={})
    assert config.join == (Address("10.0.0.1", 7946), Address("10.0.0.2", 7946),
                           Address("seed.local", 8000))
    assert dict(config.tags) == {"rack": "r1", "role": "db", "tier": "gold"}
    env_config = load_config({}, env={"LEADERLESS_JOIN": "127.0.0.1:1, 127.0.0.1:2",
                                      "LEADERLESS_TAGS": "a=b"})
    assert len(env_config.join) == 2
    assert dict(env_config.tags) == {"a": "b"}


def test_toml_tags_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[tags]\nrack = "r7"\n')
    assert dict(load_config({}, env={}, config_file=path).tags) == {"rack": "r7"}


def test_ipv6_and_localhost() -> None:
    assert parse_host_port("[::1]:7000") == Address("::1", 7000)
    assert parse_host_port("localhost:7000") == Address("127.0.0.1", 7000)


def test_wildcard_bind_needs_advertise() -> None:
    with pytest.raises(ConfigError, match="advertise: required when bind is a wildcard"):
        load_config({"bind": "0.0.0.0:7946"}, env={})
    config = load_config({"bind": "0.0.0.0:7946", "advertise": "10.1.2.3:7946"}, env={})
    assert config.advertise == Address("10.1.2.3", 7946)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"bind": "127.0.0.1:99999"},
         "bind: '127.0.0.1:99999' is not HOST:PORT with port 0..65535"),
        ({"bind": "127.0.0.1"}, "bind: '127.0.0.1' is not HOST:PORT"),
        ({"bind": "example.com:7946"}, "bind: 'example.com:7946' must be an IP address"),
        ({"advertise": "0.0.0.0:7946"}, "advertise: '0.0.0.0:7946' is a wildcard address"),
        ({"join": ["10.0.0.1"]}, "join: .* seed '10.0.0.1' is not HOST:PORT"),
        ({"name": "bad name"}, "name: 'bad name' must start with a letter or digit"),
        ({"name": "x" * 65}, "is longer than 64 bytes"),
        ({"weight": "0"}, r"weight: '0' must be in \(0, 1000\]"),
        ({"weight": "heavy"}, "weight: 'heavy' must be a number"),
        ({"tags": ["novalue"]}, "tags: .* tag 'novalue' is not KEY=VALUE"),
        ({"tags": [f"k{i}=v" for i in range(17)]}, "at most 16 are allowed"),
        ({"log_format": "xml"}, "log_format: 'xml' must be one of json, console"),
        ({"zone": "z" * 65}, "zone: .* is longer than 64 bytes"),
        ({"nonsense": 1}, "nonsense: unknown setting given as a flag"),
    ],
)
def test_invalid_settings_name_the_setting(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env={})


def test_invalid_environment_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="membership.probe_interval_s: 'fast' must be a number"):
        load_config({}, env={"LEADERLESS_MEMBERSHIP_PROBE_INTERVAL_S": "fast"})
    with pytest.raises(ConfigError, match="membership.gossip_nodes: '2.5' must be an integer"):
        load_config({}, env={"LEADERLESS_MEMBERSHIP_GOSSIP_NODES": "2.5"})


def test_membership_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match="membership: probe_timeout_s must be > 0 and <"):
        load_config({}, env={"LEADERLESS_MEMBERSHIP_PROBE_TIMEOUT_S": "5"})


def test_unknown_membership_variable_is_an_error_other_variables_are_ignored() -> None:
    with pytest.raises(ConfigError, match="LEADERLESS_MEMBERSHIP_PROBE_INTERVAL: not a"):
        load_config({}, env={"LEADERLESS_MEMBERSHIP_PROBE_INTERVAL": "1"})
    load_config({}, env={"LEADERLESS_SOMETHING_ELSE": "1"})


def test_toml_errors_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config({}, env={}, config_file=write(tmp_path, "name = \n"))
    with pytest.raises(ConfigError, match="bogus: unknown setting in"):
        load_config({}, env={}, config_file=write(tmp_path, "bogus = 1\n"))
    with pytest.raises(ConfigError, match="membership.bogus: unknown setting"):
        load_config({}, env={}, config_file=write(tmp_path, "[membership]\nbogus = 1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, env={}, config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="weight: True must be a number"):
        load_config({}, env={}, config_file=write(tmp_path, "weight = true\n"))


def test_every_setting_has_an_env_var() -> None:
    assert env_var("bind") == "LEADERLESS_BIND"
    assert env_var("membership.probe_interval_s") == "LEADERLESS_MEMBERSHIP_PROBE_INTERVAL_S"
    for key in settings():
        assert env_var(key).startswith("LEADERLESS_")


def test_security_is_off_by_default() -> None:
    security = load_config({}, env={}).security
    assert not security.tls and not security.auth
    assert security.gossip_keyring is None and security.encryption_key_file is None


def test_security_tables_variables_and_flags(tmp_path: Path) -> None:
    for name in ("ca.crt", "node.crt", "node.key", "keyring", "admin"):
        (tmp_path / name).write_text("x")
    path = write(tmp_path, f"""
[tls]
ca = "{tmp_path / 'ca.crt'}"
cert = "{tmp_path / 'node.crt'}"
key = "{tmp_path / 'node.key'}"
[auth]
enabled = true
token_ttl_s = 600
[gossip]
keyring = "{tmp_path / 'keyring'}"
""")
    env = {"LEADERLESS_ENCRYPTION_KEY": "k1:AAAA",
           "LEADERLESS_AUTH_ADMIN_PASSWORD_FILE": str(tmp_path / "admin")}
    security = load_config({"auth.token_ttl_s": "60"}, env=env, config_file=path).security
    assert security.tls and security.tls_key == tmp_path / "node.key"
    assert security.auth and security.token_ttl_s == 60.0
    assert security.gossip_keyring == tmp_path / "keyring"
    assert security.encryption_key == "k1:AAAA"
    assert security.admin_password_file == tmp_path / "admin"


def test_tls_needs_all_three_files_and_they_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match=r"tls: tls.ca given without --tls-cert, --tls-key"):
        load_config({"tls.ca": str(tmp_path / "ca.crt")}, env={})
    with pytest.raises(ConfigError, match=r"gossip.keyring: .* is not a readable file"):
        load_config({"gossip.keyring": str(tmp_path / "missing")}, env={})
    with pytest.raises(ConfigError, match=r"auth.enabled: 'maybe' must be true or false"):
        load_config({"auth.enabled": "maybe"}, env={})


def test_health_table_defaults_file_variables_and_flags(tmp_path: Path) -> None:
    health = load_config({}, env={}).health
    assert health.interval_s == 1.0
    assert health.thresholds.disk_warn_free_pct == 10.0
    assert health.thresholds.disk_stop_writes_free_pct == 5.0
    path = write(tmp_path, """
[health]
interval_s = 0.5
disk_warn_free_pct = 20
disk_stop_writes_free_pct = 8
memory_warn_pct = 95
""")
    env = {"LEADERLESS_HEALTH_LOOP_LAG_WARN_MS": "250"}
    health = load_config({"health.interval_s": "0.25"}, env=env, config_file=path).health
    assert health.interval_s == 0.25  # the flag wins over the file
    assert health.thresholds.disk_warn_free_pct == 20.0
    assert health.thresholds.disk_stop_writes_free_pct == 8.0
    assert health.thresholds.loop_lag_warn_ms == 250.0
    assert health.thresholds.memory_warn_pct == 95.0


def test_health_settings_are_checked_with_specific_errors() -> None:
    with pytest.raises(ConfigError, match=r"health: disk_warn_free_pct must be in "
                                          r"\[disk_stop_writes_free_pct, 100\)"):
        load_config({"health.disk_warn_free_pct": "3"}, env={})
    with pytest.raises(ConfigError, match=r"health.interval_s: '0' must be in \(0, 3600\]"):
        load_config({"health.interval_s": "0"}, env={})
    with pytest.raises(ConfigError, match=r"health.fsync_failures_max: unknown setting"):
        load_config({"health.fsync_failures_max": "3"}, env={})
    with pytest.raises(ConfigError, match=r"health.disk_free: unknown setting"):
        load_config({"health.disk_free": "3"}, env={})
