import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=300, deadline=None)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="run the long profiles (more examples, bigger grids)")


def pytest_configure(config):
    settings.load_profile("long" if config.getoption("--slow") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    # One intra-op thread: the models in the tests are tiny, and on a shared 2-core machine a second
    # thread makes them many times slower, not faster.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long profile: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
