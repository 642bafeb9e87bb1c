"""Test-wide setup.

Without a GPU the Triton kernels can only run through Triton's interpreter, and triton.jit
reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
imports r1vl_kernels. With TRITON_INTERPRET=1, impl=None picks the Triton path on CPU too,
so the kernels are what the tests exercise.
"""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# load_dataset's Arrow cache (r1vl.data.sources) goes to a temporary directory, not the user's
# home; set before `datasets` is imported (it reads the variable once), inherited by subprocesses.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="r1vl-tests-hf-datasets-"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: long-running; still part of the default run")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: it holds directory names too
            item.add_marker(skip_gpu)
