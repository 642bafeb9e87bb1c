"""The torchrun side of test_grpo: one StepGRPO update (r1vl.update.grpo.grpo_update) on two ranks,
plain data parallelism, ZeRO-2 and ZeRO-3, with fixed non-zero rewards.

    torchrun --nproc_per_node 2 tests/r1vl/update/grpo_worker.py OUT_DIR

Rank 0 holds three prompts of G=2 completions in two micro-batches, rank 1 one prompt in one
micro-batch (so ZeRO pads it with an idle batch, engine.lockstep). The KL reference is a perturbed
copy of the policy, so that the KL term has a gradient. Rank 0 writes, per run, the gradient
norm the engine reports and the weights after the update; for plain data parallelism also
the summed gradient itself (read by an optimizer pre-step hook); and the float64 full-batch
gradient of grpo_reference, computed in this one process from every rank's sequences.
"""
import copy
import json
import sys
from pathlib import Path

import torch
from gathered_state import full_state
from grpo_reference import full_batch_gradient, group_advantages

from r1vl import distributed
from r1vl.config import make_config
from r1vl.data.prompts import blank_prompt
from r1vl.rewards.advantages import step_advantages
from r1vl.tiny import build_model, build_tokenizer
from r1vl.update.choose_engine import make_engine
from r1vl.update.grpo import grpo_update
from r1vl.update.microbatches import Batch, MicroBatch
from r1vl.update.packing import Sequence, pack

G = 2
REWARDS = {0: [1.0, 0.0, 0.3, 1.2, 2.1, 0.4], 1: [0.0, 1.1]}  # per rank, prompt-major
PLAN = {0: [[0, 1, 2, 3], [4, 5]], 1: [[0, 1]]}  # micro-batches per rank
RUNS = [("plain", "grpo"), ("plain", "dapo"), ("zero2", "grpo"), ("zero3", "dapo")]
LR, TEMPERATURE, BETA = 1e-3, 0.9, 0.1
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def rank_sequences(rank: int, prompt, vocab: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(100 + rank)
    return [Sequence(prompt.ids, torch.randint(10, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g),
                   prompt.pixel_values, prompt.image_grid_thw) for _ in REWARDS[rank]]


def setup():
    """(policy, KL reference model, {rank: sequences}, idle sequence): the same in every process."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(["How many shapes are there? Three red circles."] * 4, vocab_size=300)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    prompt = blank_prompt(tokenizer, Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=3136), 2, 3136)
    initial = build_model(tokenizer, seed=0, tie_word_embeddings=True)  # lm_head is the embedding, as in 2B
    ref_model = copy.deepcopy(initial)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ref_model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    sequences = {r: rank_sequences(r, prompt, len(tokenizer)) for r in REWARDS}
    idle = Sequence(prompt.ids, prompt.ids[-1:], prompt.pixel_values, prompt.image_grid_thw)
    return initial, ref_model, sequences, idle


def capture_gradients(engine, model) -> dict:
    """{name: gradient} filled by PlainEngine's optimizer right before it steps: the summed
    gradient the update applies (on a bf16 model, the fp32 gradient of the parameter's master)."""
    grads, names = {}, {id(p): n for n, p in model.named_parameters()}
    names.update({id(m): n for n, m in getattr(engine, "masters", {}).items()})  # bf16 weights' fp32 masters
    engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
        {names[id(p)]: p.grad.detach().clone() for group in opt.param_groups for p in group["params"]}))
    return grads


def reference_gradient(initial, ref_model, sequences: dict, loss_type: str) -> dict:
    everything = [s for r in sorted(sequences) for s in sequences[r]]
    advantages = [a for r in sorted(sequences) for a in group_advantages(REWARDS[r], G)]
    return full_batch_gradient(initial, ref_model, everything, advantages, temperature=TEMPERATURE, beta=BETA,
                               loss_type=loss_type)


def main(out_dir: Path) -> None:
    world = distributed.init("cpu")
    initial, ref_model, sequences, idle = setup()
    mine = sequences[world.rank]
    out = {"initial": full_state(initial), "lr": LR}

    for kind, loss_type in RUNS:
        cfg = make_config(model="tiny", deepspeed="" if kind == "plain" else str(CONFIGS / f"{kind}.json"),
                          lr=LR, max_grad_norm=0.0, dtype="float32", device="cpu", loss_type=loss_type,
                          temperature=TEMPERATURE, beta=BETA, num_iterations=1, max_completion_length=8)
        model = copy.deepcopy(initial)
        engine = make_engine(model, cfg.optimizer, LR, 1, world, idle)
        distributed.broadcast_parameters(model)
        reference = engine.reference(copy.deepcopy(ref_model))
        grads = capture_gradients(engine, model) if kind == "plain" else {}
        advantages = step_advantages(torch.tensor(REWARDS[world.rank]), G, "group",
                                     lambda values: distributed.all_reduce_sum(values, world.device))
        micro = [MicroBatch(idx, pack([mine[i] for i in idx], model).to(world.device), advantages[idx])
                 for idx in PLAN[world.rank]]
        update = grpo_update(engine, reference, Batch(mine, micro, 0), cfg.objective, cfg.sampling, "torch", world)
        out[f"{kind}-{loss_type}"] = {"grad_norm": update["grad_norm"], "sequences": update["sequences"],
                                      "tokens": update["tokens"], "after": full_state(model), "grads": grads}
        engine.close()
        reference.close()

    if world.is_main:
        for loss_type in ("grpo", "dapo"):
            out[f"reference-{loss_type}"] = reference_gradient(initial, ref_model, sequences, loss_type)
        torch.save(out, out_dir / "grpo_step.pt")
        (out_dir / "done.json").write_text(json.dumps({"runs": [f"{k}-{t}" for k, t in RUNS]}))
    distributed.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
