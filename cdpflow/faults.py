"""Named fault points: where the crash tests kill a command, to prove a crash there loses nothing.

`CDPFLOW_FAULT=<point>` makes the process exit at once (status 70, no clean-up, as a kill would)
when it reaches that point. Points: `before-commit` (the pipeline finished, nothing written),
`after-commit` (tables and outbox committed, nothing published), `after-deliver` (the changes
reached their destination, not yet marked published). Unset, a point costs one lookup.
"""
import os

FAULT_ENV = "CDPFLOW_FAULT"
EXIT_STATUS = 70


def fault_point(name: str) -> None:
    """Exits the process here if `CDPFLOW_FAULT` names this point."""
    if os.environ.get(FAULT_ENV) == name:
        os._exit(EXIT_STATUS)
