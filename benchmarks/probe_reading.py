"""Does a policy read its images? Per task of the synthetic data, on fresh records:

    python benchmarks/probe_reading.py RUN_DIR/final                # 96 fresh records, seed 12345
    python benchmarks/probe_reading.py RUN_DIR/reference --n 48 --tasks colour,bars

- image evidence: the reference solution's negative log-likelihood (teacher-forced, nats per
  solution) with another record's image of the same task in place of its own, minus with its
  own. About 0 means the policy ignores the picture, whatever it writes about it;
- sampled accuracy (G samples per prompt at --temperature) and greedy accuracy, with the
  greedy answers tallied: a policy that cannot see answers every prompt of a task the same.

This is how the built-in run was found blind (its vision tower, trained at the warm-up's
rate, collapsed to a constant: evidence 0.00 nats on every task) and checked the fix.
Everything runs on the CPU in float32; 96 records take about a minute on one core.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from r1vl.data.prompts import PromptEncoder, encode_solution  # noqa: E402
from r1vl.data.records import load_examples  # noqa: E402
from r1vl.data.synthetic import TASKS, write_dataset  # noqa: E402
from r1vl.model.policy import eos_token_ids, load_policy  # noqa: E402
from r1vl.rewards import RewardConfig, score_groups  # noqa: E402
from r1vl.rewards.rules import final_answer  # noqa: E402
from r1vl.sampling.generate import generate  # noqa: E402

PIXELS = 56 * 56  # the built-in run's image size


def solution_nll(model, prompt, target: torch.Tensor, image_token_id: int) -> float:
    """Negative log-likelihood (nats) of `target` (C,) after `prompt`, one plain forward."""
    ids = torch.cat([prompt.ids, target])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, mm_token_type_ids=(ids == image_token_id).long(),
                       pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw).logits[0]
    logp = torch.log_softmax(logits[len(prompt.ids) - 1:-1].float(), -1)
    return -float(logp.gather(-1, target[:, None]).sum())


def probe(policy_dir: str, n: int, tasks: tuple[str, ...], seed: int, samples: int, temperature: float,
          max_new_tokens: int) -> dict[str, dict]:
    """{task: {"evidence", "sampled", "greedy", "answers"}} over n fresh records."""
    if n < 2 * len(tasks):  # the swap needs another record of the same task
        raise ValueError(f"n must give every task two records at least ({2 * len(tasks)}), got {n}")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dataset(tmp, n=n, seed=seed, tasks=tasks)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        examples = load_examples(str(path)).items
        policy = load_policy(policy_dir, torch.float32, torch.device("cpu"), PIXELS, PIXELS)
        model = policy.model.eval()
        merge = model.config.vision_config.spatial_merge_size
        encoder = PromptEncoder(policy.tokenizer, policy.image_processor, merge, PIXELS, PIXELS)
        prompts = [encoder.prompt(e) for e in examples]  # images read now, before tmp goes
    image_token = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    eos = eos_token_ids(policy.tokenizer)
    by_task = collections.defaultdict(lambda: {"evidence": [], "sampled": [], "greedy": [],
                                               "answers": collections.Counter()})
    generator = torch.Generator().manual_seed(seed)
    for i, (example, record, prompt) in enumerate(zip(examples, records, prompts)):
        task = record["task"]
        # The next record of the same task lends its image: same question, another picture.
        j = next(k for k in [*range(i + 1, n), *range(i)] if records[k]["task"] == task)
        swapped = dataclasses.replace(prompt, pixel_values=prompts[j].pixel_values,
                                      image_grid_thw=prompts[j].image_grid_thw)
        target = encode_solution(example.solution, policy.tokenizer)
        by_task[task]["evidence"].append(solution_nll(model, swapped, target, image_token)
                                         - solution_nll(model, prompt, target, image_token))
        for key, g, temp in (("sampled", samples, temperature), ("greedy", 1, 0.0)):
            # temperature -> 0 is argmax up to ties: a tiny temperature stands for greedy.
            out = generate(model, [prompt], g, max_new_tokens, eos, temperature=max(temp, 1e-4),
                           generator=generator, progress=False)
            texts = [policy.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.ids]
            by_task[task][key] += score_groups([texts], [example], RewardConfig(symbolic=False)).accuracy.tolist()
            if key == "greedy":
                by_task[task]["answers"][str(final_answer(texts[0]))] += 1
    mean = lambda values: sum(values) / max(len(values), 1)  # noqa: E731
    return {task: {"records": len(v["evidence"]), "evidence": mean(v["evidence"]), "sampled": mean(v["sampled"]),
                   "greedy": mean(v["greedy"]), "answers": v["answers"].most_common(4)}
            for task, v in by_task.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="a policy directory (RUN_DIR/final, RUN_DIR/reference, a checkpoint's policy/)")
    parser.add_argument("--n", type=int, default=96, help="fresh records, the tasks taking turns")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seed", type=int, default=12345, help="of the fresh records and the sampling")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.2)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    args = parser.parse_args(argv)
    try:
        results = probe(args.policy, args.n, tuple(args.tasks.split(",")), args.seed, args.samples,
                        args.temperature, args.max_new_tokens)
    except ValueError as e:
        parser.error(str(e))
    print(f"| task | records | image evidence (nats) | sampled accuracy (T={args.temperature}) | "
          "greedy accuracy | greedy answers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for task, r in results.items():
        answers = ", ".join(f"{a} x{c}" for a, c in r["answers"])
        print(f"| {task} | {r['records']} | {r['evidence']:+.2f} | {r['sampled']:.3f} | {r['greedy']:.3f} | {answers} |")


if __name__ == "__main__":
    main()
