"""The compiled decode step writes one KV column in place: inductor's code for it allocates no
buffer the size of the completion cache (an out-of-place write of a view of the cache becomes
a copy of the whole cache, scattered back and copied into the input, at every token)."""
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from r1vl.sampling.decode import decode_step

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from bench_decode_step import tiny_step_inputs  # noqa: E402


def _buffers(code: str) -> list[tuple[int, ...]]:
    """The sizes of the buffers inductor's generated code allocates."""
    return [tuple(int(x) for x in re.findall(r"\d+", m)) for m in re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", code)]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_writes_the_kv_column_in_place(fresh_dynamo):
    rows, capacity = 8, 64
    _, args = tiny_step_inputs(rows, capacity, prompts=2)
    comp_k = args[10]
    one_layer = math.prod(comp_k.shape[1:])  # (B, Hkv, C, D): one layer's completion part
    before_k, before_v = comp_k.clone(), args[11].clone()
    step = torch.compile(decode_step, backend="inductor", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(specialize_int=True):
        logits, codes = run_and_get_code(step, *args)
    code = "\n".join(codes)
    sizes = _buffers(code)
    assert sizes, "no buffers found: inductor's code format changed"
    big = [s for s in sizes if math.prod(s) >= one_layer]
    assert not big, f"cache-sized buffers {big} (cache {tuple(comp_k.shape)}): the step copies the cache"
    # ... and it does write the column: column 3 of every layer changed, nothing else.
    for after, before in ((comp_k, before_k), (args[11], before_v)):
        changed = (after != before).any(dim=(0, 1, 2, 4))
        assert changed.nonzero()[:, 0].tolist() == [3]
    eager = decode_step(*args[:3], 3, *args[4:])
    torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)
