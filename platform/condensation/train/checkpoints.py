"""Which checkpoint a run folder resumes from, said before Ray Train starts.

Ray Train (V2) resumes from the newest checkpoint in its own record, `checkpoint_manager_snapshot.json` in the run
folder, which its controller rewrites once every worker has reported a checkpoint. A run stopped between the
workers writing `checkpoint_<step>/` (rank 0's `trainer_state.json` included) and that registration leaves a newer
folder on disk than in the record; Ray then resumes from the older one, and the newer folder may lack other ranks'
ZeRO shards, so it is not safe to load either. This module only reports the situation; the newer folder is left
alone (Ray deletes it once `checkpoint.keep` newer ones exist).
"""

from __future__ import annotations

import json
import os

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
STATE_FILE = "trainer_state.json"


def _step(path: str) -> int | None:
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def on_disk(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder holding a trainer_state.json, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith("checkpoint_") and (step := _step(path)) is not None:
            found.append((step, path))
    return sorted(found)


def registered(run_dir: str) -> str | None:
    """The folder of the newest checkpoint in Ray Train's record (None: no record, or one this code cannot read)."""
    try:
        with open(os.path.join(run_dir, SNAPSHOT)) as f:
            name = json.load(f)["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return os.path.join(run_dir, name) if name else None


def resume_point(run_dir: str) -> tuple[int, str, str] | None:
    """(step, path, note) of the checkpoint a restart resumes from; note says when a newer folder exists that Ray
    had not registered. None when the run starts from scratch."""
    disk = on_disk(run_dir)
    reg = registered(run_dir)
    if reg is not None and (step := _step(reg)) is not None:
        newer = [s for s, _ in disk if s > step]
        note = (f"; checkpoint of step {newer[-1]} is on disk but was written when the run stopped, before Ray "
                f"Train registered it, so it is not used" if newer else "")
        return step, reg, note
    if os.path.exists(os.path.join(run_dir, SNAPSHOT)) or not disk:
        return None
    step, path = disk[-1]  # no record this code can read: the newest complete folder is the best guess
    return step, path, ""
