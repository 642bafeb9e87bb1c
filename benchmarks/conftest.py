"""The loss-kernel benchmark suite (test_bench_*.py; the protocol in _suite.py).

    pytest benchmarks/ --benchmark-only              # every case; the GPU cases skip without a GPU
    pytest benchmarks/ --benchmark-only -k cpu       # small shapes on the CPU
    pytest benchmarks/ -k cpu --benchmark-disable    # each case once, untimed (what CI runs)

Only test_*.py files are collected: the scripts beside them (bench_*.py) are not tests.
"""
import functools

import pytest
import torch
import torch._dynamo.config
from _common import environment
from _suite import Ceilings, summary
from _suite import measure as _measure

# One torch.compile'd TRL loss serves every shape and level of both losses: each is a
# recompile of the same code object, past dynamo's default limit of 8, after which it would
# silently run eager and the "torch_compile" rows would be eager ones.
torch._dynamo.config.recompile_limit = 64


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: a small shape on the CPU (-k cpu or -m cpu)")
    config.addinivalue_line("markers", "cuda: a real shape on a CUDA GPU; skipped without one")


def pytest_benchmark_update_machine_info(config, machine_info):
    env = environment()
    machine_info.update(gpu=env["device"] if torch.cuda.is_available() else None, torch=env["torch"],
                        triton=env["triton"], liger_kernel=env["liger"] or None)


@pytest.hookimpl(wrapper=True)
def pytest_terminal_summary(terminalreporter):
    """After pytest-benchmark's timing tables, even when --benchmark-compare-fail raises."""
    try:
        return (yield)
    finally:
        lines = summary()
        if lines:
            terminalreporter.section("loss kernels: speedup, work rate, share of the ceiling, memory")
            for line in lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def ceilings() -> Ceilings:
    return Ceilings()


@pytest.fixture(scope="session")
def env() -> dict:
    return environment()


@pytest.fixture
def measure(benchmark, request, ceilings, env):
    """measure(pass_, loss_fn, leaves, device, work, restore=None, **fields): see _suite.measure."""
    return functools.partial(_measure, benchmark, request.config, ceilings, env)
