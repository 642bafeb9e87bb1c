import pytest

from r1vl.rewards import SymbolicVerifier


@pytest.fixture(scope="session")
def verifier():
    """One pool for all reward tests: starting workers costs seconds on a busy machine.
    A 0.25 s CPU budget per check: honest checks use 3-5 ms, hostile ones all of it."""
    with SymbolicVerifier(num_workers=2, timeout_s=0.25) as v:
        yield v
