"""Regression: the loss called in a process that imports transformers after r1vl_kernels.

With torch 2.13, calls through the custom ops' CustomOpDef objects crashed in about one
process in three in this situation (std::bad_alloc in the dispatcher's argument parsing);
r1vl_kernels calls its ops through torch.ops, which did not. Fresh processes, since the
crash depended on the process's memory layout.
"""
import subprocess
import sys

SCRIPT = """
import torch
from r1vl_kernels import grpo_loss, token_logprobs
import transformers
from transformers import Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
x = torch.randn(10, 31, requires_grad=True)
t = torch.randint(0, 31, (10,))
cu = torch.tensor([0, 4, 10], dtype=torch.int32)
for _ in range(20):
    grpo_loss(x, t, cu, torch.randn(2), impl="torch").loss.backward()
    token_logprobs(x, t, impl="torch")
print("ok")
"""


def test_loss_survives_a_later_transformers_import():
    for _ in range(4):
        result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
