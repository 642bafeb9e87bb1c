"""A demonstration of the fused GRPO loss on CPU: `make run` (python -m r1vl.demo).

1. The Triton kernels (through Triton's interpreter) and the eager torch path compute the
   same loss and gradient on one packed batch of uneven sequences.
2. A toy policy, a table of logits per position, learns by GRPO with that loss alone: G
   completions per prompt are sampled, rewarded for how many of their tokens hit a target
   token, normalized within their group, and the policy is updated. The mean reward rises.
The trainer (train.py) replaces this with StepGRPO on Qwen2-VL.
"""
import os
import time

import torch

from r1vl_kernels import grpo_loss

VOCAB, LENGTH, GROUP, PROMPTS, GOOD_TOKEN = 50, 12, 4, 8, 7


def compare_implementations(seed: int = 0) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernels are first defined
    g = torch.Generator().manual_seed(seed)
    lens = [1, 9, 4, 17, 6, 3]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    N, V = sum(lens), 301
    logits = torch.randn(N, V, generator=g) * 2
    target = torch.randint(0, V, (N,), generator=g)
    rewards = torch.tensor([1.0, 0.0, 2.1, 0.5, 1.1, 1.1])
    ref = torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1) + 0.1
    print(f"1. one packed batch: {len(lens)} sequences of lengths {lens}, V={V}, beta=0.04, G=3")
    results = {}
    for impl in ("torch", "triton"):
        leaf = logits.clone().requires_grad_()
        t0 = time.perf_counter()
        out = grpo_loss(leaf, target, cu, rewards=rewards, group_size=3, ref_logp=ref, beta=0.04, impl=impl)
        out.loss.backward()
        results[impl] = (out.loss.item(), leaf.grad)
        print(f"   {impl:>6}: loss {out.loss.item():+.6f}  |dlogits| {leaf.grad.norm():.6f}"
              f"  ({(time.perf_counter() - t0) * 1e3:.0f} ms{', interpreted' if impl == 'triton' else ''})")
    diff = (results["torch"][1] - results["triton"][1]).abs().max().item()
    print(f"   largest dlogits difference between the two: {diff:.2e}")


def train_toy_policy(steps: int = 40, seed: int = 0) -> None:
    torch.manual_seed(seed)
    table = torch.zeros(LENGTH, VOCAB, requires_grad=True)  # the policy: logits per position
    optimizer = torch.optim.Adam([table], lr=0.1)
    S = PROMPTS * GROUP
    cu = torch.arange(0, S * LENGTH + 1, LENGTH, dtype=torch.int32)
    print(f"\n2. toy policy: {PROMPTS} prompts x G={GROUP} completions of {LENGTH} tokens over "
          f"{VOCAB} tokens; reward = share of tokens equal to {GOOD_TOKEN}")
    for step in range(steps + 1):
        with torch.no_grad():
            completions = torch.distributions.Categorical(logits=table.expand(S, -1, -1)).sample()
        rewards = (completions == GOOD_TOKEN).float().mean(1)
        if step % 10 == 0:
            print(f"   step {step:3d}: mean reward {rewards.mean():.3f}")
        if step == steps:
            break
        logits = table.expand(S, -1, -1).reshape(S * LENGTH, VOCAB)
        # impl="torch": part 1 switched the interpreter on, which would make impl=None pick
        # the (slow, interpreted) Triton path on this CPU.
        impl = "triton" if torch.cuda.is_available() else "torch"
        out = grpo_loss(logits, completions.reshape(-1), cu, rewards=rewards, group_size=GROUP, impl=impl)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


def main() -> None:
    compare_implementations()
    train_toy_policy()


if __name__ == "__main__":
    main()
