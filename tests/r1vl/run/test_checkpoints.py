"""Atomic trainer checkpoints: rename on completion, rotation, exact RNG round trip."""
import json
import random
import struct
import zipfile

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


# ----------------------------------------------------------------------------- unreadable checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with the trainer's real checkpoints of steps 1 and 2 (a tiny policy in
    HF format, PlainEngine's optimizer.pt after a step, rng_rank0.pt, trainer_state.json),
    written by Checkpointer.save; each test copies it."""
    import types

    from r1vl.model.policy import load_policy
    from r1vl.run.checkpoints import Checkpointer
    from r1vl.tiny import write_tiny_checkpoint
    from r1vl.update.engine import PlainEngine, UpdateSettings

    root = tmp_path_factory.mktemp("ckpt")
    world = types.SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    policy = load_policy(write_tiny_checkpoint(root / "model", ["a few words"]), torch.float32,
                         torch.device("cpu"), 3136, 3136)
    engine = PlainEngine(policy.model, UpdateSettings(lr=1e-3, total_steps=2), world)
    saver = Checkpointer(root / "run", save_every=1, keep_last=3, sft_steps=0, world=world)
    for step in (1, 2):
        for p in engine.params:
            p.grad = torch.ones_like(p)
        engine.step(True)
        saver.save(policy, engine, "grpo", step, {"data_position": step})
    return root / "run"


def _run_copy(two_checkpoints, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    return run, run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"


def _truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGES = {
    # a safetensors file cut short (a full disk): its header promises more bytes than there are
    "truncated safetensors": (lambda c: _truncate(c / "policy" / "model.safetensors"),
                              "policy/model.safetensors is not readable: truncated"),
    "truncated optimizer file": (lambda c: _truncate(c / "optimizer.pt"),
                                 "optimizer.pt is not readable"),
    "missing trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(),
                                   "trainer_state.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_auto_falls_back_over_an_unreadable_newest_checkpoint(two_checkpoints, tmp_path, capsys, damage):
    from r1vl.run.checkpoints import ResumePoint, find_resume_point, open_resume_point

    run, older, newest = _run_copy(two_checkpoints, tmp_path)
    assert find_resume_point("auto", run) == newest  # intact: the newest
    capsys.readouterr()
    harm, message = DAMAGES[damage]
    harm(newest)
    assert find_resume_point("auto", run) == older
    warning = capsys.readouterr().err
    assert warning.startswith("warning: --resume auto: skipping") and str(newest) in warning, warning
    assert message in warning, warning
    resume = open_resume_point("auto", run)
    assert (resume.path, resume.step) == (older, 1) and ResumePoint.read(older).step == 1
    # Named explicitly, the damaged one is refused, saying why.
    with pytest.raises(ValueError, match="--resume .*step_00000002: "):
        find_resume_point(str(newest), run)
    # None readable: refused, naming every checkpoint and what is wrong with it.
    _truncate(older / "rng_rank0.pt")
    with pytest.raises(ValueError, match="no readable checkpoint") as refused:
        find_resume_point("auto", run)
    assert message in str(refused.value) and "step_00000001: rng_rank0.pt is not readable" in str(refused.value)


def test_a_byte_changed_after_writing_is_found(two_checkpoints, tmp_path, capsys):
    """torch.save's archives carry a CRC-32 per member: one flipped byte in the optimizer
    state's tensor data is found without unpickling anything."""
    from r1vl.run.checkpoints import find_resume_point

    run, older, newest = _run_copy(two_checkpoints, tmp_path)
    path = newest / "optimizer.pt"
    data = bytearray(path.read_bytes())
    torch.load(path, weights_only=True)  # readable before
    with zipfile.ZipFile(path) as archive:  # the largest tensor's stored bytes (torch stores them uncompressed)
        member = max(archive.infolist(), key=lambda m: m.file_size)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert find_resume_point("auto", run) == older
    assert "optimizer.pt is not readable: member" in capsys.readouterr().err
