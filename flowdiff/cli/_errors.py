"""The command line's own errors: failures reported as one line, with the exit status they end the command with."""

from __future__ import annotations


class CommandError(Exception):
    """A failure at run time to report as one line (exit status 1): a missing or unreadable file, an output that
    exists, a device that is not there, a model that does not fit the input."""

    exit_code = 1


class UsageError(CommandError):
    """Arguments that cannot work together, found after parsing (exit status 2, like argparse's own errors): two
    outputs with one name, an output that is also an input."""

    exit_code = 2


def one_line(err: object) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def say(line: str) -> None:
    """Print ``line`` on stderr in one write. ``print`` writes the text and its newline apart, and under an unbuffered
    stderr (``PYTHONUNBUFFERED=1``) the processes of one torchrun, which share the stream, spliced their lines: rank
    0's error ran on into rank 1's."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()
