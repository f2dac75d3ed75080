"""Runtime counters, shaped for metrics: a name ending in ``_total`` and a ``kind`` label."""

from __future__ import annotations

from collections import Counter


class RuntimeCounters:
    """What the I/O layer dropped or failed at, by kind. Monotonic; never reset.

    ``dropped_malformed_total``: input from the network that failed to decode or validate
    (kinds: ``udp_packet``, ``udp_oversized``, ``tcp_frame``, ``tcp_unexpected``,
    ``peer_frame``; and gossip datagrams refused by the keyring, by reason:
    ``gossip_unknown_key`` (sealed under a key not installed here), ``gossip_auth_failed``
    (tampered or forged), ``gossip_not_sealed`` (plaintext while a keyring is set),
    ``gossip_truncated``, ``gossip_sealed`` (sealed, but this node has no keyring); the
    same reasons for membership syncs as ``sync_*``; TLS refusals ``tls_handshake``,
    ``tls_record``, ``tls_identity``, ``tls_peer``; ``tcp_partial_frame``: a frame trickled
    past its deadline).
    ``dropped_overload_total``: messages we chose to drop because a bound was reached
    (kinds: ``udp_peer_queue``, ``udp_send_buffer``, ``push_pull_in_flight``,
    ``tcp_connections``, ``watch_slow_reader``, ``tcp_slow_reader``, ``peer_buffer_full``,
    and per-address caps ``*_per_client`` with ``client_partial_frame`` on each port).
    ``send_errors_total``: sends the operating system refused (kinds: ``udp``,
    ``udp_address``, ``push_pull``, ``peer_connect``).
    ``gossip_packets_total`` / ``gossip_bytes_total``: UDP datagrams (probes, acks and the
    gossip riding on them) and their bytes (kinds: ``sent``, ``received``).
    """

    def __init__(self) -> None:
        self.dropped_malformed_total: Counter[str] = Counter()
        self.dropped_overload_total: Counter[str] = Counter()
        self.send_errors_total: Counter[str] = Counter()
        self.gossip_packets_total: Counter[str] = Counter()
        self.gossip_bytes_total: Counter[str] = Counter()

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "dropped_malformed_total": dict(self.dropped_malformed_total),
            "dropped_overload_total": dict(self.dropped_overload_total),
            "send_errors_total": dict(self.send_errors_total),
            "gossip_packets_total": dict(self.gossip_packets_total),
            "gossip_bytes_total": dict(self.gossip_bytes_total),
        }
