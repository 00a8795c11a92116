"""The command line's own error: a failure reported as one line, and how a message is made one line."""

from __future__ import annotations


class CommandError(Exception):
    """A failure to report as one line (exit status 1)."""



def one_line(err: object) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__

