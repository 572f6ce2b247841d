"""Continual pretraining of a Condensation model (the paper's Table III pretraining stage), Ray Train + DeepSpeed.

    python workloads/pretrain.py                                  # embedded CPU default, on a private local Ray

On a Ray cluster (cluster/*.yaml or `bash cluster/local.sh start`: token authentication on, README "Clusters"):

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python workloads/pretrain.py --preset paper    # 1B, 4K, GPUs
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python workloads/pretrain.py --config configs/pretrain_cpu.yaml \\
        schedule.total_steps=100 optim.lr=5e-4 run.name=my-run

Config: preset defaults <- `--config file.yaml` <- `key.sub=value` overrides (see condensation.config for every
field). Bad configs fail here, before Ray starts, naming the field. Starting again with the same run.name and
run.storage continues the run from its last checkpoint. `--print-config` shows the resolved config and exits.
Under `ray job submit` a relative run.storage resolves under ~/condensation-runs (the job's own folder is a
temporary copy); the run folder and the MLflow URI are printed at the start.
The embedded default (preset "default") trains the tiny-cpu model on local text on 2 CPU workers in a few minutes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from condensation.config import ConfigError, job_storage_base, load_config, preset, rebase_storage, to_yaml
from condensation.train import check_train_data, fit, prepare, resolved_config_dict
from condensation.train.checkpoints import resume_point
from condensation.train.tracking import end_run, tracking_uri


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", help="default (CPU, minutes), debug (seconds) or paper")
    p.add_argument("--config", default=None, help="a YAML file of overrides (configs/*.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--ray-address", default=None, help="ray.init address, e.g. auto for a cluster started with `ray start` "
                   "(default: the job's cluster under `ray job submit`, else a new local Ray)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(preset(args.preset), args.config, args.overrides)
        # under `ray job submit` the cwd is a throw-away copy: relative storage goes under ~/condensation-runs
        cfg = prepare(rebase_storage(cfg, job_storage_base(os.getcwd(), dict(os.environ), os.path.expanduser("~"))))
        check_train_data(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(resolved_config_dict(cfg)))
        return 0
    print(f"run folder: {cfg.run.run_dir}")
    resume = resume_point(cfg.run.run_dir)
    if resume is not None:
        print(f"resuming from the checkpoint of step {resume[0]} ({resume[1]}){resume[2]}")
    if cfg.tracking.enabled:
        print(f"tracking: mlflow ui --backend-store-uri {tracking_uri(cfg)}", flush=True)

    from condensation.train.runtime import init_ray, shutdown_ray

    init_ray(args.ray_address, joining=bool(os.environ.get("RAY_ADDRESS")), use_gpu=cfg.schedule.use_gpu)
    # `ray job stop` sends SIGTERM: end the MLflow run as KILLED as Ctrl-C does (ray.init's handler just exits)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = fit(cfg)
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler aborts the run and raises SystemExit
        shutdown_ray()  # the workers stop logging before the run is marked
        end_run(cfg, "KILLED")
        print(f"\ninterrupted; the same command continues run {cfg.run.name!r} from its last checkpoint", file=sys.stderr)
        return 130
    except ConfigError as e:  # a config that cannot run on this cluster (e.g. workers + data tasks do not fit)
        end_run(cfg, "FAILED")
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"done: step {result.step}; checkpoint {result.checkpoint_path}; hf {result.hf_path}; "
          f"mlflow run {result.mlflow_run_id} at {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
