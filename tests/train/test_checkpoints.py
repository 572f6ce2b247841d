"""Which checkpoint a restart resumes from, told before Ray starts (issue 17: a resume went back to 900 though
1000 was on disk, and said "from scratch")."""

import json
import os

from condensation.train.checkpoints import SNAPSHOT, resume_point


def _ckpt(run_dir, step, state=True):
    path = os.path.join(run_dir, f"checkpoint_{step:08d}")
    os.makedirs(path)
    if state:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"step": step}, f)
    return path


def _snapshot(run_dir, step):
    with open(os.path.join(run_dir, SNAPSHOT), "w") as f:
        json.dump({"latest_checkpoint_result": {"checkpoint_dir_name": f"checkpoint_{step:08d}"}}, f)


def test_resume_point(tmp_path):
    run = str(tmp_path / "run")
    assert resume_point(run) is None
    os.makedirs(run)
    assert resume_point(run) is None
    p900 = _ckpt(run, 900)
    _snapshot(run, 900)
    assert resume_point(run) == (900, p900, "")
    _ckpt(run, 1000)  # written by the workers, stopped before Ray registered it
    _ckpt(run, 1100, state=False)  # rank 0 never got to its trainer_state.json
    step, path, note = resume_point(run)
    # the newest complete folder is used, and the note says it is newer than Ray's record
    assert (step, path) == (1000, os.path.join(run, "checkpoint_00001000")) and "step 900" in note
    os.remove(os.path.join(run, SNAPSHOT))  # no record Ray wrote: still the newest complete folder
    assert resume_point(run) == (1000, os.path.join(run, "checkpoint_00001000"), "")


def test_torch_engine_checkpoint_is_complete_at_the_recorded_size(tmp_path):
    from condensation.train.checkpoints import newest_complete_checkpoint

    run = str(tmp_path)
    for step, written in ((2, 100), (4, 100), (6, 40)):  # 6: the copy of its state file was cut short
        path = os.path.join(run, f"checkpoint_{step:08d}")
        os.makedirs(os.path.join(path, "torch"))
        with open(os.path.join(path, "torch", "state.pt"), "wb") as f:
            f.write(b"x" * written)
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world_size": 2, "engine": "torch", "files": {"torch/state.pt": 100}}, f)
    assert newest_complete_checkpoint(run).endswith("checkpoint_00000004")


def test_a_run_continues_with_the_engine_of_its_checkpoints(tmp_path):
    import pytest

    from condensation.config import ConfigError, load_config
    from condensation.train import prepare

    cfg = load_config(overrides=[f"run.storage={tmp_path}", "run.name=r", "schedule.engine=torch"])
    path = _ckpt(os.path.join(tmp_path, "r"), 4)  # no engine recorded: DeepSpeed wrote it (before the choice)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump({"step": 4, "zero_stage": 0}, f)
    with pytest.raises(ConfigError, match="schedule.engine: run 'r' has checkpoints of the 'deepspeed' engine"):
        prepare(cfg)
    assert prepare(load_config(overrides=[f"run.storage={tmp_path}", "run.name=r"])).schedule.engine == "deepspeed"
