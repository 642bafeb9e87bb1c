"""Atomic trainer checkpoints: rename on completion, rotation, exact RNG round trip."""
import json
import random

import numpy as np
import pytest
import torch

from r1vl.run.checkpoints import latest_checkpoint, list_checkpoints, load_rng, save_checkpoint, save_rng


def write_state(step):
    def write(tmp):
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        save_rng(tmp, rank=0)
    return write


def test_rotation_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        final = save_checkpoint(tmp_path, step, write_state(step), keep_last=2)
        assert final.name == f"step_{step:08d}"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text()) == {"step": 8}


def test_a_write_that_dies_leaves_the_previous_checkpoint_intact(tmp_path):
    save_checkpoint(tmp_path, 5, write_state(5), keep_last=3)

    def dies(tmp):
        (tmp / "trainer_state.json").write_text("{\"step\": 10")  # half written
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 10, dies, keep_last=3)
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    assert json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text()) == {"step": 5}
    # The next save of that step replaces the leftover temporary directory.
    save_checkpoint(tmp_path, 10, write_state(10), keep_last=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_rng_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    sampler = torch.Generator().manual_seed(4)
    random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=sampler)
    save_rng(tmp_path, rank=1, generators={"rollout": sampler})
    expected = (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(3, generator=sampler))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), sampler.manual_seed(9)
    load_rng(tmp_path, rank=1, generators={"rollout": sampler})
    got = (random.random(), float(np.random.rand()), torch.rand(3), torch.rand(3, generator=sampler))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    with pytest.raises(KeyError, match="no state for the generator 'eval'"):
        load_rng(tmp_path, rank=1, generators={"eval": sampler})
    with pytest.raises(FileNotFoundError, match="rng_rank0.pt is missing"):
        load_rng(tmp_path, rank=0)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        save_checkpoint(tmp_path, 1, write_state(1), keep_last=0)
