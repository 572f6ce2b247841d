"""Summarization (the paper's Table II, Fig. 9): finetune Condensation and a full-attention Llama the same way, add an
instruction model zero-shot, generate summaries, and score ROUGE-1/2/L by input length; tracked in MLflow.

    python workloads/summarize.py                        # embedded CPU default: SYNTHETIC data, tiny models, minutes
    python workloads/summarize.py --preset h200 data.train_sources=[/data/cnn/train.jsonl] data.eval_source=/data/cnn/test.jsonl
    python workloads/summarize.py --preset h200          # CNN/DailyMail from the hub (needs hub access)
    python workloads/make_summaries.py && python workloads/summarize.py --preset h200-manpages  # real, offline (man pages)
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python workloads/summarize.py --preset paper  # 3B, 8 GPUs, hub
    python workloads/summarize.py models=[instruct_zero_shot] data.eval_examples=20 generation.max_new_tokens=64
    python workloads/summarize.py --compare --experiment summarization               # Table II + Fig. 9 of all runs

Config: preset <- `--config file.yaml` <- `key.sub=value` overrides (fields in condensation.summarize and, under
`train.`, condensation.config). A bad config is one line `config error: <field>: <why>` (exit 2) before Ray starts.
Started again with the same name and storage, finished training and evaluations are not repeated. Printed: the
table in Table II's layout; written to <train.run.storage>/<name>/: rouge_table.md, rouge_overall.png (Fig. 9),
rouge_by_length.png, results.json, eval/<model>/predictions.jsonl (each prediction beside its reference). MLflow
(experiment `summarization`): a parent run with the table and pictures, one nested run per model; then
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
from condensation.summarize import PRESETS, check_inputs, compare_runs, end_runs, load_summarize_config, run_summarization
from condensation.train.tracking import tracking_uri


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def compare(args) -> int:
    uri = args.tracking_uri or f"sqlite:///{os.path.abspath('runs/mlflow.db')}"
    try:
        text, pictures = compare_runs(uri, args.experiment, args.out, parent=args.parent)
    except ValueError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 1
    print(text)
    print(f"\nwritten: {os.path.join(args.out, 'rouge_comparison.md')}, " + ", ".join(str(p) for p in pictures))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--config", default=None, help="a YAML file of overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--ray-address", default=None, help="ray.init address, e.g. auto for a cluster started with `ray start` "
                   "(default: the job's cluster under `ray job submit`, else a new local Ray)")
    p.add_argument("--compare", action="store_true", help="no run: Table II + Fig. 9 from the runs of --experiment")
    p.add_argument("--experiment", default="summarization", help="--compare: the MLflow experiment")
    p.add_argument("--parent", default=None, help="--compare: only the models of this comparison (its name or run id)")
    p.add_argument("--tracking-uri", default=None, help="--compare: the MLflow store (default sqlite:///runs/mlflow.db)")
    p.add_argument("--out", default="runs/summarize-compare", help="--compare: where the table and pictures go")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    if args.compare:
        return compare(args)
    try:
        cfg = load_summarize_config(args.preset, args.config, args.overrides)
        # under `ray job submit` the cwd is a throw-away copy: relative storage goes under ~/condensation-runs
        base = job_storage_base(os.getcwd(), dict(os.environ), os.path.expanduser("~"))
        cfg = dataclasses.replace(cfg, train=rebase_storage(cfg.train, base))
        storage = os.path.abspath(os.path.expanduser(cfg.train.run.storage))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, run=dataclasses.replace(cfg.train.run, storage=storage)))
        check_inputs(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    uri = tracking_uri(cfg.train)
    print(f"comparison folder: {cfg.folder}")
    if cfg.train.tracking.enabled:
        print(f"tracking: mlflow ui --backend-store-uri {uri}", flush=True)

    import transformers

    from condensation.train.runtime import init_ray, shutdown_ray

    transformers.logging.set_verbosity_error()  # "a model of type condensation to instantiate llama" is expected
    transformers.utils.logging.disable_progress_bar()
    init_ray(args.ray_address, joining=bool(os.environ.get("RAY_ADDRESS")), use_gpu=cfg.train.schedule.use_gpu)
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`: the MLflow runs end as KILLED, as with Ctrl-C
    t0 = time.time()
    try:
        result = run_summarization(cfg)
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler aborts the run and raises SystemExit
        shutdown_ray()
        end_runs(cfg, "KILLED")
        print(f"\ninterrupted; the same command continues {cfg.name!r}", file=sys.stderr)
        return 130
    except ConfigError as e:  # e.g. workers + data tasks that do not fit this cluster, no example fits
        end_runs(cfg, "FAILED")
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        end_runs(cfg, "FAILED")
        raise
    print(f"\n{cfg.name!r} finished in {time.time() - t0:.0f} s\n")
    print(open(os.path.join(result.folder, "rouge_table.md")).read())
    for m, why in result.skipped.items():
        print(f"{m}: left out: {why}")
    print(f"files: {result.folder} (rouge_table.md, rouge_overall.png, rouge_by_length.png, results.json, "
          f"eval/<model>/predictions.jsonl)")
    if cfg.train.tracking.enabled:
        print(f"mlflow: experiment {cfg.train.tracking.experiment!r}, parent run {cfg.name!r}: "
              f"mlflow ui --backend-store-uri {uri}")
        print(f"compare every run of the experiment: python workloads/summarize.py --compare "
              f"--experiment {cfg.train.tracking.experiment} --tracking-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
