"""What a user sees when something goes wrong: one line, and an exit code that says what kind.

Every problem that is the user's to fix is a `UserError` (the modules' own kinds derive from it);
the command line prints it as `Error: <line>` and exits with EXIT_INPUT, never with a traceback.
"""
from __future__ import annotations

from typing import Sequence

# The exit codes of every command (README: "Exit codes").
EXIT_OK = 0
EXIT_INPUT = 1        # a problem with input, data, files or devices
EXIT_USAGE = 2        # bad usage: an unknown option or command, a bad value of an option
EXIT_NONFINITE = 3    # the loss became NaN/Inf
EXIT_SIGINT = 130     # stopped by Ctrl-C (after saving)
EXIT_SIGTERM = 143    # stopped by SIGTERM (after saving)


class UserError(Exception):
    """A one-line, user-facing problem (exit EXIT_INPUT)."""


_NOISE = ("Traceback", "File ", "[bt]", "Stack trace")
_PREFIXES = ("MXNetError: ", "LocalFileSystem: ")


def mxnet_error_reason(exc: BaseException, prefer: Sequence[str] = ()) -> str:
    """The useful line of an exception's text. MXNet's carry a C++ 'Traceback' header and frames
    before the message on the last line, which may start with the C++ check that failed
    ("Check failed: a == b: the message"). `prefer`: words that make an earlier line the better
    one (a shape mismatch named in the middle of the text)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(_NOISE)]
    if not lines:
        return type(exc).__name__
    preferred = [ln for ln in lines if any(w in ln.lower() for w in prefer)]
    reason = (preferred or lines)[0 if preferred else -1]
    for prefix in _PREFIXES:
        if reason.startswith(prefix):
            reason = reason[len(prefix):]
    if reason.startswith("Check failed:"):
        reason = reason.rsplit(": ", 1)[-1]  # drop the C++ condition, keep the message
    return reason


class CheckpointError(UserError):
    """A run folder, checkpoint or optimizer state file that cannot be used as it is."""
