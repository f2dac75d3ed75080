"""The dynamic snitch: which replica to ask first, by how fast and how busy each one is.

Cassandra's idea (``DynamicEndpointSnitch``): instead of always asking replicas in ring
order, keep per peer an estimate of its reply latency and prefer the fastest, so one slow
node (a busy disk, a GC pause, a noisy neighbour) stops serving most of the reads it
happens to replicate. Here, per peer:

- ``latency_s``: an exponentially weighted moving average of its reply latency, updated on
  every replica reply (weight ``ewma_alpha`` for the newest sample); a request that timed
  out counts as a sample of the time waited;
- ``outstanding``: requests sent to it and not yet answered (or expired).

A peer's score is ``latency * (1 + outstanding)`` (lower is better): the latency it showed,
scaled by the queue we are building on it, so load spreads before the latency moves. The
latency used is adjusted twice:

- *silence*: while requests to a peer are outstanding, its latency is at least the time
  since it last answered (a node that stopped answering gets worse by the millisecond, long
  before the timeout or the failure detector says so);
- *decay*: a peer not heard from for ``idle_after_s`` drifts back toward the mean latency of
  the other peers (half-way every ``idle_half_life_s``), so a node that was slow once is tried
  again later instead of being shunned for ever (it only gets new samples when asked).

``order`` ranks a list of replicas best first: this node first when it is one (no network
hop), then the alive replicas of this node's zone (when zones are set), then alive replicas
of other zones, then suspect ones. Within a group the given order (ring order for the
coordinator) is kept unless it is clearly worse: Cassandra's *badness threshold* — the
replicas are re-sorted by score only if at some position the given order's replica scores
more than ``1 + badness_threshold`` times the best-sorted one's. Near-ties thus keep ring
order, which spreads keys over their replicas instead of herding every read onto the one
node that happens to be a hair faster right now.

Pure and sans-I/O: time arrives as ``now``; memory is bounded by ``peers_max`` and by
``set_peers`` (peers that left the ring are forgotten).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet


@dataclasses.dataclass(frozen=True)
class SnitchConfig:
    ewma_alpha: float = 0.2
    """Weight of the newest latency sample: about the last 10 replies shape the estimate,
    so a peer that turns slow is noticed within a few reads and one outlier does not
    swing the order."""
    badness_threshold: float = 0.5
    """Re-sort away from the given (ring) order only when a replica scores more than 1.5x
    the best at its position. Latencies of a busy event loop jitter by tens of percent;
    below this, the difference is noise and ring order spreads the load better (Cassandra's
    ``dynamic_snitch_badness_threshold``, 0.1 in 3.x and 1.0 in 4.x)."""
    idle_after_s: float = 2.0
    """A peer with no reply for this long starts drifting back toward the mean latency."""
    idle_half_life_s: float = 5.0
    """...half-way there every this many seconds: a peer slow 10 s ago is mostly forgiven
    after 30 s, and a node shunned for one bad second is asked again soon."""
    default_latency_s: float = 0.001
    """The estimate before any reply was measured (a LAN round trip): only its equality for
    every peer matters, so the outstanding counts decide."""
    latency_floor_s: float = 0.000_05
    """Latencies below this count as this, so outstanding requests still weigh when replies
    are instant (a simulated network, this node's own replica)."""
    latency_max_s: float = 60.0
    """Samples are clipped here: one absurd sample (a suspended process) must not take
    minutes to decay."""
    peers_max: int = 10_000
    """Peers tracked at most (the largest cluster the simulator runs); beyond it a new peer
    is scored as unknown until ``set_peers`` forgets departed ones."""

    def __post_init__(self) -> None:
        assert 0.0 < self.ewma_alpha <= 1.0, "ewma_alpha is in (0, 1]"
        assert self.badness_threshold >= 0.0, "badness_threshold is >= 0"
        assert self.idle_half_life_s > 0.0, "idle_half_life_s is > 0"
        assert self.peers_max >= 1, "peers_max is >= 1"


@dataclasses.dataclass(slots=True)
class _Peer:
    latency_s: float = 0.0
    samples: int = 0
    last_reply_at: float = 0.0
    outstanding: int = 0
    waiting_since: float = 0.0
    """When the oldest unanswered request was sent, or the last reply came (if later)."""
    requests: int = 0
    timeouts: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class PeerScore:
    """One peer as the snitch sees it (for metrics and status pages)."""

    name: str
    zone: str
    latency_s: float
    """The latency the score uses (silence and decay applied)."""
    ewma_latency_s: float | None
    """The measured moving average (None: no reply measured yet)."""
    outstanding: int
    score: float
    requests: int
    """Requests sent to this peer since it was first seen."""
    timeouts: int


class Snitch:
    """Per-peer latency and load, and the replica order they imply.

    ``me``: this node's name (None on a client, which is no replica); ``zone``: this side's
    zone ("" or None: taken from ``set_peers`` for ``me``; no zone preference if empty).
    """

    def __init__(self, me: str | None, config: SnitchConfig | None = None,
                 zone: str | None = None) -> None:
        self.me = me
        self.config = config or SnitchConfig()
        self._zone_given = zone or ""
        self.zone = self._zone_given
        self._peers: dict[str, _Peer] = {}
        self._zones: dict[str, str] = {}
        self._latency_sum = 0.0
        """Sum of ``latency_s`` over peers with samples (for the mean, kept in O(1))."""
        self._measured = 0

    # -- membership ----------------------------------------------------------------------

    def set_peers(self, zones: Mapping[str, str]) -> None:
        """The current members (name -> zone, "" if none): peers not among them are
        forgotten, so memory follows the ring."""
        self._zones = dict(zones)
        if not self._zone_given and self.me is not None:
            self.zone = self._zones.get(self.me, "")
        for name in [n for n in self._peers if n not in self._zones]:
            self._drop(name)

    def _drop(self, name: str) -> None:
        peer = self._peers.pop(name)
        if peer.samples:
            self._latency_sum -= peer.latency_s
            self._measured -= 1

    def _peer(self, name: str) -> _Peer | None:
        peer = self._peers.get(name)
        if peer is None and len(self._peers) < self.config.peers_max:
            peer = self._peers[name] = _Peer()
        return peer

    # -- inputs --------------------------------------------------------------------------

    def on_send(self, name: str, now: float) -> None:
        """A request left for ``name``."""
        peer = self._peer(name)
        if peer is None:
            return
        if peer.outstanding == 0:
            peer.waiting_since = now
        peer.outstanding += 1
        peer.requests += 1

    def on_reply(self, name: str, now: float, latency_s: float | None = None) -> None:
        """``name`` answered a request (``latency_s``: its round trip, when it is a sample
        worth learning from: reads, not writes that wait for a disk sync)."""
        peer = self._peers.get(name)
        if peer is None:
            return
        if peer.outstanding > 0:
            peer.outstanding -= 1
        peer.waiting_since = now
        peer.last_reply_at = now
        if latency_s is not None:
            self._sample(peer, latency_s)

    def record_latency(self, name: str, latency_s: float) -> None:
        """A latency sample for ``name`` (its reply already counted by ``on_reply``)."""
        peer = self._peers.get(name)
        if peer is not None:
            self._sample(peer, latency_s)

    def on_timeout(self, name: str, now: float, waited_s: float) -> None:
        """A request to ``name`` got no answer within ``waited_s``: it is forgotten, and the
        wait counts as a latency sample (what the peer cost us)."""
        peer = self._peers.get(name)
        if peer is None:
            return
        if peer.outstanding > 0:
            peer.outstanding -= 1
        peer.timeouts += 1
        self._sample(peer, waited_s)

    def _sample(self, peer: _Peer, latency_s: float) -> None:
        sample = min(self.config.latency_max_s, max(0.0, latency_s))
        if peer.samples == 0:
            peer.latency_s = sample
            self._latency_sum += sample
            self._measured += 1
        else:
            delta = self.config.ewma_alpha * (sample - peer.latency_s)
            peer.latency_s += delta
            self._latency_sum += delta
        peer.samples += 1

    # -- scores --------------------------------------------------------------------------

    def mean_latency_s(self) -> float:
        """Mean of the measured peers' averages (the default before any was measured)."""
        if self._measured == 0:
            return self.config.default_latency_s
        return max(0.0, self._latency_sum / self._measured)

    def latency_s(self, name: str, now: float) -> float:
        """The latency the score uses: measured, decayed toward the mean when idle, and at
        least the current silence while requests are outstanding."""
        config = self.config
        mean = self.mean_latency_s()
        peer = self._peers.get(name)
        if peer is None:
            return max(config.latency_floor_s, mean)
        latency = mean
        if peer.samples:
            latency = peer.latency_s
            idle_s = now - peer.last_reply_at - config.idle_after_s
            if idle_s > 0.0 and self._measured > 1:
                # Toward the others' mean: its own slowness must not hold it back.
                others = max(0.0, (self._latency_sum - latency) / (self._measured - 1))
                latency = others + (latency - others) * 0.5 ** (idle_s / config.idle_half_life_s)
        if peer.outstanding:
            latency = max(latency, now - peer.waiting_since)
        return max(config.latency_floor_s, latency)

    def score(self, name: str, now: float) -> float:
        """Lower is better: ``latency * (1 + outstanding)``."""
        peer = self._peers.get(name)
        outstanding = peer.outstanding if peer is not None else 0
        return self.latency_s(name, now) * (1 + outstanding)

    def outstanding(self, name: str) -> int:
        peer = self._peers.get(name)
        return peer.outstanding if peer is not None else 0

    # -- ordering ------------------------------------------------------------------------

    def order(self, now: float, names: Sequence[str],
              alive: AbstractSet[str] | None = None) -> list[str]:
        """``names`` best first (see the module docstring). ``alive``: the replicas believed
        fully alive (None: all); the others are suspect and go last."""
        if len(names) <= 1:
            return list(names)
        first: list[str] = []
        local: list[str] = []
        remote: list[str] = []
        suspect: list[str] = []
        zone = self.zone
        for name in names:
            if name == self.me:
                first.append(name)
            elif alive is not None and name not in alive:
                suspect.append(name)
            elif zone and self._zones.get(name, zone) != zone:
                remote.append(name)
            else:
                local.append(name)
        return (first + self._rank(now, local) + self._rank(now, remote)
                + self._rank(now, suspect))

    def _rank(self, now: float, group: list[str]) -> list[str]:
        """``group`` in its given order unless some position is clearly worse than the
        score order's (the badness threshold)."""
        if len(group) <= 1:
            return group
        scores = {name: self.score(name, now) for name in group}
        ranked = sorted(group, key=scores.__getitem__)  # stable: ties keep given order
        slack = 1.0 + self.config.badness_threshold
        for given, best in zip(group, ranked, strict=True):
            if scores[given] > scores[best] * slack:
                return ranked
        return group

    # -- views ---------------------------------------------------------------------------

    def view(self, now: float, names: Iterable[str] | None = None) -> list[PeerScore]:
        """Every tracked peer (or those of ``names``) with its figures, by name."""
        chosen = sorted(self._peers if names is None else set(names))
        out: list[PeerScore] = []
        for name in chosen:
            peer = self._peers.get(name)
            out.append(PeerScore(
                name, self._zones.get(name, ""), self.latency_s(name, now),
                peer.latency_s if peer is not None and peer.samples else None,
                peer.outstanding if peer is not None else 0, self.score(name, now),
                peer.requests if peer is not None else 0,
                peer.timeouts if peer is not None else 0))
        return out

    def __len__(self) -> int:
        return len(self._peers)
