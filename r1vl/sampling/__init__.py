"""Step 1, sample: G completions per prompt (the sampler, prefill and cached decode, the token draw)."""
