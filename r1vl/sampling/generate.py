"""The sampler: G completions per prompt, each prompt's image and KV held once, only live
sequences decoded.

    prefill   all prompts in one packed forward (r1vl.sampling.decode.prefill): each image through the
              vision tower once, each prompt's keys/values written once into the RolloutCache
    sample    token 0 of every completion from its prompt's last logits (r1vl.sampling.draw)
    decode    one token per live row per step (r1vl.sampling.decode.decode_step), keys/values written in
              place, attention over the shared prompt part and the row's own part
    compact   once 1/32 of the batch (at least one row) has stopped, those rows leave it: the
              live rows past the new end move into their cache rows; prompts whose G
              completions all stopped leave the prefix part. Decode work follows the live
              sequences

A sequence stops at an EOS token (kept as its last completion token, so that the policy
learns to stop) or at max_new_tokens. Positions follow Qwen2-VL's M-RoPE: the prompt takes
the model's own rope index, the k-th sampled token sits at P + k + delta on all three axes.

On a GPU the decode step is compiled (torch.compile, CUDA graphs): the batch is then padded
to a few bucket sizes, and the completion columns read are rounded up to a power of two and
masked past the current one, so that shapes repeat; the cache and the joined weights reach
the graphs at static addresses, read in place. On a CPU it runs eagerly by default:
inductor's compile of the step costs more on a CPU than the built-in run's rollouts take in
all.

The tests' oracle (tests/r1vl/sampling/reference_sampler.py: plain transformers forwards with a
growing DynamicCache) is independent of this module.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch

from r1vl.data.prompts import Prompt
from r1vl.model.lora import adapters_enabled, merged_adapters
from r1vl.progress import progress_bar
from r1vl.sampling.decode import decode_step, fuse_layers, language_model, prefill, prompt_positions
from r1vl.sampling.draw import sample_tokens
from r1vl.sampling.kv_cache import RolloutCache


@dataclass
class Completions:
    """P*G sampled completions, prompt-major: entry p*G + g is completion g of prompt p."""

    ids: list[torch.Tensor]  # P*G tensors (C_i,) int64 on the CPU, 1 <= C_i <= max_new_tokens
    stopped: torch.Tensor  # (P*G,) bool: ended with an EOS token (False: cut at max_new_tokens)
    # P*G tensors (C_i,) fp32 on the CPU: each sampled token's log-probability under
    # softmax(logits / temperature) over the whole vocabulary, as computed while decoding.
    logprobs: list[torch.Tensor] | None = None
    # Rows the sampler ran, summed over the sampled positions (live rows, plus finished rows
    # not yet compacted away and bucket padding): the decode work spent, >= sum of the C_i.
    decode_slots: int = 0


def _check(prompts, num_generations, max_new_tokens, eos_token_ids, temperature, top_p) -> None:
    if num_generations < 1:
        raise ValueError(f"generate: num_generations must be >= 1, got {num_generations}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if any(not isinstance(t, int) for t in eos_token_ids):
        raise ValueError(f"generate: eos_token_ids must be ints, got {eos_token_ids!r}")
    for i, p in enumerate(prompts):
        if p.ids.ndim != 1 or p.ids.numel() == 0:
            raise ValueError(f"generate: prompt {i}: ids must be a non-empty 1-D tensor, "
                             f"got shape {tuple(p.ids.shape)}")


def bucket_size(n: int, largest: int) -> int:
    """The static batch size for n live rows: a multiple of 8 up to 128, then of 1/16 of the
    power of two below n (<= 6% padding), capped at `largest`."""
    step = max(8, (1 << (max(n, 1).bit_length() - 1)) // 16)
    return min(largest, -(-n // step) * step)


def fill_holes(live: torch.Tensor, n_live: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compaction that moves as little as possible: live rows past n_live fill the finished
    rows before it. Returns keep (n_live,), new row i = old row keep[i], and the moves
    (old rows `movers` go to rows `holes`)."""
    holes = (~live[:n_live]).nonzero()[:, 0]
    movers = live[n_live:].nonzero()[:, 0] + n_live
    keep = torch.arange(n_live, device=live.device).index_copy_(0, holes, movers)
    return keep, movers, holes


def grid_slots(prompt: torch.Tensor, n_prompts: int) -> tuple[torch.Tensor, int]:
    """Places in the narrowest (n_prompts, group) grid with one place per row: row i goes to
    prompt[i] * group + (its rank among its prompt's rows). Returns (slots, group)."""
    order = torch.sort(prompt, stable=True).indices
    counts = torch.bincount(prompt, minlength=n_prompts)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(prompt)
    rank[order] = torch.arange(prompt.numel(), device=prompt.device) - first[prompt[order]]
    group = int(counts.max())
    return prompt * group + rank, group


# Completion columns a compiled step reads: powers of two from 32, capped at the cache's
# columns, those past the current one masked. A bucket reads fewer than twice the columns
# written (or 32), where reading all max_new_tokens columns at every step reads twice as many
# over a whole sequence, and far more early on, while most rows are live. Each bucket is one
# static shape: one compile, and one CUDA graph per batch bucket; powers of two keep their
# number logarithmic in max_new_tokens (6 for 1024). Below 32 columns the completion part
# costs little next to the weights and the prompt part: smaller buckets would add compiles
# for no saving.
_MIN_COLUMNS = 32


def column_bucket(n: int, capacity: int) -> int:
    """The completion columns a compiled step attends over when n (1 <= n <= capacity) are
    written: the power of two >= n, at least 32, at most `capacity` (the cache's columns)."""
    return min(capacity, max(_MIN_COLUMNS, 1 << (n - 1).bit_length()))


def column_buckets(capacity: int) -> list[int]:
    """Every value column_bucket(n, capacity) takes for n in 1..capacity, ascending."""
    buckets, size = [], _MIN_COLUMNS
    while size < capacity:
        buckets.append(size)
        size *= 2
    return buckets + [capacity]


# The name of dynamo's per-function compile limit (cache_size_limit in older torch).
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


class _Stepper:
    """Calls the decode step eagerly, or through one torch.compile'd function per (backend,
    device), shared by every rollout (class-level: compiled graphs serve the whole run)."""

    _compiled: dict = {}

    def __init__(self, compile_step: bool, backend: str, device: torch.device, max_new_tokens: int):
        self.compiled = compile_step
        self.fn = decode_step
        if compile_step:
            key = (backend, device.type)
            if key not in self._compiled:
                options = {"mode": "reduce-overhead"} if device.type == "cuda" and backend == "inductor" else {}
                self._compiled[key] = torch.compile(decode_step, backend=backend, fullgraph=True, **options)
            self.fn = self._compiled[key]
        self.cuda_graphs = compile_step and device.type == "cuda" and backend == "inductor"
        # The step's int arguments (columns, prompts, group) are shapes: specialize_int keeps
        # each value its own static graph (by default dynamo makes an int argument symbolic at
        # its second value). So the step compiles once per column bucket, and dynamo's default
        # limit of 8 compiles per function would be reached at max_new_tokens 4096 (8 buckets),
        # sooner with any other specialization; under fullgraph the compile past it raises
        # (torch 2.13). The limit is raised for this function only, while it runs: the
        # default's 8 per bucket (batch size 1, a new cache shape, another dtype, ... each
        # compile once more).
        self.dynamo_config = {"specialize_int": True, _LIMIT: 8 * len(column_buckets(max_new_tokens))}

    def __call__(self, model, tokens, positions, t: int, slots, group: int, cache: RolloutCache,
                 n_prompts: int, fused) -> torch.Tensor:
        """The next logits (B, V) fp32 after feeding tokens (B,) at completion column t."""
        if not self.compiled:  # exactly the t + 1 columns written, nothing to mask
            return self.fn(model, tokens, positions, t, slots, group, n_prompts, cache.prefix_k, cache.prefix_v,
                           cache.prefix_bias, cache.comp_k, cache.comp_v, t + 1, False, fused)
        # The cache's own tensors, marked static (generate), not views of them: see decode_step.
        column = torch.tensor(t, device=tokens.device)  # a tensor: one graph serves every t of a bucket
        columns = column_bucket(t + 1, cache.comp_k.shape[3])
        for x in (tokens, positions, slots):  # one graph for every batch bucket (CUDA graphs: one each)
            torch._dynamo.maybe_mark_dynamic(x, 0)
        # One graph for every prompt count and prompt length too: the prompt part's slots and
        # length and the cache's rows are dynamic sizes, and the step reads every prompt slot
        # (prompts=None; the compiled path never drops prompts), so that no int argument but
        # the column bucket and G (fixed for the run) is a static shape.
        for x, dims in ((cache.prefix_k, (1, 3)), (cache.prefix_v, (1, 3)), (cache.prefix_bias, (0, 1)),
                        (cache.comp_k, (1,)), (cache.comp_v, (1,))):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(x, dim)
        all_prompts = None if n_prompts == cache.prefix_k.shape[1] else n_prompts
        args = (model, tokens, positions, column, slots, group, all_prompts, cache.prefix_k, cache.prefix_v,
                cache.prefix_bias, cache.comp_k, cache.comp_v, columns, True, fused)
        with torch._dynamo.config.patch(**self.dynamo_config):
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
                return self.fn(*args).clone()  # the graph's output buffer is reused by the next replay
            return self.fn(*args)


def _mark_static(tensors) -> None:
    """Tell torch.compile these tensors keep their address from call to call: CUDA graphs then
    read them in place, where a replay would first copy each into the graph's own buffer (the
    whole cache and every joined weight, at every step). Parameters are static to dynamo
    already and are left alone."""
    for t in tensors:
        if not isinstance(t, torch.nn.Parameter):
            # guard=False, torch 2.13's default (older torch guarded the address, recompiling for
            # a new one): a new address re-records the CUDA graphs, without a recompile.
            torch._dynamo.mark_static_address(t, guard=False)


# CUDA graphs replay fixed addresses: with a graphed step, the rollout cache and the fused
# projection weights are kept per model and reused by the next rollout of the same shape
# (prompt capacity rounded up), so that the graphs recorded once serve the whole run.
_WORKSPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rollout_cache(model, lengths: list[int], G: int, max_new_tokens: int, reuse: bool) -> RolloutCache:
    lm = language_model(model)
    shape = dict(num_generations=G, max_new_tokens=max_new_tokens, num_layers=len(lm.layers),
                 num_kv_heads=lm.config.num_key_value_heads, head_dim=lm.layers[0].self_attn.head_dim,
                 dtype=lm.embed_tokens.weight.dtype, device=model.lm_head.weight.device)
    if not reuse:
        return RolloutCache.allocate(lengths, **shape)
    capacity = -(-max(lengths) // 64) * 64
    workspace = _WORKSPACES.setdefault(model, {})
    key = (len(lengths), capacity, *shape.values())
    if workspace.get("cache_key") != key:
        cache = RolloutCache.allocate(lengths, **shape, prefix_capacity=capacity)
        workspace.update(cache_key=key, cache=cache)
    cache = workspace["cache"]
    cache.set_prompt_lengths(lengths)
    return cache


def fused_weights(model, reuse: bool):
    fused = fuse_layers(model)
    if not reuse or fused is None:
        return fused
    workspace = _WORKSPACES.setdefault(model, {})
    kept = workspace.get("fused")
    shapes = [[None if t is None else t.shape for t in f] for f in fused]  # qkv_bias None: Qwen3-VL
    if kept is None or [[None if t is None else t.shape for t in f] for f in kept] != shapes:
        workspace["fused"] = fused
        return fused
    for old, new in zip(kept, fused):  # this rollout's weights, at the addresses the graphs hold
        for a, b in zip(old, new):
            if a is not None and a.data_ptr() != b.data_ptr():
                a.copy_(b)
    return kept


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[Prompt],
    num_generations: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    compile_step: bool | None = None,
    compile_backend: str = "inductor",
    compact_fraction: float | None = 1 / 32,
    progress: bool | None = None,
) -> Completions:
    """Sample `num_generations` completions for each prompt.

    Args:
        model: Qwen2-VL / Qwen2.5-VL / Qwen3-VL ForConditionalGeneration, on its device (any attention
            implementation: the language model's attention here is this module's own).
        prompts: encoded prompts (r1vl.data.prompts), each with its image.
        eos_token_ids: tokens that end a completion (e.g. <|im_end|>, <|endoftext|>); an empty list
            never stops early: every completion is exactly max_new_tokens long (benchmarks).
        temperature, top_p: sampling from softmax(logits / temperature), nucleus top_p.
        generator: for reproducible draws, on the model's device. The draws are inverse-CDF
            (r1vl.sampling.draw): the same distribution as torch.multinomial, another random stream.
        compile_step: compile the decode step (None: on CUDA only, with CUDA graphs).
        compile_backend: torch.compile backend for it ("inductor"; "eager" in CPU tests).
        compact_fraction: drop finished rows once they are this share of the batch (at least
            one row); with a compiled step, whenever the live rows fit a smaller bucket. None:
            never (finished rows decode on, ignored, until all have stopped).
        progress: a progress bar (tokens, live sequences); None: when stderr is a terminal.

    Image and vision-marker tokens are never sampled: a completion holding an image token
    would have no image features behind it.
    """
    _check(prompts, num_generations, max_new_tokens, eos_token_ids, temperature, top_p)
    if adapters_enabled(model):
        # LoRA: sample the merged policy, its adapters folded into merged copies of the weights
        # (r1vl.model.lora.merged_adapters) for this rollout, the decode step's joined weights built from them.
        with merged_adapters(model):
            return generate(model, prompts, num_generations, max_new_tokens, eos_token_ids, temperature, top_p,
                            generator, compile_step=compile_step, compile_backend=compile_backend,
                            compact_fraction=compact_fraction, progress=progress)
    if not prompts:
        return Completions([], torch.zeros(0, dtype=torch.bool), [], 0)
    config = model.config
    device = model.lm_head.weight.device
    G, NP = num_generations, len(prompts)
    B0 = NP * G
    banned = torch.tensor([config.image_token_id, config.video_token_id, config.vision_start_token_id,
                           config.vision_end_token_id], device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.int64, device=device)  # int64 even when empty (no stop)
    if compile_step is None:
        compile_step = device.type == "cuda"
    stepper = _Stepper(compile_step, compile_backend, device, max_new_tokens)

    # 1. Prefill: every prompt once, its keys/values into the cache's prefix part.
    lengths = [p.ids.numel() for p in prompts]
    positions, deltas = zip(*(prompt_positions(model, p) for p in prompts))
    cache = rollout_cache(model, lengths, G, max_new_tokens, reuse=stepper.cuda_graphs)
    logits = prefill(model, prompts, cache, list(positions)).repeat_interleave(G, dim=0)  # (B0, V)

    fused = fused_weights(model, reuse=stepper.cuda_graphs)
    if stepper.compiled:
        _mark_static([cache.prefix_k, cache.prefix_v, cache.prefix_bias, cache.comp_k, cache.comp_v,
                      *(t for layer in fused or [] for t in layer if t is not None)])
    # 2. Decode. Row i of the batch is sequence seq[i] (compaction reorders rows).
    out_tokens = torch.zeros(B0 + 1, max_new_tokens, dtype=torch.int64, device=device)  # row B0: padding's
    out_logprobs = torch.zeros(B0 + 1, max_new_tokens, dtype=torch.float32, device=device)
    seq = torch.arange(B0, device=device)
    start = torch.tensor([n + d for n, d in zip(lengths, deltas)], device=device).repeat_interleave(G)
    prompt = seq // G  # the row's prompt's slot in the cache's prefix part
    slots, group = seq.clone(), G  # the row's place in the (prompts, group) prefix grid
    live = torch.ones(B0, dtype=torch.bool, device=device)  # row's sequence has not stopped
    bar = progress_bar(max_new_tokens, "rollout", sys.stderr.isatty() if progress is None else progress,
                       unit="tok", leave=False, file=sys.stderr)
    n_prompts, decode_slots = NP, 0
    for t in range(max_new_tokens):
        uniforms = torch.rand(logits.shape[0], generator=generator, device=device)
        token, logprob = sample_tokens(logits, uniforms, temperature, top_p, banned)
        out_tokens[seq, t] = token  # finished rows write past their EOS: cut below
        out_logprobs[seq, t] = logprob
        decode_slots += logits.shape[0]
        live &= ~torch.isin(token, eos)
        if t + 1 == max_new_tokens:
            break
        n_live = int(live.sum())  # a host sync per token: cheap next to a forward
        bar.update(1)
        bar.set_postfix(live=n_live, refresh=False)
        if n_live == 0:
            break
        rows = live.numel()
        if compact_fraction is None:
            due = False
        elif stepper.compiled:
            due = bucket_size(n_live, B0) < rows
        else:
            due = rows - n_live >= max(1, int(rows * compact_fraction))
        if due:
            keep, movers, holes = fill_holes(live, n_live)
            cache.move_rows(movers, holes, columns=t)  # columns 0..t-1 are written
            seq, start, prompt, token = seq[keep], start[keep], prompt[keep], token[keep]
            live = torch.ones(n_live, dtype=torch.bool, device=device)
            if stepper.compiled:
                # A fixed prefix grid keeps the number of graphs down; padding rows write to spare
                # cache rows, the spare grid place and output row B0.
                pad = bucket_size(n_live, B0) - n_live
                slots = torch.cat([prompt * G + seq % G, prompt.new_full((pad,), n_prompts * G)])
                seq = torch.cat([seq, seq.new_full((pad,), B0)])
                start = torch.cat([start, start.new_zeros(pad)])
                token = torch.cat([token, token.new_zeros(pad)])
                live = torch.cat([live, live.new_zeros(pad)])
            else:
                # Prompts whose G completions all stopped leave the prefix part, and the grid
                # narrows to the most live rows any prompt has.
                kept_prompts = torch.unique(prompt)  # sorted
                if kept_prompts.numel() < n_prompts:
                    cache.compact_prompts(kept_prompts)
                    prompt = torch.searchsorted(kept_prompts, prompt)
                    n_prompts = kept_prompts.numel()
                slots, group = grid_slots(prompt, n_prompts)
        logits = stepper(model, token, start + t, t, slots, group, cache, n_prompts, fused)
    bar.close()

    tokens, logprobs = out_tokens[:B0].cpu(), out_logprobs[:B0].cpu()
    steps = t + 1
    is_eos = torch.isin(tokens[:, :steps], eos.cpu())
    stopped = is_eos.any(dim=1)
    # Length up to and including the first EOS; max_new_tokens if it never stopped (a sequence
    # without EOS stays live, so the loop ran to the end).
    n_out = torch.where(stopped, is_eos.int().argmax(dim=1) + 1, torch.full_like(stopped, steps, dtype=torch.int64))
    n_out = n_out.tolist()
    return Completions([row[:n] for row, n in zip(tokens, n_out)], stopped,
                       [row[:n] for row, n in zip(logprobs, n_out)], decode_slots)
