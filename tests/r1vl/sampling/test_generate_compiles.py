"""The compiled decode step's compiles are bounded by its column buckets: rollouts with other
prompt counts and other prompt lengths reuse the graphs (the prompt part's sizes and the batch
are dynamic; only the columns read are static, one graph per bucket)."""
import pytest
import torch
from test_generate import _stop_set, _tiny_prompts
from tiny_qwen_vl import tiny_model

import r1vl.sampling.generate
from r1vl.sampling.generate import column_buckets, generate


@pytest.fixture
def fresh_dynamo():
    def clear():
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        r1vl.sampling.generate._Stepper._compiled.clear()

    clear()
    yield
    clear()


class _CountingBackend:
    """backend "eager" (each captured graph run as it is), counting the compiles."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, graph_module, example_inputs):
        self.compiles += 1
        return graph_module.forward


def test_rollouts_with_other_prompts_compile_once_per_column_bucket(fresh_dynamo):
    model = tiny_model("qwen2_vl", seed=2)
    gen = torch.Generator().manual_seed(3)
    # Four rollouts: 2, 3, 2, 3 prompts, of other lengths each time (text around the image).
    rollouts = [[[2, 5], [7, 1]], [[4, 9], [1, 1], [12, 3]], [[9, 9], [3, 2]], [[1, 2], [2, 20], [6, 6]]]
    lengths = set()
    backend = _CountingBackend()
    max_new = 34
    for text_lens in rollouts:
        prompts = _tiny_prompts(gen, text_lens, "qwen2_vl")
        lengths.add(tuple(p.ids.numel() for p in prompts))
        generate(model, prompts, 2, max_new, _stop_set(model, 2), generator=torch.Generator().manual_seed(0),
                 compile_step=True, compile_backend=backend)
    assert len(lengths) == len(rollouts)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert backend.compiles <= len(column_buckets(max_new)), \
        f"{backend.compiles} compiles over {len(rollouts)} rollouts for {len(column_buckets(max_new))} column buckets"
