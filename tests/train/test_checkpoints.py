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
