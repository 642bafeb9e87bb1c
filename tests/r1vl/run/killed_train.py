"""train.py, SIGKILLed at an exact point: `python killed_train.py NAME:STEP TRAIN_PY ARGS...`
(torchrun runs it on every rank).

The resume tests kill a run the way a scheduler or the OOM killer would, with no chance to
clean up, at a point they choose, so that they never race the trainer:
  after_checkpoint:N    right after the checkpoint of global step N is complete;
  checkpoint_write:N    halfway through writing it: the policy written, the engine's and the
                        random states not yet.
The trainer holds no hook for this: the wrapper patches r1vl.run.checkpoints before train.py runs.
"""
import os
import runpy
import signal
import sys

import r1vl.run.checkpoints as checkpoints

name, step = sys.argv[1].split(":")
step = int(step)
if name not in ("after_checkpoint", "checkpoint_write"):
    sys.exit(f"killed_train.py: unknown kill point {name!r}")


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


original_save, original_policy_save = checkpoints.Checkpointer.save, checkpoints.save_full_policy
writing = {"step": None}


def save(self, policy, engine, stage, stage_step, *args, **kwargs):
    writing["step"] = self.global_step(stage, stage_step)
    path = original_save(self, policy, engine, stage, stage_step, *args, **kwargs)
    if name == "after_checkpoint" and writing["step"] == step:
        kill()
    return path


def save_full_policy(policy, out_dir, world):
    path = original_policy_save(policy, out_dir, world)
    if name == "checkpoint_write" and writing["step"] == step:
        kill()
    return path


checkpoints.Checkpointer.save = save
checkpoints.save_full_policy = save_full_policy
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
