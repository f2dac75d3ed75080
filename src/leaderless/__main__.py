"""``python -m leaderless`` is the ``leaderless`` command."""

from leaderless.cli import main

if __name__ == "__main__":
    main()
