"""The passkey curriculum (the paper's Table III passkey runs): finetuning stages at growing lengths, each from the last,
with a passkey accuracy grid after every stage, tracked in MLflow (a parent run, one nested run per stage).

    python workloads/curriculum.py                                   # embedded CPU default: tiny model, minutes
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python workloads/curriculum.py   # on a cluster (README "Clusters")
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python workloads/curriculum.py --preset paper train.model.init_from=/ckpt/hf
    python workloads/make_corpus.py && python workloads/curriculum.py --preset smollm2    # SmolLM2 chain, one GPU machine
    python workloads/make_corpus.py && python workloads/curriculum.py --preset smollm2-replay   # the same, text replayed
    python workloads/curriculum.py --preset h200                     # one H200, from meta-llama/Llama-3.2-1B
    python workloads/curriculum.py --config my.yaml stages.0.steps=200 evaluation.n_per_cell=20

Config: preset <- `--config file.yaml` <- `key.sub=value` overrides (fields in condensation.curriculum and, under
`train.`, condensation.config). A bad config fails here, before Ray starts, naming the field. Started again with
the same name and storage, the curriculum continues from its first unfinished stage. Under `ray job submit` a
relative train.run.storage resolves under ~/condensation-runs (the job's own folder is a temporary copy). Then
(the command is printed at the start and the end):
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

from condensation.config import ConfigError, job_storage_base, rebase_storage, resolve, to_yaml
from condensation.curriculum import PRESETS, end_runs, load_curriculum_config, run_curriculum, stage_train_config
from condensation.train.tracking import tracking_uri


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


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
        cfg = load_curriculum_config(args.preset, args.config, args.overrides)
        # under `ray job submit` the cwd is a throw-away copy: relative storage goes under ~/condensation-runs
        base = job_storage_base(os.getcwd(), dict(os.environ), os.path.expanduser("~"))
        cfg = dataclasses.replace(cfg, train=rebase_storage(cfg.train, base))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0

    uri = tracking_uri(resolve(stage_train_config(cfg, 0)))  # the base config alone need not validate
    if cfg.train.tracking.enabled:
        print(f"run folders: {os.path.abspath(cfg.train.run.storage)}\ntracking: mlflow ui --backend-store-uri {uri}",
              flush=True)

    from condensation.train.runtime import init_ray, shutdown_ray

    init_ray(args.ray_address, joining=bool(os.environ.get("RAY_ADDRESS")), use_gpu=cfg.train.schedule.use_gpu)
    # `ray job stop` sends SIGTERM: end the MLflow runs as KILLED as Ctrl-C does (ray.init's handler just exits)
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.time()
    try:
        results = run_curriculum(cfg)
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler aborts the run and raises SystemExit
        shutdown_ray()  # the workers stop logging before the runs are marked
        end_runs(cfg, "KILLED")
        print(f"\ninterrupted; the same command continues curriculum {cfg.name!r} from its last checkpoint",
              file=sys.stderr)
        return 130
    except ConfigError as e:  # a config that cannot run on this cluster (e.g. workers + data tasks do not fit)
        end_runs(cfg, "FAILED")
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"\ncurriculum {cfg.name!r} finished in {time.time() - t0:.0f} s")
    for r in results:
        print(f"  stage {r.index} ({r.total_tokens} tokens): exact {r.exact:.2f}, per digit {r.digit:.2f}, "
              f"answer loss {r.answer_loss:.3f}{' (from an earlier run)' if r.skipped else ''}")
    if cfg.train.tracking.enabled:
        print(f"\nlook at the runs, heat maps and summary:\n    mlflow ui --backend-store-uri {uri}")
        print(f"or as one HTML page (with attention maps), logged back to MLflow:\n"
              f"    python dashboards/report.py --attention --tracking-uri {uri} "
              f"--experiment {cfg.train.tracking.experiment}")
        print(f"run folders and HF exports: {os.path.abspath(cfg.train.run.storage)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
