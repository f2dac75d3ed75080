"""Node configuration: one typed, validated ``NodeConfig`` from three sources.

Precedence, lowest first: a TOML file (``--config FILE`` or ``LEADERLESS_CONFIG``), then
``LEADERLESS_*`` environment variables, then command-line flags. Every setting has one
name used everywhere: ``bind`` is the TOML key ``bind``, the variable ``LEADERLESS_BIND``
and the flag ``--bind``; membership timings live in the TOML table ``[membership]`` and in
variables ``LEADERLESS_MEMBERSHIP_<FIELD>`` (e.g. ``LEADERLESS_MEMBERSHIP_PROBE_INTERVAL_S``).
Alerts live in the TOML table ``[alerts]`` (``defaults``, ``interval_s``, and the array of
tables ``[[alerts.rules]]``, which only a file can give; see ``obs.alerts``).
Self-health lives in the table ``[health]`` (``HealthConfig``).
Security lives in the tables ``[tls]``, ``[auth]``, ``[gossip]`` and ``[encryption]``
(``SecurityConfig``); each key has its variable (``LEADERLESS_TLS_CA``) and flag
(``--tls-ca``) like every other setting.

Validation errors name the setting and say why it is wrong, e.g.
``bind: '127.0.0.1:99999' is not HOST:PORT with port 0..65535``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from leaderless.core.health import HealthThresholds
from leaderless.core.membership_config import MembershipConfig
from leaderless.core.messages import (
    NAME_BYTES_MAX,
    TAG_BYTES_MAX,
    TAG_COUNT_MAX,
    ZONE_BYTES_MAX,
    Address,
)
from leaderless.obs.alerts import INTERVAL_S_DEFAULT as ALERTS_INTERVAL_S_DEFAULT
from leaderless.obs.alerts import INTERVAL_S_MAX as ALERTS_INTERVAL_S_MAX
from leaderless.obs.alerts import AlertsConfig, Rule, RuleError, parse_rules

ENV_PREFIX = "LEADERLESS_"
MEMBERSHIP_ENV_PREFIX = "LEADERLESS_MEMBERSHIP_"
CONFIG_FILE_ENV = "LEADERLESS_CONFIG"
DEFAULT_PORT = 7946
"""The port memberlist and Serf use for the same job; easy to remember, rarely taken."""
DEFAULT_BIND = f"127.0.0.1:{DEFAULT_PORT}"
"""Loopback by default: a node reachable from the network is a deliberate choice."""
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it and says how to fix it."""


TOKEN_TTL_S_DEFAULT = 12 * 3600.0
"""A login's token lives a working day; programs use API tokens with their own TTL."""


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """``[tls]``, ``[auth]``, ``[gossip]``, ``[encryption]``: all off by default (a local
    cluster on loopback stays two commands away); docs/security.md turns them on."""

    tls_ca: Path | None = None
    """The cluster CA certificate (``leaderless certs init``). With ``tls_cert`` and
    ``tls_key``, every TCP listener and link of the node speaks TLS; peers need mutual TLS."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth: bool = False
    """Clients must present a token (``leaderless login``); permissions are checked."""
    admin_password_file: Path | None = None
    """The bootstrap admin's password; without it a random one is printed once."""
    token_ttl_s: float = TOKEN_TTL_S_DEFAULT
    gossip_keyring: Path | None = None
    """Base64 AES-256 keys, one per line, the first primary: UDP gossip is sealed."""
    encryption_key_file: Path | None = None
    """Data keys for encryption at rest (``security.data_keys`` has the format)."""
    encryption_key: str | None = None
    """The same as a value (``LEADERLESS_ENCRYPTION_KEY``), for secrets injected by env."""

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None


HEALTH_INTERVAL_S_DEFAULT = 1.0
"""Once a second: a filling disk is caught within a second, for the cost of one statvfs."""


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """``[health]``: how often a node checks itself and the limits it judges itself by
    (``core.health``, ``runtime.health``; docs/health.md)."""

    interval_s: float = HEALTH_INTERVAL_S_DEFAULT
    """Seconds between two checks; a change of state is gossiped at once."""
    thresholds: HealthThresholds = dataclasses.field(default_factory=HealthThresholds)
    # No fsync-failure count: the first failed fsync already fails the node over
    # (runtime.failover). Retrying is unsafe: the kernel may have dropped the pages, so a
    # later successful sync can sit behind a hole that recovery stops at.


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """``[ring]``: how this node joins, leaves and streams ranges (``core.placement``,
    ``runtime.ring_changes``, ``runtime.streaming``; docs/elastic.md)."""

    bootstrap: bool = True
    """A fresh node that joins a cluster streams the ranges it will own before it serves
    them (``joining``, then ``normal``). Off: it serves them at once (only for the first
    members of a new cluster, which hold no data yet: ``leaderless up`` does that)."""
    settle_s: float = 3.0
    """How long a ring change takes to reach every member by gossip (Cassandra's
    RING_DELAY): a fetch starts only after the placement has been unchanged this long, and
    writers keep a replaced ring's replicas in their write set this long. Well above the
    gossip spread time of the cluster (about a second for tens of members)."""
    stream_mb_per_s: float = 0.0
    """Bytes this node fetches per second at most, in MB (0: unlimited)."""
    stream_sessions: int = 8
    """Page requests in flight at once while fetching (spread over the sources)."""
    cleanup_grace_s: float = 3600.0
    """A node deletes the ranges it no longer holds this long after the ring last changed
    (``leaderless node cleanup`` does it at once)."""


TASK_MODULES_MAX = 64
MODULE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """``[tasks]``: how this node runs tasks (``runtime.tasks``, ``runtime.task_workers``;
    docs/tasks.md)."""

    slots: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    """Task slots (worker processes) of this node: one per CPU by default, so CPU-bound
    Python tasks use every core; a task needing k slots takes k of them."""
    load_ceiling_pct: float = 90.0
    """The node claims no task while its CPU load is at or above this (busy nodes get
    less); 100: no ceiling."""
    modules: tuple[str, ...] = ()
    """Python modules whose functions this node may run by name (``module:function``);
    ``--tasks MODULE`` (repeatable) on ``node start``."""
    allow_pickle: bool = False
    """Accept and run cloudpickled callables (arbitrary code: off unless every client is
    trusted; with auth on, a pickled submit also needs the ``execute`` permission)."""
    lease_ttl_s: float = 10.0
    """A running task's lease, renewed every third of it: a dead node's tasks run
    elsewhere within failure detection plus this."""
    prefetch_s: float = 1.0
    """Work a node takes on ahead of its free slots, in seconds at the rate it has been
    finishing tasks: it claims a task submitted through it in the submit round, and claims
    from the index, while it holds fewer than ``slots + rate * prefetch_s`` slots' worth
    (running or waiting here for a slot, under a lease). Trivial tasks then queue by the
    hundred on the node they were submitted through; ten-second ones only fill the free
    slots and wait in the index for any node. 0: free slots only (Celery's
    ``worker_prefetch_multiplier`` is the fixed-count version of this trade)."""
    drain_s: float = 10.0
    """On a graceful stop the node claims nothing more and waits this long for its running
    tasks, then hands the rest back (they run elsewhere at once)."""
    max_tasks_per_worker: int = 0
    """A worker process that has run this many tasks is replaced by a fresh one after its
    task finishes (Celery's ``worker_max_tasks_per_child``); 0: never."""
    max_worker_memory_mb: int = 0
    """A worker process whose resident memory (RSS) is above this many MiB after a task is
    replaced after that task, which still counts (never killed mid-task for it; Celery's
    ``worker_max_memory_per_child``); 0: no limit."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """Everything a node process needs to start, validated."""

    name: str
    bind: Address
    advertise: Address
    join: tuple[Address, ...]
    data_dir: Path
    zone: str = ""
    weight: float = 1.0
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    log_format: str = "json"
    log_level: str = "info"
    leave_timeout_s: float = 2.0
    io_timeout_s: float = 5.0
    membership: MembershipConfig = dataclasses.field(default_factory=MembershipConfig)
    client: Address | None = None
    """The native client listener (``--client``); None: no client port."""
    http: Address | None = None
    """The HTTP/JSON API listener (``--http``); None: no HTTP port."""
    storage: str = "rocksdb"
    """``rocksdb`` (durable, the default) or ``memory`` (lost on exit: tests and demos)."""
    fsync: str = "always"
    """``always``: acknowledge a write only after the fsync that covers it (group commit:
    one fsync per event-loop turn). ``interval``: acknowledge at once and fsync every
    ``fsync_interval_ms``: faster, but a machine crash (not a process crash) may lose the
    writes of the last interval."""
    fsync_interval_ms: float = 100.0
    value_bytes_max: int = 1 << 20
    """Largest value a client may write (1 MiB by default, at most 8 MiB - 4 KiB)."""
    tombstone_grace_s: float = 10 * 86400.0
    """How long a delete's tombstone is kept before it is purged (Cassandra's
    gc_grace_seconds): a replica down longer than this may resurrect the deleted value."""
    hint_window_s: float = 3 * 3600.0
    """A replica down longer than this gets no more hints; anti-entropy catches it up."""
    anti_entropy_interval_s: float = 30.0
    alerts: AlertsConfig = dataclasses.field(default_factory=AlertsConfig)
    """The ``[alerts]`` table: threshold rules this node evaluates for itself."""
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    health: HealthConfig = dataclasses.field(default_factory=HealthConfig)
    ring: RingConfig = dataclasses.field(default_factory=RingConfig)
    tasks: TasksConfig = dataclasses.field(default_factory=TasksConfig)
    replace: str = ""
    """``--replace NAME``: take over the tokens of this dead member and stream its data."""
    """The ``[health]`` table: the self-health monitor's interval and thresholds."""


# -- parsers: raw value (str from env/flags, or a TOML value) -> typed value -------------
# Each raises ValueError with the reason; the caller prefixes "key: 'value'".


def parse_host_port(raw: Any) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> Address; ``localhost`` becomes 127.0.0.1."""
    reason = "is not HOST:PORT with port 0..65535"
    if not isinstance(raw, str):
        raise ValueError(reason)
    text = raw.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(reason)
    if len(host) > 253 or any(c.isspace() for c in host):
        raise ValueError(reason)
    if host == "localhost":
        host = "127.0.0.1"
    return Address(host, int(port_text))


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_wildcard(host: str) -> bool:
    return is_ip_literal(host) and ipaddress.ip_address(host).is_unspecified


def _parse_bind(raw: Any) -> Address:
    address = parse_host_port(raw)
    if not is_ip_literal(address.host):
        raise ValueError("must be an IP address and port (e.g. 127.0.0.1:7946)")
    return address


def _parse_advertise(raw: Any) -> Address:
    address = _parse_bind(raw)
    if is_wildcard(address.host):
        raise ValueError("is a wildcard address; advertise one that other nodes can reach")
    return address


def _split_list(raw: Any) -> list[str]:
    """A comma-separated string, or a list of such strings (repeated flags, TOML arrays)."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError("must be a string or a list of strings")
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _parse_join(raw: Any) -> tuple[Address, ...]:
    seeds = []
    for item in _split_list(raw):
        try:
            seeds.append(parse_host_port(item))
        except ValueError:
            raise ValueError(f"seed {item!r} is not HOST:PORT with port 0..65535") from None
    return tuple(seeds)


def _parse_name(raw: Any) -> str:
    if not isinstance(raw, str) or not NAME_PATTERN.match(raw):
        raise ValueError("must start with a letter or digit and use only A-Z a-z 0-9 . _ -")
    if len(raw.encode()) > NAME_BYTES_MAX:
        raise ValueError(f"is longer than {NAME_BYTES_MAX} bytes")
    return raw


def _parse_text(limit: int) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        if len(raw.encode()) > limit:
            raise ValueError(f"is longer than {limit} bytes")
        return raw

    return parse


def _parse_tags(raw: Any) -> dict[str, str]:
    if isinstance(raw, Mapping):
        pairs = [(str(k), v) for k, v in raw.items()]
    else:
        pairs = []
        for item in _split_list(raw):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"tag {item!r} is not KEY=VALUE")
            pairs.append((key.strip(), value.strip()))
    if len(pairs) > TAG_COUNT_MAX:
        raise ValueError(f"has {len(pairs)} tags; at most {TAG_COUNT_MAX} are allowed")
    tags: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(value, str):
            raise ValueError(f"tag {key!r} must have a string value")
        if not 1 <= len(key.encode()) <= TAG_BYTES_MAX or len(value.encode()) > TAG_BYTES_MAX:
            raise ValueError(f"tag {key!r}: keys are 1..{TAG_BYTES_MAX} bytes, "
                             f"values at most {TAG_BYTES_MAX}")
        tags[key] = value
    return tags


def _parse_float(low: float, high: float, low_open: bool = True) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError("must be a number")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError("must be a number") from None
        if value != value or (value <= low if low_open else value < low) or value > high:
            bracket = "(" if low_open else "["
            raise ValueError(f"must be in {bracket}{low:g}, {high:g}]")
        return value

    return parse


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool) or isinstance(raw, float):
        raise ValueError("must be an integer")
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError("must be an integer") from None


def _parse_int_in(low: int, high: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        value = _parse_int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _parse_choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        if not isinstance(raw, str) or raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw.lower()

    return parse


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(raw, str) and raw.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _parse_path(raw: Any) -> Path:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("must be a directory path")
    return Path(raw).expanduser()


def _parse_modules(raw: Any) -> tuple[str, ...]:
    modules = _split_list(raw)
    if len(modules) > TASK_MODULES_MAX:
        raise ValueError(f"has {len(modules)} modules; at most {TASK_MODULES_MAX} are allowed")
    for module in modules:
        if not MODULE_PATTERN.match(module) or len(module) > 256:
            raise ValueError(f"{module!r} is not a Python module name (like pkg.tasks)")
    return tuple(dict.fromkeys(modules))


def _parse_value_limit(raw: Any) -> int:
    limit = _parse_int(raw)
    hard = (8 << 20) - 4096
    if not 1 <= limit <= hard:
        raise ValueError(f"must be 1..{hard} bytes (a value must fit in one 8 MiB frame)")
    return limit


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "name": _parse_name,
    "replace": _parse_name,
    "bind": _parse_bind,
    "advertise": _parse_advertise,
    "join": _parse_join,
    "data_dir": _parse_path,
    "zone": _parse_text(ZONE_BYTES_MAX),
    "weight": _parse_float(0, 1000),
    "tags": _parse_tags,
    "log_format": _parse_choice(LOG_FORMATS),
    "log_level": _parse_choice(LOG_LEVELS),
    "leave_timeout_s": _parse_float(0, 300),
    "io_timeout_s": _parse_float(0, 300),
    "client": _parse_bind,
    "http": _parse_bind,
    "storage": _parse_choice(("rocksdb", "memory")),
    "fsync": _parse_choice(("always", "interval")),
    "fsync_interval_ms": _parse_float(0, 60_000),
    "value_bytes_max": _parse_value_limit,
    "tombstone_grace_s": _parse_float(0, 10 * 365 * 86400.0),
    "hint_window_s": _parse_float(0, 30 * 86400.0, low_open=False),
    "anti_entropy_interval_s": _parse_float(0, 86400.0),
}
"""Top-level settings. ``membership.<field>`` settings come from MembershipConfig."""

MEMBERSHIP_FIELDS: dict[str, type] = {
    f.name: (int if f.type in ("int", int) else float)
    for f in dataclasses.fields(MembershipConfig)
}


ALERTS_SETTINGS = ("alerts.defaults", "alerts.interval_s", "alerts.rules")
"""``[alerts]`` keys; ``alerts.rules`` is an array of tables, so only a TOML file has it."""

_SECURITY_PARSERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "tls.ca": ("tls_ca", _parse_path),
    "tls.cert": ("tls_cert", _parse_path),
    "tls.key": ("tls_key", _parse_path),
    "auth.enabled": ("auth", _parse_bool),
    "auth.admin_password_file": ("admin_password_file", _parse_path),
    "auth.token_ttl_s": ("token_ttl_s", _parse_float(0, 366 * 86400.0)),
    "gossip.keyring": ("gossip_keyring", _parse_path),
    "encryption.key_file": ("encryption_key_file", _parse_path),
    "encryption.key": ("encryption_key", _parse_text(4096)),
}
"""Security settings: TOML key (``[tls] ca``) -> (SecurityConfig field, parser)."""
_HEALTH_PARSERS: dict[str, Callable[[Any], Any]] = {
    "health.interval_s": _parse_float(0, 3600.0),
    "health.disk_warn_free_pct": _parse_float(0, 100, low_open=False),
    "health.disk_stop_writes_free_pct": _parse_float(0, 100, low_open=False),
    "health.loop_lag_warn_ms": _parse_float(0, 3_600_000.0),
    "health.memory_warn_pct": _parse_float(0, 100),
}
"""``[health]`` keys (``health.x`` is ``x`` in ``[health]``; HealthConfig, HealthThresholds)."""
_RING_PARSERS: dict[str, Callable[[Any], Any]] = {
    "ring.bootstrap": _parse_bool,
    "ring.settle_s": _parse_float(0, 600.0, low_open=False),
    "ring.stream_mb_per_s": _parse_float(0, 100_000.0, low_open=False),
    "ring.stream_sessions": _parse_int_in(1, 64),
    "ring.cleanup_grace_s": _parse_float(0, 30 * 86400.0, low_open=False),
}
"""``[ring]`` keys (RingConfig)."""
_TASKS_PARSERS: dict[str, Callable[[Any], Any]] = {
    "tasks.slots": _parse_int_in(1, 1024),
    "tasks.load_ceiling_pct": _parse_float(0, 100),
    "tasks.modules": _parse_modules,
    "tasks.allow_pickle": _parse_bool,
    "tasks.lease_ttl_s": _parse_float(1.0, 3600.0, low_open=False),
    "tasks.drain_s": _parse_float(0, 3600.0, low_open=False),
    "tasks.prefetch_s": _parse_float(0, 60.0, low_open=False),
    "tasks.max_tasks_per_worker": _parse_int_in(0, 1_000_000_000),
    "tasks.max_worker_memory_mb": _parse_int_in(0, 1024 * 1024),
}
"""``[tasks]`` keys (TasksConfig)."""
_TABLES = ("membership", "alerts", "tls", "auth", "gossip", "encryption", "health", "ring",
           "tasks")
"""TOML tables whose keys are flattened to ``table.key``."""


def settings() -> list[str]:
    """Every setting's key, as used in TOML (``membership.x`` is ``x`` in ``[membership]``)."""
    return [*_PARSERS, *(f"membership.{name}" for name in MEMBERSHIP_FIELDS),
            *ALERTS_SETTINGS, *_SECURITY_PARSERS, *_HEALTH_PARSERS, *_RING_PARSERS,
            *_TASKS_PARSERS]


def env_var(key: str) -> str:
    """The environment variable for a setting key: ``membership.probe_interval_s`` ->
    ``LEADERLESS_MEMBERSHIP_PROBE_INTERVAL_S``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


# -- sources ------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file, flattened to ``key`` / ``membership.key``."""
    path = Path(path).expanduser()
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {str(path)!r} is not valid TOML: {exc}") from None
    raw: dict[str, Any] = {}
    for key, value in document.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"config: [{key}] in {str(path)!r} must be a table")
            for sub, sub_value in value.items():
                raw[f"{key}.{sub}"] = sub_value
        else:
            raw[key] = value
    for key in raw:
        _check_known(key, f"in {str(path)!r}")
    return raw


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``LEADERLESS_*`` variables. Unknown top-level variables are ignored
    (other tools may share the prefix); unknown ``LEADERLESS_MEMBERSHIP_*`` ones are errors,
    since that namespace is wholly ours and a typo there would silently keep a default."""
    by_var = {env_var(key): key for key in settings()}
    raw: dict[str, Any] = {}
    for var, value in env.items():
        if var in by_var:
            raw[by_var[var]] = value
        elif var.startswith(MEMBERSHIP_ENV_PREFIX):
            known = ", ".join(env_var(f"membership.{f}") for f in MEMBERSHIP_FIELDS)
            raise ConfigError(f"{var}: not a membership setting; known: {known}")
    return raw


def _check_known(key: str, where: str) -> None:
    if (key not in _PARSERS and key not in ALERTS_SETTINGS and key not in _SECURITY_PARSERS
            and key not in _HEALTH_PARSERS and key not in _RING_PARSERS
            and key not in _TASKS_PARSERS
            and key.removeprefix("membership.") not in MEMBERSHIP_FIELDS):
        raise ConfigError(f"{key}: unknown setting {where}; known: {', '.join(settings())}")


def default_name(port: int) -> str:
    """``<hostname>-<port>``: unique per host for nodes started on different ports."""
    host = socket.gethostname().split(".")[0]
    host = re.sub(r"[^A-Za-z0-9._-]", "-", host).strip("-._") or "node"
    return f"{host[: NAME_BYTES_MAX - 6]}-{port}"


def default_data_dir(name: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "leaderless" / name


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> NodeConfig:
    """Merge TOML < environment < flags and validate. ``flags`` holds only the flags the
    user gave (None values are ignored); ``env`` defaults to ``os.environ``; the file is
    ``config_file``, else ``$LEADERLESS_CONFIG``, else none."""
    env = os.environ if env is None else env
    given = {k: v for k, v in (flags or {}).items() if v is not None and v != () and v != []}
    for key in given:
        _check_known(key, "given as a flag")
    config_file = config_file or env.get(CONFIG_FILE_ENV) or None
    raw: dict[str, Any] = {}
    if config_file:
        raw.update(read_toml(config_file))
    raw.update(read_env(env))
    raw.update(given)
    return build_config(raw)


def _parse(key: str, raw: Any, parser: Callable[[Any], Any]) -> Any:
    try:
        return parser(raw)
    except ValueError as exc:
        raise ConfigError(f"{key}: {raw!r} {exc}") from None


def build_config(raw: Mapping[str, Any]) -> NodeConfig:
    """Validate flattened settings (``key`` / ``membership.key``) into a NodeConfig."""
    for key in raw:
        _check_known(key, "")
    values = {k: _parse(k, v, _PARSERS[k]) for k, v in raw.items() if k in _PARSERS}
    bind: Address = values.get("bind") or _parse("bind", DEFAULT_BIND, _parse_bind)
    advertise: Address | None = values.get("advertise")
    if advertise is None:
        if is_wildcard(bind.host):
            raise ConfigError(
                f"advertise: required when bind is a wildcard address ({str(bind)!r}); "
                "pass --advertise IP:PORT with an address other nodes can reach")
        advertise = bind
    name = values.get("name") or default_name(bind.port)
    return NodeConfig(
        name=name,
        bind=bind,
        advertise=advertise,
        join=values.get("join", ()),
        data_dir=values.get("data_dir") or default_data_dir(name),
        zone=values.get("zone", ""),
        weight=values.get("weight", 1.0),
        tags=values.get("tags", {}),
        log_format=values.get("log_format", "json"),
        log_level=values.get("log_level", "info"),
        leave_timeout_s=values.get("leave_timeout_s", 2.0),
        io_timeout_s=values.get("io_timeout_s", 5.0),
        membership=_membership_config(raw),
        alerts=_alerts_config(raw),
        security=_security_config(raw),
        health=_health_config(raw),
        ring=RingConfig(**{key.removeprefix("ring."): _parse(key, raw[key], parser)
                           for key, parser in _RING_PARSERS.items() if key in raw}),
        tasks=TasksConfig(**{key.removeprefix("tasks."): _parse(key, raw[key], parser)
                             for key, parser in _TASKS_PARSERS.items() if key in raw}),
        replace=values.get("replace", ""),
        **{key: values[key] for key in _DATA_SETTINGS if key in values},
    )


_DATA_SETTINGS = ("client", "http", "storage", "fsync", "fsync_interval_ms", "value_bytes_max",
                  "tombstone_grace_s", "hint_window_s", "anti_entropy_interval_s")


def _membership_config(raw: Mapping[str, Any]) -> MembershipConfig:
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("membership."):
            field = key.removeprefix("membership.")
            kind = MEMBERSHIP_FIELDS[field]
            parser = _parse_int if kind is int else _parse_float(float("-inf"), float("inf"))
            fields[field] = _parse(key, value, parser)
    try:
        return MembershipConfig(**fields)
    except ValueError as exc:
        raise ConfigError(f"membership: {exc}") from None


def _health_config(raw: Mapping[str, Any]) -> HealthConfig:
    """``[health]``: each value parsed on its own, then the thresholds checked together
    (stop-writes must not be above warn)."""
    values = {key.removeprefix("health."): _parse(key, raw[key], parser)
              for key, parser in _HEALTH_PARSERS.items() if key in raw}
    interval_s = values.pop("interval_s", HEALTH_INTERVAL_S_DEFAULT)
    try:
        thresholds = HealthThresholds(**values)
    except ValueError as exc:
        raise ConfigError(f"health: {exc}") from None
    return HealthConfig(interval_s, thresholds)


def _security_config(raw: Mapping[str, Any]) -> SecurityConfig:
    """The security tables; TLS needs its three files together, and each must exist."""
    fields = {field: _parse(key, raw[key], parser)
              for key, (field, parser) in _SECURITY_PARSERS.items() if key in raw}
    config = SecurityConfig(**fields)
    tls = {"tls.ca": config.tls_ca, "tls.cert": config.tls_cert, "tls.key": config.tls_key}
    given = [key for key, path in tls.items() if path is not None]
    if given and len(given) != len(tls):
        missing = ", ".join(f"--{key.replace('.', '-')}" for key in tls if key not in given)
        raise ConfigError(f"tls: {', '.join(given)} given without {missing}; TLS needs the "
                          "CA, the node's certificate and its key (leaderless certs init, "
                          "leaderless certs issue NODE)")
    files = {**tls, "auth.admin_password_file": config.admin_password_file,
             "gossip.keyring": config.gossip_keyring,
             "encryption.key_file": config.encryption_key_file}
    for key, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: {str(path)!r} is not a readable file")
    if config.encryption_key_file is not None and config.encryption_key is not None:
        raise ConfigError("encryption: give the data keys as a file (encryption.key_file) or "
                          "in LEADERLESS_ENCRYPTION_KEY, not both")
    return config


def _parse_alert_rules(raw: Any) -> tuple[Rule, ...]:
    try:
        return parse_rules(raw)
    except RuleError as exc:
        raise ConfigError(f"alerts.rules: {exc}") from None


def _alerts_config(raw: Mapping[str, Any]) -> AlertsConfig:
    """``[alerts]``: each rule checked on its own (errors name the rule and the field),
    then the whole (how many rules with the defaults)."""
    defaults = True
    if "alerts.defaults" in raw:
        defaults = _parse("alerts.defaults", raw["alerts.defaults"], _parse_bool)
    interval_s = ALERTS_INTERVAL_S_DEFAULT
    if "alerts.interval_s" in raw:
        interval_s = _parse("alerts.interval_s", raw["alerts.interval_s"],
                            _parse_float(0, ALERTS_INTERVAL_S_MAX))
    rules = _parse_alert_rules(raw["alerts.rules"]) if "alerts.rules" in raw else ()
    try:
        return AlertsConfig(defaults=defaults, rules=rules, interval_s=interval_s)
    except RuleError as exc:
        raise ConfigError(f"alerts.rules: {exc}") from None
