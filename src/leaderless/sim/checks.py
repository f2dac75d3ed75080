"""Properties of a simulated cluster that tests and scenarios check.

Cheap checks read incremental summaries (``Recorder.suspects``/``down``, ``live_count``) so a
scenario can poll them often; exact checks compare every node's full view and are meant
for the end of a run at test sizes.
"""

from __future__ import annotations

from leaderless.core.effects import MemberEventKind
from leaderless.core.messages import MemberStatus
from leaderless.sim.cluster import Cluster
from leaderless.sim.node import NodeState

GONE = (MemberStatus.DEAD, MemberStatus.LEFT)


def all_agree(cluster: Cluster) -> bool:
    """Cheap: every running node holds exactly the running nodes alive (none suspect) and
    every crashed node dead, left or unknown."""
    running = [nd for nd in cluster.nodes if nd.state is NodeState.RUNNING]
    crashed = [nd for nd in cluster.nodes if nd.state is NodeState.CRASHED]
    expected = len(running) + sum(1 for nd in cluster.nodes if nd.state is NodeState.PAUSED)
    suspects = cluster.recorder.suspects
    for nd in running:
        m = nd.m()
        if m.live_count() != expected or suspects[nd.index]:
            return False
        for c in crashed:
            member = m.member(c.name)
            if member is not None and member.status not in GONE:
                return False
    return True


def view_of(cluster: Cluster, index: int) -> tuple[tuple[str, MemberStatus], ...]:
    """(name, status) of every member node ``index`` knows, sorted by name."""
    return tuple((m.name, m.status) for m in cluster.nodes[index].m().members())


def view_disagreements(cluster: Cluster) -> list[str]:
    """Exact: running nodes whose view differs from the truth (running alive, crashed
    dead/left/unknown), one line each; empty when every view is right."""
    truth: dict[str, MemberStatus | None] = {}
    for nd in cluster.nodes:
        if nd.state in (NodeState.RUNNING, NodeState.PAUSED):
            truth[nd.name] = MemberStatus.ALIVE
        elif nd.state is NodeState.CRASHED:
            truth[nd.name] = None  # dead, left or forgotten
    problems: list[str] = []
    for nd in cluster.nodes:
        if nd.state is not NodeState.RUNNING:
            continue
        seen = dict(view_of(cluster, nd.index))
        for name, want in truth.items():
            got = seen.get(name)
            ok = (got in GONE or got is None) if want is None else (got == want)
            if not ok:
                expected = "dead, left or unknown" if want is None else want.name
                shown = "unknown" if got is None else got.name
                problems.append(f"{nd.name} sees {name} as {shown}, expected {expected}")
        for name in seen:
            if name not in truth:
                problems.append(f"{nd.name} knows {name}, which never started")
    return problems


def _wrongly(cluster: Cluster, kind: MemberEventKind, since: float) -> int:
    innocent = {nd.name for nd in cluster.nodes if not (nd.ever_crashed or nd.ever_paused)}
    return sum(1 for t, _, k, name, _ in cluster.recorder.member_events
               if k is kind and t >= since and name in innocent)


def false_deaths(cluster: Cluster, since: float = 0.0) -> int:
    """(observer, member) DEAD events about members never crashed or paused."""
    return _wrongly(cluster, MemberEventKind.DEAD, since)


def false_suspicions(cluster: Cluster, since: float = 0.0) -> int:
    """(observer, member) SUSPECT events about members never crashed or paused."""
    return _wrongly(cluster, MemberEventKind.SUSPECT, since)


def trace(cluster: Cluster) -> tuple[object, ...]:
    """Everything observable about a run, for determinism checks."""
    r = cluster.recorder
    return (tuple(r.member_events), tuple(r.user_events), r.digest, r.traffic,
            cluster.clock.events_run)
