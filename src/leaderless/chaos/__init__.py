"""Chaos testing: real node processes under faults (``cluster``), fault schedules
(``nemesis``), recorded histories, workloads and their checkers. See docs/chaos.md."""
