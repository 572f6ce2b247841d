"""Which checkpoint a run folder resumes from: the newest complete one on disk, said before Ray Train starts.

Ray Train (V2) records a reported checkpoint in `checkpoint_manager_snapshot.json` only once its controller has
processed every worker's report. A worker lost, or a run stopped, in between leaves a newer folder on disk than in
that record, and Ray alone would resume from the older one (issue 17: 900 with 1000 on disk). The driver therefore
hands the workers the newest folder that is complete, i.e. holds rank 0's `trainer_state.json` and the engine's
state: every rank's ZeRO shard (DeepSpeed), or the state file rank 0 wrote, at the size it recorded (torch), and
they load it when it is newer than Ray's.
"""

from __future__ import annotations

import json
import os

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
STATE_FILE = "trainer_state.json"
DS_TAG = "ds"
TORCH_DIR, TORCH_STATE = "torch", "state.pt"  # the torch engine's checkpoint file: <checkpoint>/torch/state.pt


def _state(path: str) -> dict | None:
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_step(path: str) -> int:
    """The optimizer step a checkpoint folder holds (its trainer state must exist)."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return int(json.load(f)["step"])


def checkpoint_engine(path: str) -> str | None:
    """The engine that wrote a checkpoint folder ("deepspeed" for folders from before there was a choice); None when
    the folder has no readable trainer state."""
    state = _state(path)
    return None if state is None else state.get("engine", "deepspeed")


def _complete_step(path: str) -> int | None:
    """The folder's step if it holds rank 0's trainer state and the engine's state: under ZeRO every rank's optimizer
    shard (DeepSpeed names it `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, with a `bf16_` prefix in bf16); for the
    torch engine every file rank 0 listed, at the size it listed; else None."""
    state = _state(path)
    if state is None:
        return None
    if state.get("engine") == "torch":
        try:
            ok = all(os.path.getsize(os.path.join(path, f)) == n for f, n in state["files"].items())
        except (OSError, KeyError, AttributeError, TypeError):
            return None
        return int(state["step"]) if ok else None
    if state.get("zero_stage", 0) == 0:
        return int(state["step"])
    try:
        files = os.listdir(os.path.join(path, DS_TAG))
    except OSError:
        return None
    shards = {f.split("zero_pp_rank_")[1].split("_")[0] for f in files
              if "zero_pp_rank_" in f and f.endswith("_optim_states.pt")}
    return int(state["step"]) if shards >= {str(r) for r in range(state.get("world_size", 1))} else None


def on_disk(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint folder, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith("checkpoint_") and (step := _complete_step(path)) is not None:
            found.append((step, path))
    return sorted(found)


def newest_complete_checkpoint(run_dir: str) -> str | None:
    disk = on_disk(run_dir)
    return disk[-1][1] if disk else None


def registered(run_dir: str) -> str | None:
    """The folder of the newest checkpoint in Ray Train's record (None: no record, or one this code cannot read)."""
    try:
        with open(os.path.join(run_dir, SNAPSHOT)) as f:
            name = json.load(f)["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return os.path.join(run_dir, name) if name else None


def resume_point(run_dir: str) -> tuple[int, str, str] | None:
    """(step, path, note) of the checkpoint a restart resumes from; the note says when it is newer than Ray Train's
    record. None when the run starts from scratch."""
    disk = on_disk(run_dir)
    if not disk:
        return None
    step, path = disk[-1]
    reg = registered(run_dir)
    reg_state = _state(reg) if reg else None
    note = ""
    if reg_state is not None and int(reg_state["step"]) < step:
        note = (f" (newer than Ray Train's record, step {reg_state['step']}: it was written when the run stopped, "
                f"before Ray registered it)")
    return step, path, note
