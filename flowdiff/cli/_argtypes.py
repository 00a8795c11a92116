"""Argument types and checks shared by the command's parsers and commands: each names what it expected and what
it got, so that every command refuses the same bad value with the same message."""

from __future__ import annotations

import argparse
import math

import torch

from ..engine._checks import check_seed
from ._errors import CommandError

#: The most images one ``flowdiff sample`` draws (they are one batch and one PNG grid): past it a count is a typing
#: mistake that would allocate until the kernel kills the process.
MAX_IMAGES = 100_000


def int_at_least(text: str, low: int, what: str) -> int:
    """An integer option's value, ``low`` or more; otherwise an argparse error saying ``what`` is expected."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return int_at_least(text, 1, "a positive integer")


def image_count(text: str) -> int:
    """A positive number of images, at most :data:`MAX_IMAGES`."""
    value = positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to {MAX_IMAGES:,}, got {value:,}")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """A seed ``torch.Generator.manual_seed`` takes (:func:`flowdiff.engine._checks.check_seed`)."""
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64 - 1], got {text!r}") from None


def device_name(text: str) -> str:
    """A torch device's spelling, or ``auto`` (the GPU when torch sees one, else the CPU); whether this
    machine has it is :func:`available_device`'s question."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:0, mps)") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(f"{text!r} holds shapes but no values, so nothing can run on it; give a "
                                         "device with memory (e.g. cpu, cuda, cuda:0, mps)")
    return text


def available_device(name: str) -> torch.device:
    """The device ``--device name`` on this machine: every command checks it here, before it loads anything, so
    that a missing CUDA or MPS is one line (exit status 1), not an ``AssertionError`` from deep inside torch."""
    device = torch.device(name)  # the parser has checked the spelling
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name!r}: CUDA is not available in this torch build or on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name!r}: MPS is not available on this machine")
    return device
