# SPDX-License-Identifier: Apache-2.0
# Runs before anything imports kvkern: Triton fixes interpreter mode when a kernel
# is defined, so TRITON_INTERPRET must be set first on machines without a GPU.
import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kvkern  # noqa: E402,F401

# Fresh random inputs every run; KVKERN_TEST_SEED=<n> replays a run.
SEED = int(os.environ.get("KVKERN_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"kvkern {kvkern.__version__}; test seed {SEED} (replay with KVKERN_TEST_SEED={SEED}); " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(autouse=True)
def _seed(request):
    # One seed per test, derived from the run seed and the test id, so a failing
    # test replays alone with the same inputs.
    torch.manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31)
    yield


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
