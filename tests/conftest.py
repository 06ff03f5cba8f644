import os
import random

import pytest
import torch

# Fresh random inputs every session, reproducible: LOOPLM_TEST_SEED=<seed> replays a run.
SEED = int(os.environ.get("LOOPLM_TEST_SEED") or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    return f"LOOPLM_TEST_SEED={SEED}"


def pytest_terminal_summary(terminalreporter):
    """The seed again at the end (-q hides the header): rerun a failure with it."""
    terminalreporter.write_line(f"LOOPLM_TEST_SEED={SEED} (set it to replay this run's random inputs)")


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws from its own stream: the session seed plus the test's id, so a failure
    replays alone with the printed LOOPLM_TEST_SEED, whatever ran before it."""
    seed = SEED + sum(i * ord(c) for i, c in enumerate(request.node.nodeid, 1))
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for every test: the tiny test models run faster on one thread, and on a
    small machine shared with other jobs two OpenMP threads waiting on each other are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
