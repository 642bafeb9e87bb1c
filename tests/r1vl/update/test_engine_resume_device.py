"""A resumed engine's AdamW `step` counters are CPU tensors whatever the run's device, as in a
run that never stopped (torch keeps `step` on the CPU unless the optimizer is fused or
capturable): on a GPU each would be read back once per parameter per step."""
import types

import torch
from test_engine import WORLD, _sft, _start

from r1vl.update.engine import PlainEngine, UpdateSettings


def test_resumed_step_counters_stay_on_the_cpu(tmp_path, monkeypatch):
    settings = UpdateSettings(lr=1e-4, total_steps=4, warmup_steps=1)
    engine = PlainEngine(_start(torch.bfloat16), settings, WORLD)
    _sft(engine, 1, seed=1)
    engine.save_state(tmp_path)
    # A stand-in device for the run's own: what is loaded to it is not the CPU (and "meta"
    # tensors cannot be copied onto the CPU parameters: loading them there fails loudly).
    loads = []
    real_load = torch.load

    def spy(*args, map_location=None, **kwargs):
        loads.append(map_location)
        return real_load(*args, map_location=map_location, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    elsewhere = types.SimpleNamespace(**{**vars(WORLD), "device": torch.device("meta")})
    again = PlainEngine(_start(torch.bfloat16), settings, WORLD)
    again.world = elsewhere
    again.load_state(tmp_path)
    assert loads and loads[0] in ("cpu", torch.device("cpu")), loads
    steps = [s["step"] for s in again.optimizer.state.values()]
    assert steps and all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in steps)
    assert all(s["exp_avg"].device == p.device for p, s in again.optimizer.state.items())
