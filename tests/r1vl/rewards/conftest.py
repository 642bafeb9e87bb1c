import pytest

from r1vl.rewards import SymbolicVerifier


@pytest.fixture(scope="session")
def verifier():
    """One pool for all reward tests: starting workers costs seconds on a busy machine.
    A 1 s CPU budget per check: most honest checks use 3-5 ms, but comparing two equation
    systems ('x = 2, y = 1' against 'x=1, y=2', test_answer's table) took 0.26-0.43 s on an
    idle 2-core machine, over the former 0.25 s, and came back undecided; hostile checks
    use all of it."""
    with SymbolicVerifier(num_workers=2, timeout_s=1.0) as v:
        yield v
