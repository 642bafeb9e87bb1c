"""Fixtures for the kernel tests: fresh seeds, small Triton blocks, packed/padded cases.

Every run draws fresh seeds; a failure prints its seed ("seed=..." in the captured output and
the report's properties). To replay it:

    R1VL_TEST_SEED=1234567 python -m pytest tests/kernels/test_grpo_loss.py -k the_failing_case
"""
import os
import random

import pytest
import torch

SEED_ENV = "R1VL_TEST_SEED"


@pytest.fixture
def seed(request):
    """A fresh seed per test run, shown in the test id's report when an assertion fails;
    R1VL_TEST_SEED (an integer) fixes it instead, to replay a failure."""
    given = os.environ.get(SEED_ENV, "").strip()
    if given:
        try:
            value = int(given)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV}={given!r}: expected an integer seed") from None
    else:
        value = random.SystemRandom().randrange(2**31)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Vocabulary blocks of 64 so that the small test vocabularies span several blocks and
    the online logsumexp crosses block boundaries (V is never a multiple of 64 here)."""
    if torch.cuda.is_available():
        yield
        return
    from r1vl_kernels import logits
    monkeypatch.setattr(logits, "MAX_BLOCK_V", 64)
    yield

