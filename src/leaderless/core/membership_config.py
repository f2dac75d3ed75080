"""Every timing and bound of the membership protocol, with its default and why.

Defaults are tuned for a LAN (sub-millisecond round trips). Where a value scales with the
cluster size n, the formula is a method here, so the protocol, the simulator and the docs
(docs/configuration.md) all use the same one.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MembershipConfig:
    probe_interval_s: float = 0.4
    """One member is probed per interval. 0.4 s puts median detection near 2 s at n <= 10
    (0.5 s measured ~3 s) for two small datagrams per node per interval, independent of n."""
    probe_timeout_s: float = 0.2
    """Wait this long for a direct ack before asking others. A LAN round trip is well under
    1 ms; 200 ms absorbs a busy Python event loop. Scaled up by local health."""
    indirect_checks: int = 3
    """k: members asked to probe a silent member before we suspect it (SWIM's k)."""
    suspicion_mult: float = 3.0
    """Minimum suspicion timeout = suspicion_mult * max(1, log10(n)) * probe_interval_s."""
    suspicion_max_mult: float = 4.0
    """Maximum suspicion timeout = suspicion_max_mult * the minimum; used while no other
    member has confirmed the suspicion (Lifeguard)."""
    suspicion_confirmations: int = 3
    """Independent confirmations that shrink the timeout from its maximum to its minimum
    (Lifeguard's K), capped at n - 2 since only that many members can confirm."""
    awareness_max: int = 8
    """Local health multiplier ceiling: probe interval and timeout scale by (1 + health)."""
    retransmit_mult: float = 4.0
    """λ: each update is sent about retransmit_mult * ceil(log10(n + 1)) times."""
    gossip_interval_s: float = 0.2
    """Pending updates are pushed to gossip_nodes random members this often, on top of
    riding on probes; 0.2 s: full dissemination at 10,000 simulated nodes in 0.45 s."""
    gossip_nodes: int = 3
    gossip_to_dead_s: float = 30.0
    """Keep gossiping to a member this long after it was declared dead, so a member that
    was wrongly declared dead hears it and refutes."""
    push_pull_interval_s: float = 30.0
    """Full-state sync with one random member; scaled linearly above 32 members so the
    bytes it costs per node per second stay flat as n grows."""
    reconnect_interval_s: float = 15.0
    """Try a full-state sync with a random dead member this often: heals partitions that
    outlasted gossip_to_dead_s."""
    dead_retention_s: float = 3600.0
    """Dead and left members are forgotten (reaped) after this long."""
    broadcast_queue_max: int = 8192
    """Pending updates kept for retransmission; beyond it the most-sent ones are dropped
    (push-pull still heals what they would have carried)."""
    packet_bytes_max: int = 1400
    event_buffer: int = 512
    """User events remembered for de-duplication; older ones are rejected as too old."""
    join_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        checks = [
            (self.probe_interval_s > 0, "probe_interval_s must be > 0"),
            (0 < self.probe_timeout_s < self.probe_interval_s,
             "probe_timeout_s must be > 0 and < probe_interval_s"),
            (self.indirect_checks >= 0, "indirect_checks must be >= 0"),
            (self.suspicion_mult > 0, "suspicion_mult must be > 0"),
            (self.suspicion_max_mult >= 1, "suspicion_max_mult must be >= 1"),
            (self.suspicion_confirmations >= 0, "suspicion_confirmations must be >= 0"),
            (self.awareness_max >= 0, "awareness_max must be >= 0"),
            (self.retransmit_mult > 0, "retransmit_mult must be > 0"),
            (self.gossip_interval_s > 0, "gossip_interval_s must be > 0"),
            (self.gossip_nodes >= 1, "gossip_nodes must be >= 1"),
            (self.gossip_to_dead_s >= 0, "gossip_to_dead_s must be >= 0"),
            (self.push_pull_interval_s > 0, "push_pull_interval_s must be > 0"),
            (self.join_timeout_s > 0, "join_timeout_s must be > 0"),
            (self.reconnect_interval_s > 0, "reconnect_interval_s must be > 0"),
            (self.dead_retention_s > 0, "dead_retention_s must be > 0"),
            (self.broadcast_queue_max >= 16, "broadcast_queue_max must be >= 16"),
            (600 <= self.packet_bytes_max <= 1400, "packet_bytes_max must be in 600..1400"),
            (self.event_buffer >= 16, "event_buffer must be >= 16"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def retransmit_limit(self, n: int) -> int:
        """λ·log(n+1): enough sends that every member hears an update w.h.p."""
        return max(1, math.ceil(self.retransmit_mult * math.ceil(math.log10(n + 1))))

    def suspicion_min_s(self, n: int) -> float:
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval_s

    def suspicion_max_s(self, n: int) -> float:
        return self.suspicion_max_mult * self.suspicion_min_s(n)

    def expected_confirmations(self, n: int) -> int:
        return max(0, min(self.suspicion_confirmations, n - 2))

    def push_pull_period_s(self, n: int) -> float:
        return self.push_pull_interval_s * max(1.0, n / 32)
