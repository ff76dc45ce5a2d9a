import os

import pytest
import torch

from test_pretrain import write_image_folder

# One thread in every process of the suite: README's command runs a worker per core, and most tests launch
# processes of their own; two threads each oversubscribe the cores (1.6x the CPU time: docs/testing.md).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The small labelled image folder (train/ and validation/) that the end-to-end tests train and probe on."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"))


def pytest_configure(config):
    config.addinivalue_line("markers", "may_skip: a test allowed to skip (none is today); any other skip fails")


def unexpected_skips(reporter) -> list:
    return [r.nodeid for r in reporter.stats.get("skipped", []) if "may_skip" not in getattr(r, "keywords", {})]


def pytest_sessionfinish(session):
    """A skip fails the run unless its test is marked may_skip: a pass means every test ran (a missing package
    fails its test, it is not skipped). README's command also prints each skip's reason (-rs)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter and unexpected_skips(reporter) and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if unexpected_skips(terminalreporter):
        terminalreporter.write_line(f"error: unexpected skips fail the run: {unexpected_skips(terminalreporter)}",
                                    red=True)
