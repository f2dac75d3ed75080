"""A node's side of the ring changes: join with bootstrap, decommission, replace, capacity.

The decisions are ``core.ring_changes`` (the same machine the simulator runs); this module
persists the node's ring state, drives the machine every ``STEP_S``, and carries out its
actions: the fetch plan goes to the node's stream service (``runtime.streaming``), new
ring fields are saved to the data dir and then gossiped, a completed leave leaves the
membership and stops the node.

The ring state survives restarts (``ring.json`` in the data dir): a node that crashes while
joining restarts joining and resumes its fetches; a decommissioned node refuses to start
again on the same data dir.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from leaderless.core.locks import LOCK_KEYSPACE, LOCK_REPLICATION
from leaderless.core.membership import Member
from leaderless.core.messages import MemberStatus, NodeMeta
from leaderless.core.placement import Placement, RingState
from leaderless.core.ring_changes import Depart, Me, Publish, RingChanges, SetPlan
from leaderless.core.schema import SYSTEM_KEYSPACE
from leaderless.core.tasks import (
    INDEX_KEYSPACE,
    INDEX_REPLICATION,
    TASK_KEYSPACE,
    TASK_REPLICATION,
)
from leaderless.durable_files import write_atomically
from leaderless.runtime.errors import DataDirError, StartupError
from leaderless.runtime.logs import NodeLogger
from leaderless.security.auth import AUTH_KEYSPACE

STEP_S = 0.5
"""How often the node looks at the ring: a change completes at most this much after it can."""
RING_FILE = "ring.json"
STATE_NAMES = {RingState.NORMAL: "normal", RingState.JOINING: "joining",
               RingState.LEAVING: "leaving"}
SYSTEM_REPLICATION = {AUTH_KEYSPACE: 3, LOCK_KEYSPACE: LOCK_REPLICATION,
                      TASK_KEYSPACE: TASK_REPLICATION, INDEX_KEYSPACE: INDEX_REPLICATION}
"""The system keyspaces with fixed definitions (not in the schema keyspace): the strong
ones and the task index."""


class RingChangeError(Exception):
    """A ring change this node refuses (the message says why and what to do)."""


def load_ring_file(data_dir: Path) -> dict[str, Any] | None:
    """The saved ring state, or None on a first start."""
    path = data_dir / RING_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataDirError(f"data_dir: cannot read {str(path)!r}: {exc}; restore it from a "
                           "backup of this node's data dir") from None
    if not isinstance(saved, dict) or saved.get("state") not in (
            "normal", "joining", "leaving", "left"):
        raise DataDirError(f"data_dir: {str(path)!r} is corrupt (no valid ring state)")
    return saved


def save_ring_file(data_dir: Path, fields: Mapping[str, Any]) -> None:
    try:
        write_atomically(data_dir / RING_FILE, json.dumps(dict(fields)).encode() + b"\n",
                         0o644)
    except OSError as exc:
        raise DataDirError(f"data_dir: cannot write {RING_FILE}: {exc.strerror}; check free "
                           "space and permissions of --data-dir") from None


def initial_ring_fields(saved: dict[str, Any] | None, *, token_count: int, joins: bool,
                        bootstrap: bool, replace: str) -> dict[str, Any]:
    """The ring fields a node starts with: the saved ones, or for a fresh data dir
    ``joining`` (it streams its ranges first) when it joins an existing cluster with
    bootstrap on, else ``normal``. ``token_count`` is what the configured weight gives:
    a saved node whose count differs starts a capacity change."""
    if saved is not None:
        if saved["state"] == "left":
            raise StartupError("this node was decommissioned (its data dir says it left the "
                               "ring); to join again start it with an empty --data-dir")
        if replace:
            raise StartupError("--replace is for a fresh node: this data dir already holds "
                               f"a member of the ring ({saved['state']})")
        fields = dict(saved)
        count = int(fields.get("token_count", token_count))
        if fields["state"] == "normal" and count != token_count:
            fields["next_token_count"] = token_count
        return fields
    if replace:
        if not joins:
            raise StartupError("--replace needs --join: the node learns the replaced "
                               "member's tokens from the cluster")
        return {"state": "joining", "token_count": 0, "replacing": replace}
    state = "joining" if joins and bootstrap else "normal"
    return {"state": state, "token_count": token_count}


class RingService:
    """Drives ``core.ring_changes.RingChanges`` for this node."""

    def __init__(self, name: str, data_dir: Path, fields: dict[str, Any], *, settle_s: float,
                 kv: Any, meta: Callable[[], NodeMeta],
                 publish: Callable[[dict[str, Any]], None],
                 members: Callable[[], list[Member]],
                 depart: Callable[[], Coroutine[Any, Any, None]],
                 now: Callable[[], float]) -> None:
        self.name = name
        self.data_dir = data_dir
        self.fields = fields
        self.log = NodeLogger(name, "ring")
        self.machine = RingChanges(settle_s)
        self._kv = kv
        self._meta = meta
        self._publish = publish
        self._members = members
        self._depart = depart
        self._now = now
        self._task: asyncio.Task[None] | None = None
        self._departure: asyncio.Task[None] | None = None
        self.started_at = time.time()
        self.departing = False
        self.error = ""
        """Why a change cannot go on (e.g. the member to replace is alive), for status."""

    def meta_fields(self) -> dict[str, Any]:
        """The ``NodeMeta`` fields of the saved state."""
        return {"ring_state": _state(self.fields["state"]),
                "token_count": int(self.fields.get("token_count", 0)),
                "next_token_count": int(self.fields.get("next_token_count", 0)),
                "replacing": str(self.fields.get("replacing", ""))}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not stop the ring loop for good
                self.log.error("ring_step_failed", error=repr(exc))
            await asyncio.sleep(STEP_S)

    # -- the step ------------------------------------------------------------------------

    def replication(self, placement: Placement) -> dict[str, int]:
        """Keyspace -> replication factor of everything this node may have to fetch: the
        user keyspaces it knows, the strong system keyspaces, and the schema keyspace
        (held by every member: its N is the number of members the ring will have)."""
        result = {d.name: d.replication for d in self._kv.local_definitions()}
        result.update(SYSTEM_REPLICATION)
        result[SYSTEM_KEYSPACE] = max(1, len(set(placement.current.nodes)
                                             | set(placement.gaining)))
        return result

    async def _step(self) -> None:
        if self.departing:
            return
        meta = self._meta()
        if meta.replacing and meta.token_count == 0:
            self._take_over_tokens(meta.replacing)
            return
        self._kv.refresh_placement()
        placement = self._kv.placement
        now = self._now()
        me = Me(self.name, RingState(meta.ring_state), meta.token_count, meta.next_token_count,
                meta.synced)
        streams = self._kv.streaming
        actions = self.machine.step(now, placement, me, self.replication(placement),
                                    streams.done())
        for action in actions:
            if isinstance(action, SetPlan):
                streams.set_plan([f.range_fetch() for f in action.fetches])
                self.log.info("fetch_plan", ranges=len(action.fetches),
                              sources=len({s for f in action.fetches for s in f.fetch.sources}))
            elif isinstance(action, Publish):
                self._apply(dict(action.fields))
            elif isinstance(action, Depart):
                self.departing = True
                self._save(state="left")
                self.log.info("decommissioned", note="every range is held by its new owners; "
                              "leaving the cluster")
                # Its own task: stopping the node cancels this loop's task.
                self._departure = asyncio.get_running_loop().create_task(self._depart())
                return

    def _apply(self, fields: dict[str, Any]) -> None:
        """Save ring-state changes durably, then gossip them (a restart must never
        announce less than it did)."""
        persisted = {k: v for k, v in fields.items() if k != "synced"}
        if "ring_state" in persisted:
            state = STATE_NAMES[RingState(persisted.pop("ring_state"))]
            persisted["state"] = state
            was = self.fields["state"]
            self.log.info("ring_state", state=state, was=was)
        if persisted:
            self._save(**persisted)
        if "token_count" in fields:
            self.log.info("capacity_changed", token_count=fields["token_count"])
        if self.fields["state"] == "normal" and "ring_state" in fields:
            self._kv.streaming.forget_progress()
        self._publish(fields)

    def _save(self, **changes: Any) -> None:
        self.fields.update(changes)
        save_ring_file(self.data_dir, self.fields)

    def _take_over_tokens(self, target: str) -> None:
        """``--replace``: adopt the dead member's token seed and count (then fetch its
        ranges as a joining node)."""
        member = next((m for m in self._members() if m.name == target), None)
        if member is None or member.meta.token_count == 0:
            self.error = f"waiting to learn {target!r} (the member to replace) from the cluster"
            return
        if member.status in (MemberStatus.ALIVE, MemberStatus.SUSPECT):
            self.error = (f"{target!r} is {member.status.name.lower()}: only a dead member "
                          "can be replaced; stop it first")
            return
        self.error = ""
        self._save(token_count=member.meta.token_count, token_seed=member.meta.token_seed)
        self.log.info("replacing", member=target, token_count=member.meta.token_count)
        self._publish({"token_seed": member.meta.token_seed,
                       "token_count": member.meta.token_count, "replacing": target})

    # -- operator requests -------------------------------------------------------------

    def decommission(self) -> None:
        """Start leaving: stream this node's ranges to their next owners, then go."""
        state = self.fields["state"]
        if state == "leaving":
            return
        if state != "normal":
            raise RingChangeError(f"this node is {state}: only a normal member can be "
                                  "decommissioned (wait until it has joined)")
        placement = self._kv.placement
        others = [n for n in placement.base.nodes if n != self.name]
        biggest = max((d.replication for d in self._kv.local_definitions()), default=1)
        if len(others) < biggest:
            raise RingChangeError(
                f"decommissioning would leave {len(others)} member(s) for keyspaces of "
                f"replication {biggest}: add a node first (or lower the replication)")
        self._apply({"ring_state": RingState.LEAVING})

    def set_capacity(self, token_count: int) -> None:
        state = self.fields["state"]
        if state != "normal":
            raise RingChangeError(f"this node is {state}: change its capacity once it is "
                                  "normal")
        if int(self.fields.get("next_token_count", 0)):
            raise RingChangeError("a capacity change is already in progress")
        if token_count == int(self.fields.get("token_count", 0)):
            return
        self._apply({"next_token_count": token_count})

    def status(self) -> dict[str, Any]:
        meta = self._meta()
        progress = self._kv.streaming.progress()
        return {"state": self.fields["state"], "token_count": meta.token_count,
                "next_token_count": meta.next_token_count, "replacing": meta.replacing,
                "waiting_for": list(self.machine.waiting_for), "error": self.error,
                "settled": self.machine.settled(self._now()), "stream": progress}


def _state(name: str) -> RingState:
    return {"normal": RingState.NORMAL, "joining": RingState.JOINING,
            "leaving": RingState.LEAVING, "left": RingState.LEAVING}[name]
