"""Fixtures for the kernel tests: fresh seeds, small Triton blocks, packed/padded cases."""
import random

import pytest
import torch


@pytest.fixture
def seed(request):
    """A fresh seed per test run, shown in the test id's report when an assertion fails."""
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
    from r1vl_kernels import _triton_vocab
    monkeypatch.setattr(_triton_vocab, "MAX_BLOCK_V", 64)
    yield

