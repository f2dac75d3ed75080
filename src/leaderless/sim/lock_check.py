"""Safety checks of a lock history: leases with fencing tokens (``core.locks``) as seen by
the clients of a simulation (``sim.locks``), judged against true simulated time.

Pure functions over plain records; each returns a list of violations (empty: safe), every
one naming the seed and the offending operations, so a failure reads as a bug report.

What is checked, and why each is exactly what the lock promises (no more):

- **One owner per token.** Two grants to different owners never carry the same token
  (each grant is ``token + 1`` of the chosen state; the same owner asking again while it
  holds the lease gets its own token back, which is fine).
- **Tokens follow real time.** A state a response revealed (a grant, a refusal's current
  holder, a release) has a token no lower than any state revealed by a response that
  completed before it was invoked; and a grant invoked after another grant completed has a
  strictly higher token, unless it is the same owner getting the same lease back.
- **Mutual exclusion while the lease is safe.** A client may treat its lease as held from
  the grant's response until ``invoked + ttl - skew bound`` (or a renewal's), or until it
  sends a release. A grant to another owner with a higher token is chosen after the earlier
  lease expired on some node's clock (or was released); with clocks within the bound that
  is never before the earlier holder's safe end. So no grant with a higher token to another
  owner may *complete* before that end. A release counts once it was sent: it may have
  been chosen any time after.
- **Fenced writes.** A fenced write that succeeded carries a token no lower than any
  fenced write that succeeded before it was invoked (the register's fence only grows); a
  refusal names a newer token that some write really carried; and the value left in the
  data key once healed was written under the highest token that ever succeeded.

Operations with an unknown outcome (a timeout, ``maybe_applied``) are not held against
anything: an acquire that may have granted is not a lease its client holds, but the token
it may have consumed leaves a gap that no check minds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

STATUSES = ("ok", "conflict", "fenced", "fail", "info", "pending")
"""``ok``: applied; ``conflict``: refused by the lock's state (not applied); ``fenced``: a
write refused by a newer token; ``fail``: certainly not applied; ``info``: unknown;
``pending``: never answered (a finished run has none)."""


@dataclasses.dataclass
class LockOp:
    """One client's acquire, renew or release of the lock, as the client saw it."""

    index: int
    """Position in the history (for messages)."""
    client: int
    owner: str
    kind: str
    """``acquire`` | ``renew`` | ``release``"""
    invoke_s: float
    """True simulated time the request was first sent (retries share it)."""
    ttl_ms: int = 0
    token: int | None = None
    """Renew, release: the token asked for. Acquire: the token granted (once ``ok``)."""
    status: str = "pending"
    complete_s: float | None = None
    """When the definite answer came back (``ok``, ``conflict``, ``fail``)."""
    valid_until_s: float | None = None
    """Acquire, renew: ``invoke_s + ttl - skew bound``: until when the lease is safe if
    this change applied (an ``ok`` one: until when its client may treat it as held)."""
    seen: tuple[str, int] | None = None
    """(holder, token) of the lock state the answer carried (a grant, a refusal's current
    state, a release); None when the answer carried none."""


@dataclasses.dataclass
class WriteOp:
    """One fenced put of the data key, made under the lease ``token`` of ``owner``."""

    index: int
    client: int
    owner: str
    token: int
    value: bytes
    invoke_s: float
    status: str = "pending"
    complete_s: float | None = None
    fenced_by: int | None = None
    """A ``fenced`` refusal: the newer token the key was already changed under."""
    stale: bool = False
    """The client wrote after its lease's safe end (a paused client): informational."""


@dataclasses.dataclass
class LockHistory:
    seed: int
    locks: list[LockOp]
    writes: list[WriteOp]
    final_value: bytes | None = None
    """The data key's value read after healing."""
    final_fence: int | None = None
    """The token of the fence the data key's chosen register carries after healing."""
    final_lock: tuple[str, int] | None = None
    """(holder, token) of the lock read after healing (None: not read)."""
    final_read: bool = True
    """False: the final reads were not made; the final-state checks are skipped."""


def _when(t: float | None) -> str:
    return "never" if t is None else f"{t:.4f} s"


def describe(op: LockOp | WriteOp) -> str:
    """One operation in a failure message."""
    if isinstance(op, WriteOp):
        extra = f" fenced by {op.fenced_by}" if op.fenced_by is not None else ""
        return (f"#{op.index} write {op.value!r} by {op.owner} under token {op.token} "
                f"[{_when(op.invoke_s)} .. {_when(op.complete_s)}] {op.status}{extra}"
                f"{' (stale)' if op.stale else ''}")
    token = f" token {op.token}" if op.token is not None else ""
    until = (f" safe until {_when(op.valid_until_s)}"
             if op.valid_until_s is not None and op.status == "ok" else "")
    shown = (f" (lock: holder {op.seen[0] or '-'}, token {op.seen[1]})"
             if op.seen is not None and op.status != "ok" else "")
    return (f"#{op.index} {op.kind} by {op.owner}{token} "
            f"[{_when(op.invoke_s)} .. {_when(op.complete_s)}] {op.status}{until}{shown}")


def grants(history: LockHistory) -> list[LockOp]:
    """Acquires that certainly granted, with their token."""
    out = [op for op in history.locks if op.kind == "acquire" and op.status == "ok"]
    assert all(op.token is not None and op.complete_s is not None for op in out)
    return out


def _before(a: LockOp | WriteOp, b: LockOp | WriteOp) -> bool:
    """``a`` was answered before ``b`` was sent (real-time order)."""
    return a.complete_s is not None and a.complete_s < b.invoke_s


def check_ended(history: LockHistory) -> list[str]:
    ops: Iterable[LockOp | WriteOp] = [*history.locks, *history.writes]
    return [f"seed {history.seed}: never answered: {describe(op)}" for op in ops
            if op.status not in STATUSES or op.status == "pending"]


def check_token_owners(history: LockHistory) -> list[str]:
    """No token is granted to two different owners."""
    first: dict[int, LockOp] = {}
    out: list[str] = []
    for op in grants(history):
        assert op.token is not None
        other = first.setdefault(op.token, op)
        if other.owner != op.owner:
            out.append(f"seed {history.seed}: token {op.token} granted to two owners: "
                       f"{describe(other)}; {describe(op)}")
    return out


def check_token_order(history: LockHistory) -> list[str]:
    """Tokens never go back in real time. For each response that showed a lock state
    (holder h, token t) and was answered before a grant was sent, the grant's token is
    above t, or equal to it only if the grant's owner is h (its own lease back). One sweep
    in invocation order over the states answered so far."""
    out: list[str] = []
    shown = sorted((op for op in history.locks if op.seen is not None
                    and op.complete_s is not None),
                   key=lambda op: op.complete_s or 0.0)
    top: LockOp | None = None
    """The answered op that showed the highest token so far."""
    holders_at_top: dict[str, LockOp] = {}
    i = 0
    for b in sorted((op for op in history.locks if op.seen is not None),
                    key=lambda op: op.invoke_s):
        while i < len(shown) and _before(shown[i], b):
            a = shown[i]
            assert a.seen is not None
            if top is None or a.seen[1] > _token(top):
                top, holders_at_top = a, {}
            if a.seen[1] == _token(top):
                holders_at_top.setdefault(a.seen[0], a)
            i += 1
        if top is None:
            continue
        assert b.seen is not None
        if b.seen[1] < _token(top):
            out.append(f"seed {history.seed}: token went back from {_token(top)} to "
                       f"{b.seen[1]}: {describe(top)} answered before {describe(b)} was sent")
        elif (b.kind == "acquire" and b.status == "ok" and b.seen[1] == _token(top)
              and set(holders_at_top) != {b.owner}):
            other = next(op for h, op in holders_at_top.items() if h != b.owner)
            out.append(f"seed {history.seed}: grant not newer than the lock state "
                       f"{other.seen} shown by {describe(other)}, answered before "
                       f"{describe(b)} was sent")
    return out


def _token(op: LockOp) -> int:
    assert op.seen is not None
    return op.seen[1]


def safe_end(history: LockHistory, grant: LockOp) -> float:
    """Until when ``grant``'s client may treat its lease as held. A grant or renewal *sets*
    the lease's expiry to its own ``ttl`` from when it is applied (shorter or longer), and
    a client sends its changes one at a time, so its belief follows its later changes of
    the lease in order: one that succeeded sets the safe end to its own; one with an
    unknown outcome may have applied, so it can only shorten it; a release ends it when
    sent. Its next acquire starts a new cycle: if it got the same lease back, that grant's
    own safe end takes over; otherwise this lease is no longer acted on."""
    assert grant.valid_until_s is not None
    end = grant.valid_until_s
    later = sorted((op for op in history.locks if op.owner == grant.owner
                    and op.invoke_s > grant.invoke_s), key=lambda op: op.invoke_s)
    for op in later:
        if op.kind == "acquire":
            if op.status == "ok" and op.token == grant.token:
                return min(end, safe_end(history, op))  # the same lease, set anew
            return min(end, op.invoke_s)  # a new cycle: this lease is not acted on
        if op.token != grant.token:
            continue
        if op.kind == "release":
            return min(end, op.invoke_s)
        assert op.valid_until_s is not None
        if op.status == "ok":
            end = op.valid_until_s
        elif op.status == "info":
            end = min(end, op.valid_until_s)
    return end


def check_safe_windows(history: LockHistory) -> list[str]:
    """No other owner's grant with a higher token completes while a lease is safe."""
    out: list[str] = []
    done = grants(history)
    ends = {op.index: safe_end(history, op) for op in done}
    for a in done:
        for b in done:
            assert a.token is not None and b.token is not None and b.complete_s is not None
            if b.owner != a.owner and b.token > a.token and b.complete_s < ends[a.index]:
                out.append(f"seed {history.seed}: two owners held the lock at once: "
                           f"{describe(a)}, its lease safe until {_when(ends[a.index])} "
                           f"(renewals and release counted); {describe(b)} granted before "
                           "that")
    return out


def check_fenced_writes(history: LockHistory) -> list[str]:
    out: list[str] = []
    ok = [w for w in history.writes if w.status == "ok"]
    for a in ok:
        for b in ok:
            if _before(a, b) and b.token < a.token:
                out.append(f"seed {history.seed}: stale fenced write accepted after a newer "
                           f"one: {describe(a)} answered before {describe(b)} was sent")
    carried = {w.token for w in history.writes if w.status in ("ok", "info")}
    for w in history.writes:
        if w.status != "fenced":
            continue
        if w.fenced_by is None or w.fenced_by <= w.token or w.fenced_by not in carried:
            out.append(f"seed {history.seed}: a fenced refusal names no newer token that a "
                       f"write carried: {describe(w)}")
    return out


def check_final(history: LockHistory) -> list[str]:
    """The data key ends with a value written under the highest token that succeeded, and
    the lock's token is at least every token granted."""
    if not history.final_read:
        return []
    seed = history.seed
    out: list[str] = []
    ok_tokens = [w.token for w in history.writes if w.status == "ok"]
    highest = max(ok_tokens, default=None)
    if history.final_value is None:
        if highest is not None:
            out.append(f"seed {seed}: the data key is empty after healing, but writes under "
                       f"token {highest} succeeded")
    else:
        writers = [w for w in history.writes if w.value == history.final_value]
        if len(writers) != 1 or writers[0].status not in ("ok", "info"):
            out.append(f"seed {seed}: the final value {history.final_value!r} was not written "
                       f"by one write that may have applied: "
                       f"{[describe(w) for w in writers]}")
        else:
            final = writers[0]
            if highest is not None and final.token < highest:
                out.append(f"seed {seed}: the final value was written under token "
                           f"{final.token}, but a write under token {highest} succeeded: "
                           f"{describe(final)}")
            if history.final_fence is not None and history.final_fence != final.token:
                out.append(f"seed {seed}: the data key's fence is {history.final_fence}, but "
                           f"its value was written under token {final.token}: "
                           f"{describe(final)}")
    granted = [op.seen[1] for op in history.locks if op.seen is not None]
    if history.final_lock is not None and granted and history.final_lock[1] < max(granted):
        out.append(f"seed {seed}: the lock's token after healing is {history.final_lock[1]}, "
                   f"below token {max(granted)} that a response showed")
    return out


def check_lock_history(history: LockHistory) -> list[str]:
    """Every check above; empty when the history is safe."""
    return [*check_ended(history), *check_token_owners(history), *check_token_order(history),
            *check_safe_windows(history), *check_fenced_writes(history),
            *check_final(history)]


def expiry_takeovers(history: LockHistory) -> int:
    """Grants to another owner after a lease that was never released (it had to expire):
    how much a history exercised expiry."""
    done = sorted(grants(history), key=lambda op: op.token or 0)
    count = 0
    for a, b in zip(done, done[1:], strict=False):
        released = any(op.kind == "release" and op.owner == a.owner and op.token == a.token
                       and op.invoke_s < b.invoke_s for op in history.locks)
        if b.owner != a.owner and not released:
            count += 1
    return count
