"""What each Ray Train worker reserves, checked against the cluster before `trainer.fit()`.

Why: Ray Train reserves its workers' CPUs for the whole run and Ray Data schedules its tasks in what is left. When
the workers take so much that not even one data task fits (two workers at 0.9 CPU on 2 cores leave 0.2, a read
task asks 0.25), the run waits forever without a word. So the workers' share is derived from the cluster, leaving
room for the largest data task, and an explicit share that leaves none is an error naming the numbers.

    resources = worker_resources(cfg, datasets)   # {"CPU": c} (+ {"GPU": g}); raises ConfigError if it cannot fit
"""

from __future__ import annotations

import math

from ..config import ConfigError, TrainConfig

# the CPU share the data layer's stages ask (condensation.data: read, validate, tokenize, select); used when a
# dataset's plan cannot be read
DATA_TASK_CPUS = 0.25
# what a derived share leaves beside the workers: two such data tasks at a time keep a stream flowing
MIN_DATA_ROOM = 2 * DATA_TASK_CPUS
_EPS = 1e-6


def _plan_task_cpus(ds) -> float:
    """The largest CPU request among the not yet executed tasks of a Ray Dataset (0 when it needs none, e.g. a
    materialized dataset or in-memory items)."""
    try:
        ops, seen, largest = [ds._logical_plan.dag], set(), 0.0
        while ops:
            op = ops.pop()
            if id(op) in seen:
                continue
            seen.add(id(op))
            ops.extend(op.input_dependencies)
            args = getattr(op, "ray_remote_args", None)
            if isinstance(args, dict):  # an operator that runs Ray tasks; Ray's default is one CPU each
                cpus = args.get("num_cpus")
                largest = max(largest, 1.0 if cpus is None else float(cpus))
        return largest
    except Exception:  # a private Ray Data structure changed shape: assume the data layer's share
        return DATA_TASK_CPUS


def data_task_cpus(datasets: dict | None) -> float:
    """The largest CPU request of any data task the run's datasets will start."""
    return max((_plan_task_cpus(ds) for ds in (datasets or {}).values()), default=0.0)


def derive_cpus_per_worker(cluster_cpus: float, num_workers: int, data_cpus: float) -> float:
    """Each worker's CPU share: the cluster's CPUs less room for data tasks, split evenly; whole CPUs once a worker
    gets at least one, else rounded down to a twentieth."""
    share = (cluster_cpus - max(MIN_DATA_ROOM, data_cpus)) / num_workers
    return float(math.floor(share)) if share >= 1 else math.floor(share * 20 + _EPS) / 20


def plan_resources(cfg: TrainConfig, cluster: dict, data_cpus: float, gpu_nodes: list | None = None) -> dict:
    """`resources_per_worker` for `cfg` on a cluster of `cluster` resources (ray.cluster_resources()); raises
    ConfigError naming the field when a CPU run's workers and data tasks cannot all be scheduled.

    GPU runs are not refused: an autoscaling cluster (cluster/h100.yaml starts with no GPU node) adds nodes when
    Ray Train asks for them. Their derived CPU share comes from the GPU nodes present (`gpu_nodes`: (CPUs, GPUs)
    per node), one CPU per GPU worker when there are none yet."""
    s = cfg.schedule
    per = s.cpus_per_worker
    if s.use_gpu:
        if per is None:
            room = max(MIN_DATA_ROOM, data_cpus)
            # a node holds GPUs / gpus_per_worker workers (4 per GPU at 0.25)
            shares = [math.floor((c - room) / (g / s.gpus_per_worker)) for c, g in (gpu_nodes or []) if g > 0]
            per = float(max(1, min(shares))) if shares else 1.0
        return {"CPU": per, "GPU": s.gpus_per_worker}
    cpus = float(cluster.get("CPU", 0))
    if per is None:
        per = derive_cpus_per_worker(cpus, s.num_workers, data_cpus)
        if per <= 0:
            raise ConfigError("schedule.num_workers", f"{s.num_workers} workers do not fit on a cluster of {cpus:g} CPUs "
                                                      f"beside its data tasks ({data_cpus:g} CPU each); use fewer workers")
    elif s.num_workers * per + data_cpus > cpus + _EPS:
        most = math.floor((cpus - data_cpus) / s.num_workers * 100) / 100
        raise ConfigError(
            "schedule.cpus_per_worker",
            f"{s.num_workers} workers x {per:g} CPU + {data_cpus:g} CPU for a data task need "
            f"{s.num_workers * per + data_cpus:g} CPUs, the cluster has {cpus:g}; the run would wait forever. "
            f"Leave it unset (schedule.cpus_per_worker=null derives it) or set at most {max(most, 0):g}")
    return {"CPU": per}


def worker_resources(cfg: TrainConfig, datasets: dict | None) -> dict:
    """`plan_resources` against the running Ray cluster; says what each worker reserves."""
    import ray

    if not ray.is_initialized():
        ray.init()
    data_cpus = data_task_cpus(datasets)
    cluster = ray.cluster_resources()
    gpu_nodes = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    resources = plan_resources(cfg, cluster, data_cpus, gpu_nodes)
    free = ray.available_resources().get("CPU", 0.0)
    need = cfg.schedule.num_workers * resources["CPU"] + data_cpus
    note = "" if free + _EPS >= need else f"; only {free:g} CPUs are free now, so it waits for other work to finish"
    gpu = f" + {resources['GPU']:g} GPU" if cfg.schedule.use_gpu else ""
    if cfg.schedule.use_gpu and cluster.get("GPU", 0) < cfg.schedule.num_workers * cfg.schedule.gpus_per_worker:
        note += (f"; the cluster has {cluster.get('GPU', 0):g} GPUs now, so it waits for an autoscaler to add "
                 f"{cfg.schedule.num_workers}")
    print(f"[condensation.train] {cfg.schedule.num_workers} workers x {resources['CPU']:g} CPU"
          f"{gpu}"
          f"{' (derived from the cluster)' if cfg.schedule.cpus_per_worker is None else ''}, "
          f"data tasks {data_cpus:g} CPU each, cluster {ray.cluster_resources().get('CPU', 0):g} CPUs{note}", flush=True)
    return resources
