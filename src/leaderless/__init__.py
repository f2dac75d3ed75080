"""leaderless: a cluster in which every node is equal."""

__version__ = "0.1.0"
