"""Ray Tune sweep of segment length x learning rate: every trial a run of the training layer (Ray Train +
DeepSpeed), ASHA stopping the worse ones early, a parent MLflow run with one nested run per trial.

    python workloads/sweep.py                                  # embedded CPU default: 4 trials, minutes on 2 cores
    python workloads/sweep.py --preset passkey                 # passkey stage 0, scored by the answer loss
    python workloads/sweep.py search.segment_lengths=[32,64,128] search.num_samples=3 name=my-sweep
    python workloads/sweep.py search.lrs=[1e-3] search.num_samples=1 asha.enabled=false \
        search.grid.model.memory_grad_segments=[0,2]        # an idea against the paper (0: full BPTT), same point
    python workloads/make_corpus.py && python workloads/sweep.py --preset h200   # one H200: 8 SmolLM2 trials, 4 at once
    python workloads/sweep.py --preset h200 gpus_per_trial=1   # 4 GPUs: one GPU per trial
    python workloads/sweep.py --preset h200-ideas              # one H200: attention sink x memory norm against the paper

Config: preset <- `--config file.yaml` <- `key.sub=value` overrides (fields in condensation.sweep.SweepConfig and,
under `train.`, condensation.config). A bad config fails here, before Ray starts, naming the field. Started again
with the same name and storage, the sweep resumes: finished and stopped trials stay, unfinished ones continue
(Ctrl-C ends the MLflow runs as KILLED first). Under `ray job submit` a relative train.run.storage resolves under
~/condensation-runs. Then (printed at the start and the end):
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

from condensation.config import ConfigError, job_storage_base, rebase_storage, to_yaml
from condensation.sweep import PRESETS, end_runs, load_sweep_config, resolve_sweep, run_sweep
from condensation.train.tracking import tracking_uri


def _interrupt(signum, frame):
    """SIGTERM (`timeout`, `ray job stop`) as Ctrl-C: re-sent as SIGINT, it reaches Ray Tune's handler while the sweep
    runs (the experiment is saved, the running trials' runs end, and the table of what finished is written), and is
    a KeyboardInterrupt before or after."""
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--config", default=None, help="a YAML file of overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--ray-address", default=None, help="ray.init address, e.g. auto for a cluster started with `ray start` "
                   "(default: the job's cluster under `ray job submit`, else a new local Ray)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    try:
        cfg = load_sweep_config(args.preset, args.config, args.overrides)
        # under `ray job submit` the cwd is a throw-away copy: relative storage goes under ~/condensation-runs
        base = job_storage_base(os.getcwd(), dict(os.environ), os.path.expanduser("~"))
        cfg = resolve_sweep(dataclasses.replace(cfg, train=rebase_storage(cfg.train, base)))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0

    uri = tracking_uri(cfg.train)
    print(f"sweep folder: {cfg.folder}", flush=True)
    if cfg.train.tracking.enabled:
        print(f"tracking: mlflow ui --backend-store-uri {uri}", flush=True)

    from condensation.train.runtime import init_ray, shutdown_ray

    init_ray(args.ray_address, joining=bool(os.environ.get("RAY_ADDRESS")), use_gpu=cfg.train.schedule.use_gpu)
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`: end the MLflow runs as Ctrl-C does
    t0 = time.time()
    try:
        result = run_sweep(cfg, log=lambda line: print(line, flush=True))
    except (KeyboardInterrupt, SystemExit):
        shutdown_ray()
        end_runs(cfg, "KILLED")
        print(f"\ninterrupted; the same command resumes sweep {cfg.name!r}", file=sys.stderr)
        return 130
    except ConfigError as e:  # a config that cannot run on this cluster, or a different sweep under this name
        end_runs(cfg, "FAILED")
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if result.interrupted:  # Ctrl-C reaches Ray Tune first: it saves the experiment and ends the trials
        print(f"\n{result.format_table()}\ninterrupted after {time.time() - t0:.0f} s (table above and in {cfg.folder}); "
              f"the same command resumes sweep {cfg.name!r}", file=sys.stderr)
        return 130

    if result.resumed and result.reported == 0:
        print(f"\nsweep {cfg.name!r} had already finished: nothing to do. To start over, give it a new name (name=...) "
              f"or delete {cfg.folder} ({cfg.objective}, {result.mode}):\n")
    else:
        print(f"\nsweep {cfg.name!r} {'resumed and ' if result.resumed else ''}finished in {time.time() - t0:.0f} s "
              f"({cfg.objective}, {result.mode}):\n")
    print(result.format_table())
    b = result.best
    if b is not None:
        print(f"best: segment length {b.segment_length}, lr {b.lr:.3g}: {cfg.objective} {b.objective:.4f} "
              f"after {b.step} steps\n  checkpoint {b.checkpoint_path}\n  hf export  {b.hf_path}")
    else:
        print("no trial produced a finite objective")
    if result.gpu_util:
        from condensation.sweep import format_gpu_util

        print(f"GPU utilisation (MLflow system metrics): {format_gpu_util(result.gpu_util)}")
    print(f"\ntable, picture and best config: {cfg.folder} (trials.md, objective.png, results.json)")
    if cfg.train.tracking.enabled:
        print(f"look at the parent run {cfg.name!r} and its trials:\n    mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
