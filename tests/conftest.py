import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=300, deadline=None)

#: the devices a ``device``-parametrised test runs on; CUDA ones are skipped where it is not available
DEVICES = ("cpu", "cuda")
#: ``--device`` / ``FLOWDIFF_TEST_DEVICE``: "all" runs every test (CUDA variants skip without a GPU); "cpu" drops
#: the CUDA variants; "cuda" keeps only the CUDA variants, and fails them, instead of skipping, without a GPU
DEVICE_CHOICES = ("all", *DEVICES)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the long profiles (more examples, bigger grids)")
    parser.addoption("--device", choices=DEVICE_CHOICES, default=None,
                     help="which device-parametrised variants to run: all (default; CUDA skipped without a GPU), "
                          "cpu, or cuda (only the CUDA variants, failing without a GPU); default from "
                          "$FLOWDIFF_TEST_DEVICE")


def _device_choice(config) -> str:
    choice = config.getoption("--device") or os.environ.get("FLOWDIFF_TEST_DEVICE") or "all"
    if choice not in DEVICE_CHOICES:
        raise pytest.UsageError(f"FLOWDIFF_TEST_DEVICE must be one of {', '.join(DEVICE_CHOICES)}, got {choice!r}")
    return choice


def pytest_configure(config):
    settings.load_profile("long" if config.getoption("--slow") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    # One intra-op thread: the models in the tests are tiny, and on a shared 2-core machine a second
    # thread makes them many times slower, not faster.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "cuda: a test variant that runs on a CUDA device (the `device` fixture's)")


def pytest_collection_modifyitems(config, items):
    choice = _device_choice(config)
    if choice != "all":
        keep, drop = [], []
        for item in items:
            on_cuda = item.get_closest_marker("cuda") is not None
            (keep if on_cuda == (choice == "cuda") else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long profile: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES])
def device(request) -> torch.device:
    """The device a test runs on: ``cpu`` always, ``cuda`` where ``torch.cuda.is_available()``.

    Without a GPU the CUDA variant is skipped, with the reason; under ``--device cuda`` (or
    ``FLOWDIFF_TEST_DEVICE=cuda``) it fails instead, so that a GPU check cannot pass by skipping."""
    if request.param == "cuda" and not torch.cuda.is_available():
        reason = f"CUDA is not available (torch {torch.__version__}, torch.cuda.is_available() is False)"
        if _device_choice(request.config) == "cuda":
            pytest.fail(f"--device cuda was asked for, but {reason}")
        pytest.skip(reason)
    return torch.device(request.param)
