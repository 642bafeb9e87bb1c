"""The torchrun side of test_deepspeed_engine: the same GRPO updates through PlainEngine,
ZeRO-2 and ZeRO-3, written to a JSON file for the test to compare.

    torchrun --nproc_per_node 2 tests/r1vl/update/deepspeed_worker.py OUT_DIR [FAMILY]

Each engine trains a fresh copy of one tiny Qwen2-VL (or Qwen3-VL with FAMILY=qwen3_vl; same
seed; lm_head tied to the input embedding, as in Qwen2-VL-2B and the small Qwen3-VL models, the
untied case being train.py's built-in model) for STEPS
optimizer steps on random completions after blank images, with random advantages and a KL
term to the engine's frozen copy, so that the fused loss's lm_head gradient, the reference
and the sum over ranks all matter. Rank 0 has more micro-batches than rank 1, and none at all in one step: ZeRO
needs the ranks in lockstep (engine.lockstep). Before each step a rollout runs inside
engine.gathered() with a different number of decode steps per rank. After step RESUME_AT the
policy's weights and engine state are saved; a fresh model and engine load them and repeat
the last steps, which must give the same numbers. The final weights go to KIND_final.pt.
"""
import copy
import json
import sys
from pathlib import Path

import torch
from gathered_state import full_state

from r1vl import distributed
from r1vl.config import make_config
from r1vl.data.prompts import blank_prompt
from r1vl.sampling.generate import generate
from r1vl.tiny import PATCH_SIZE, build_model, build_tokenizer
from r1vl.update.choose_engine import make_engine
from r1vl.update.losses import completion_logprobs, policy_loss
from r1vl.update.packing import Sequence, pack

STEPS, RESUME_AT = 4, 2
MICROBATCHES = {0: [2, 3, 2, 2], 1: [1, 0, 1, 2]}  # per rank, per step; rank 1 idles in step 2
TEMPERATURE, BETA = 1.0, 0.1
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def make_batches(step: int, rank: int, prompt, vocab: int, device) -> list:
    """[(indices, PackedBatch)]: two sequences per micro-batch, random completions."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank)
    micro = []
    for k in range(MICROBATCHES[rank][step]):
        sequences = [Sequence(prompt.ids, torch.randint(10, vocab, (int(torch.randint(3, 9, (1,), generator=g)),),
                                                     generator=g), prompt.pixel_values, prompt.image_grid_thw)
                   for _ in range(2)]
        micro.append(([2 * k, 2 * k + 1], sequences))
    return micro


def run_steps(engine, reference, model, steps, prompt, tokenizer, world) -> list[dict]:
    records = []
    for step in steps:
        with engine.gathered():  # ranks decode different numbers of tokens: no collective may run here
            generate(model, [prompt], 2, 3 + 5 * world.rank, [tokenizer.convert_tokens_to_ids("<|im_end|>")],
                     generator=torch.Generator().manual_seed(step))
        micro = [(idx, pack(s, model).to(world.device))
                 for idx, s in make_batches(step, world.rank, prompt, len(tokenizer), world.device)]
        total = sum(MICROBATCHES[r][step] for r in MICROBATCHES)
        work = engine.lockstep(micro)
        ref = [reference.forward(completion_logprobs, pb, TEMPERATURE, "torch") for _, pb in work]
        engine.train()
        loss_sum = 0.0
        for k, (idx, pb) in enumerate(work):
            g = torch.Generator().manual_seed(7 * step + 3 * world.rank + k)
            adv = torch.zeros(pb.num_sequences) if idx is None else torch.randn(pb.num_sequences, generator=g)
            out = engine.forward(policy_loss, pb, adv, None, ref[k], impl="torch", temperature=TEMPERATURE,
                                 beta=BETA, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                                 max_completion_length=16)
            loss = out.loss * (0.0 if idx is None else 1.0 / total)
            engine.backward(loss)
            loss_sum += float(loss)
        grad_norm = engine.step(True)
        engine.eval()
        records.append({"step": step, "loss": distributed.all_reduce_sum([loss_sum], world.device)[0],
                        "grad_norm": grad_norm, "lr": engine.lr,
                        "digests": distributed.weight_digests(model)})
    return records


def main(out_dir: Path, family: str) -> None:
    world = distributed.init("cpu")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(["How many shapes are there? Three red circles."] * 4, vocab_size=300)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=4096, patch_size=PATCH_SIZE[family])
    prompt = blank_prompt(tokenizer, processor, 2, 3136)
    # lm_head is the embedding, as in Qwen2-VL-2B and Qwen3-VL-2B / 4B
    initial = build_model(tokenizer, seed=0, tie_word_embeddings=True, family=family)
    results = {}
    for kind in ("plain", "zero2", "zero3"):
        deepspeed = "" if kind == "plain" else str(CONFIGS / f"{kind}.json")
        cfg = make_config(model="tiny", deepspeed=deepspeed, lr=1e-3, warmup_steps=1, lr_schedule="linear",
                          max_grad_norm=1.0, dtype="float32", device="cpu")
        model = copy.deepcopy(initial)
        idle = Sequence(prompt.ids, prompt.ids[-1:], prompt.pixel_values, prompt.image_grid_thw)
        engine = make_engine(model, cfg.optimizer, cfg.optimizer.lr, STEPS, world, idle)
        distributed.broadcast_parameters(model)  # sharded under ZeRO-3: gathered, rank 0's written back
        reference = engine.reference()
        records = run_steps(engine, reference, model, range(RESUME_AT), prompt, tokenizer, world)
        saved = out_dir / kind
        if world.is_main:
            saved.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        weights = full_state(model)
        engine.save_state(saved)
        distributed.barrier()
        records += run_steps(engine, reference, model, range(RESUME_AT, STEPS), prompt, tokenizer, world)
        final = full_state(model)
        if world.is_main:
            torch.save(final, out_dir / f"{kind}_final.pt")
        engine.close()

        # Resume: a fresh model with the saved weights, a fresh engine with the saved state,
        # the same frozen reference (the reference is not part of the engine's state).
        resumed = copy.deepcopy(initial)
        resumed.load_state_dict(weights)
        engine = make_engine(resumed, cfg.optimizer, cfg.optimizer.lr, STEPS, world, idle)
        engine.load_state(saved)
        again = run_steps(engine, reference, resumed, range(RESUME_AT, STEPS), prompt, tokenizer, world)
        engine.close()
        reference.close()
        results[kind] = {"records": records, "resumed": again}
    if world.is_main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    distributed.destroy()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "qwen2_vl")
