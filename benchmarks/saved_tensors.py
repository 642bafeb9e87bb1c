"""Counting the bytes a forward saves for backward: the measurement the memory plan's
activation figures are held to, on CPU (bench_memory.py, tests/r1vl/run/test_memory_plan.py).
A measuring tool, not part of the trainer."""
from __future__ import annotations

import torch


class SavedTensors:
    """Bytes a forward leaves saved for backward, counted as autograd saves them:

        with SavedTensors(model, exclude=[batch tensors]) as saved:
            loss = forward(...)
        saved.bytes

    Every tensor autograd saves (torch.autograd.graph.saved_tensors_hooks) is counted once
    per storage (views of one buffer keep the whole buffer alive), parameters and `exclude`
    not at all. Inside a checkpointed layer autograd saves nothing (the checkpoint's own
    hooks take over); what it keeps is the layer's input, which is counted by wrapping the
    layers' checkpoint function: its positional tensor arguments, and with
    count_checkpoint_keywords also the tensors among its keyword arguments (position
    embeddings shared by all layers, counted once)."""

    def __init__(self, model: torch.nn.Module, exclude=(), count_checkpoint_keywords: bool = True):
        self.model, self.keywords = model, count_checkpoint_keywords
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *exclude]}
        self.storages: dict[int, int] = {}
        self._wrapped: list = []

    def _count(self, t) -> None:
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage().data_ptr()
            if key not in self.skip:
                self.storages[key] = t.untyped_storage().nbytes()
        elif isinstance(t, (tuple, list)):
            for x in t:
                self._count(x)

    def _pack(self, t):
        self._count(t)
        return t

    def __enter__(self) -> SavedTensors:
        from r1vl.model.activation_checkpointing import checkpointed_layers

        for layer in checkpointed_layers(self.model):
            original = getattr(layer, "_gradient_checkpointing_func", None)
            if original is None:
                continue

            def recording(function, *args, _original=original, **kwargs):
                self._count(args)
                if self.keywords:
                    self._count(list(getattr(function, "keywords", {}).values()))
                return _original(function, *args, **kwargs)

            layer._gradient_checkpointing_func = recording
            self._wrapped.append((layer, original))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for layer, original in self._wrapped:
            layer._gradient_checkpointing_func = original

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())
