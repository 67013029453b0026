"""Connecting to Ray and sizing each stage's actor pool from the cluster's resources.

Stages never choose their own parallelism: they ask `plan_actors` and get a pool size, CPUs and
GPUs per actor and a batch size, derived from the config and what the cluster really has.
GPU requests are only made where GPUs exist (a GPU request on a CPU cluster waits forever).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import ray

from autoknow_ray.runtime_config import JobSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    device: str  # "cuda" or "cpu"
    rows_per_call: int = 1024  # Ray batch: the model sorts it by length into `batch_size` batches

    def as_dict(self) -> dict:
        return asdict(self)


def connect(cfg: JobSettings, address: str | None = None) -> dict:
    """Join `address` (or RAY_ADDRESS, or cfg.ray.address); otherwise start an embedded cluster."""
    global DRIVER_COMBINE_ROWS, SHUFFLE
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    DRIVER_COMBINE_ROWS = cfg.ray.driver_combine_rows
    SHUFFLE = cfg.ray.shuffle
    quiet_ray_data()
    if ray.is_initialized():
        return cluster_info()
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        kwargs = dict(
            num_cpus=cfg.ray.num_cpus,
            num_gpus=cfg.ray.num_gpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host=cfg.ray.dashboard_host,
            logging_level=logging.WARNING,
        )
        if cfg.ray.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
        ray.init(**kwargs)
    return cluster_info()


def _sees_file(path: str, token: str) -> bool:
    from autoknow_ray import storage

    p = storage.path(path)
    try:
        return p.is_file() and p.read_text() == token
    except OSError:  # an object store this node has no credentials or endpoint for
        return False


def _probe_on_node(node_id: str, path: str, token: str) -> bool:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_sees_file).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return bool(ray.get(task.remote(path, token), timeout=120))


def check_shared_storage(folders: dict[str, "Path"], nodes: list[str] | None = None,
                         probe=None) -> None:
    """Every node must see the run's folders (catalogue, models, run directory) at the same path:
    a node that cannot would write its tasks' output where no one reads it, or fail to read its
    input. On a multi-node cluster the driver writes a token file in each folder and a task pinned
    to every other node reads it back; a folder a node cannot see stops the job here, with the
    node and the folder named, before any row is processed. An object-store URI is checked the
    same way: every node reaches the bucket, but each needs its credentials and endpoint."""
    import uuid

    from autoknow_ray import storage

    if nodes is None:
        if not ray.is_initialized():
            return
        me = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != me
                 and n.get("Resources", {}).get("CPU", 0) > 0]
    others = nodes
    if not others:
        return
    probe = probe or _probe_on_node
    problems, remote = [], False
    for what, folder in folders.items():
        folder = storage.path(folder)
        if not folder.is_dir():
            continue
        token = uuid.uuid4().hex
        sentinel = folder / f".autoknow-shared-{token[:8]}"
        sentinel.write_text(token)
        try:
            for node in others:
                if not probe(node, str(sentinel), token):
                    problems.append(f"node {node[:12]} cannot see the {what} folder {folder}")
                    remote = remote or storage.is_remote(folder)
        finally:
            sentinel.unlink(missing_ok=True)
    if problems:
        raise RuntimeError(
            "storage not shared across the cluster: " + "; ".join(problems)
            + ". Put the catalogue, models and run directory on storage every node mounts at the "
            "same path (EFS, Filestore, NFS, a ReadWriteMany volume) or on an object store"
            + (" whose credentials and endpoint (AWS_* variables) every node has" if remote else "")
            + "; see docs/cluster.md.")


def run_task(fn, *args, cfg: JobSettings, num_cpus: float = 1, **kwargs):
    """`fn(*args, **kwargs)` in one Ray task, its result back to the driver: bounded work on a
    capped sample (a model over it, the samples it gathers with Ray Data) whose inputs and
    intermediate copies a head node should not hold. Ray Data inside the task runs with the
    run's settings, and models from an object store are copied to its node first."""
    global _TASK
    if _TASK is None:
        _TASK = ray.remote(max_retries=0)(_in_task)
    return ray.get(_TASK.options(num_cpus=num_cpus).remote(fn, args, kwargs, cfg,
                                                           tuple(_REMOTE_ARTIFACTS), RUN_CPU_BF16))


_TASK = None


def _in_task(fn, args, kwargs, cfg: JobSettings, artifacts: tuple = (), cpu_bf16: bool | None = None):
    import ray.data

    global DRIVER_COMBINE_ROWS, RUN_CPU_BF16, SHUFFLE
    DRIVER_COMBINE_ROWS = cfg.ray.driver_combine_rows
    SHUFFLE = cfg.ray.shuffle
    RUN_CPU_BF16 = cpu_bf16  # the steps this task starts get it too
    configure_data_context(ray.data.DataContext.get_current())
    if os.environ.get(RAY_BARS_ENV, "0") != "1":
        _quiet_ray_data_logs()  # its INFO lines would reach the driver's console
    _local_artifacts(artifacts)  # as before a step's setup()
    _worker_precision(cpu_bf16)
    return fn(*args, **kwargs)


# Ray Data's own operator bars ("Running Dataset …", "Parquet dataset sampling") are off: a
# run shows its own progress (stage, chunk and epoch lines, `autoknow_ray.progress`).
# AUTOKNOW_RAY_BARS=1 brings Ray Data's bars back, for looking inside a stage.
RAY_BARS_ENV = "AUTOKNOW_RAY_BARS"
_RAY_DATA_LOGGERS = ("ray.data", "ray.data._internal.execution.streaming_executor",
                     "ray.data._internal.progress.logging_progress", "ray.data.dataset",
                     "ray.data._internal.datasource.parquet_datasource")


class _NoFalseHangWarning(logging.Filter):
    """Drops Ray Data's "the cluster currently does not have any available CPUs … will hang"
    warning: it fires whenever every CPU is busy at the moment a dataset starts (a `run_task`
    task running Ray Data holds one, the stage's other work the rest), and the job waits its
    turn rather than hanging; a run that truly cannot schedule still fails on its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "does not have any available CPUs" not in record.getMessage()


def _filter_false_hang_warning() -> None:
    logger = logging.getLogger("ray.data.dataset")
    if not any(isinstance(f, _NoFalseHangWarning) for f in logger.filters):
        logger.addFilter(_NoFalseHangWarning())


def quiet_ray_data() -> None:
    """No Ray Data operator bars (unless AUTOKNOW_RAY_BARS=1) and no per-tick INFO logs (Ray
    Data logs each tick at INFO when stdout is not a terminal); -v brings the logs back."""
    import ray.data  # configures Ray Data's loggers: adjust them after

    configure_data_context(ray.data.DataContext.get_current())
    if not logging.getLogger("autoknow_ray").isEnabledFor(logging.INFO):
        _quiet_ray_data_logs()


def _quiet_ray_data_logs() -> None:
    for name in _RAY_DATA_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_data_context(ctx) -> None:
    """The house's Ray Data settings, one place for every run, the tasks that run Ray Data
    themselves (`run_task`) and the test session."""
    ctx.enable_progress_bars = os.environ.get(RAY_BARS_ENV, "0") == "1"
    # off on purpose: no "Progress bars disabled. To enable, set …" warning either
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.WARNING if ctx.enable_progress_bars else logging.ERROR)
    _filter_false_hang_warning()
    reserve_no_cpus_for_shuffles(ctx)
    parquet_reads_without_listing_tasks(ctx)
    shuffle_kind(ctx)


# the run's Ray Data shuffle (`ray.shuffle`); set by `connect` and in `run_task`'s tasks
SHUFFLE = "hash_shuffle"


def shuffle_kind(ctx) -> None:
    """Joins, groupbys and keyed repartitions through the run's shuffle (`ray.shuffle`). Ray
    2.60's default, `shuffle_v2` (map and reduce tasks), had a fixed cost per shuffle twice the
    aggregator actors' on 2 cores: a groupby of 30 rows 4.5 s against 2.1 s, a join 7.3 s
    against 3.0 s (warm Ray, docs/benchmarks.md "Ray Data's shuffle kind"). Ray's sort shuffle
    is cheaper still for a groupby (0.07 s) but cannot repartition by key."""
    from ray.data.context import ShuffleStrategy

    ctx.shuffle_strategy = ShuffleStrategy(SHUFFLE)


def reserve_no_cpus_for_shuffles(ctx) -> None:
    """Hash-shuffle aggregators (keyed repartition, join, groupby) reserve a share of the cluster's
    CPUs as a memory guard, and on a small cluster the aggregators of finished shuffles can hold
    them while the next read waits: every CPU reserved, the job hangs ("not enough resources to
    run any task from ReadFiles…"). They do little computing until finalisation, so they reserve
    a token share and the read, map and write tasks keep the CPUs."""
    ctx.hash_shuffle_operator_actor_num_cpus_override = 0.01


def parquet_reads_without_listing_tasks(ctx) -> None:
    """Parquet reads through Ray Data's first datasource, not the ListFiles -> ReadFiles chain
    it now defaults to. That chain lists the files in a task of its own before any read: measured
    on 2 cores (warm Ray, one 100-row file), reading and materialising took 1.7-4.3 s with the
    listing task (1.4-3 s of it the listing) and 0.1 s without; in a rebuild's stages the listing
    task took 2-7 s per read (eleven such reads in the related stage of a 120-product rebuild)."""
    ctx.use_datasource_v2 = False


def autoscaling_limits() -> dict[str, float]:
    """The most of each resource the cluster may scale to, from the autoscaler's cluster config
    (recorded in the GCS by autoscaler v2: KubeRay's and the launcher's, as we ship them); {}
    where no autoscaler describes the cluster."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception as e:  # an older GCS or no autoscaler: plan on what is there now
        log.debug("no autoscaling limits: %s", e)
        return {}
    return {k: float(v) for k, v in limits.items()}


def cluster_info() -> dict:
    res = ray.cluster_resources()
    limits = autoscaling_limits()
    return {
        "ray_version": ray.__version__,
        "cpus": float(res.get("CPU", 0)),
        "gpus": float(res.get("GPU", 0)),
        # what the autoscaler may start: GPU workers that scale from zero show 0 GPUs now
        "max_gpus": max(float(res.get("GPU", 0)), limits.get("GPU", 0.0)),
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "object_store_gb": round(res.get("object_store_memory", 0) / 2**30, 2),
    }


def plan_actors(cfg: JobSettings, stage: str, n_rows: int | None = None,
                cluster: dict | None = None) -> ActorPlan:
    """The pool for `stage` on `cluster` (default: the connected one, see `cluster_info`).

    GPUs are planned on what the cluster may have, not only on what it has now: `ray.max_gpus`
    in the config, else the autoscaler's limit. A GPU pool on a cluster whose GPU workers scale
    from zero then asks for them, and the autoscaler starts them, instead of the models running
    on the head's CPUs."""
    res = cfg.stage_resources(stage)
    info = cluster if cluster is not None else cluster_info()
    cpus = info["cpus"]
    gpus = info.get("gpus", 0.0)
    if cfg.ray.max_gpus is not None:
        gpus = float(cfg.ray.max_gpus)
    elif info.get("max_gpus"):
        gpus = max(gpus, float(info["max_gpus"]))
    use_gpu = gpus >= 1 and cfg.device != "cpu" and res.gpus_per_actor != 0
    if use_gpu:
        per_gpu = (
            1.0 / max(1, res.actors_per_gpu)
            if res.gpus_per_actor == "auto"
            else float(res.gpus_per_actor)
        )
        actors = int(gpus / per_gpu) if res.actors == "auto" else int(res.actors)
        plan = ActorPlan(max(1, actors), res.cpus_per_gpu_actor, per_gpu, res.batch_size, "cuda",
                         res.rows_per_call)
    else:
        free = max(res.cpus_per_actor, cpus - res.reserve_cpus)
        actors = (
            max(1, int(math.floor(free / res.cpus_per_actor + 1e-9)))
            if res.actors == "auto"
            else int(res.actors)
        )
        plan = ActorPlan(max(1, actors), res.cpus_per_actor, 0.0, res.batch_size, "cpu", res.rows_per_call)
    if n_rows is not None:
        # more actors than batches only costs model loads
        plan = ActorPlan(
            max(1, min(plan.actors, math.ceil(max(n_rows, 1) / plan.batch_size))),
            plan.num_cpus,
            plan.num_gpus,
            plan.batch_size,
            plan.device,
            plan.rows_per_call,
        )
    return plan


def actor_pool_kwargs(plan: ActorPlan, batch_size: int | None = None) -> dict:
    """Keyword arguments for `Dataset.map_batches` with a fixed-size actor pool; `batch_size`
    (rows per actor call) defaults to the plan's model batch."""
    kw = dict(
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        batch_size=batch_size or plan.batch_size,
        num_cpus=plan.num_cpus,
    )
    if plan.num_gpus:
        kw["num_gpus"] = plan.num_gpus
    return kw


# ---- the one adapter from the stage protocol (autoknow_ray.steps) to Ray Data ---------------
def rows_per_call(plan: ActorPlan, n_rows: int | None) -> int:
    """Rows per worker call: large enough for length-sorted model batches (less padding), small
    enough that every worker gets several calls."""
    if not n_rows:
        return plan.rows_per_call
    return max(plan.batch_size, min(plan.rows_per_call, -(-n_rows // max(1, plan.actors * 4))))


# (URI, local folder) of the models a rebuild reads from an object store (`use_remote_models`)
_REMOTE_ARTIFACTS: list[tuple[str, str]] = []


def use_models(models):
    """The models folder this job's stages read, local. Models in an object store are copied to
    the driver's disk (that copy is returned) and, for the workers, to the same folder on each
    node before a step's setup(); a local folder is returned as it is."""
    from autoknow_ray import storage

    _REMOTE_ARTIFACTS.clear()
    if models is None or not storage.is_remote(models):
        return models
    local = storage.local_copy(models)
    _REMOTE_ARTIFACTS.append((str(models), str(local)))
    return local


# The run's bf16 / fp32 decision for `auto` inference on CPU (`run_precision`), handed to every
# step's worker with its WorkerEnv and to `run_task`'s tasks; None outside a rebuild.
RUN_CPU_BF16: bool | None = None


def model_bf16(device: str) -> bool:
    """bf16 or fp32 for a model step's inference on `device`, one answer for every worker (so a
    cached output can name its precision): on GPU bf16; on CPU the run's one decision
    (`run_precision`), else, outside a rebuild, a probe in this process."""
    from autoknow_ray.nn.encoder import cpu_bf16_pays

    if device == "cuda":
        return True
    if RUN_CPU_BF16 is not None:
        return RUN_CPU_BF16
    return bool(cpu_bf16_pays())
PRECISION_FILE = "precision.json"
# the one probe of a fit or a rebuild (`nn.encoder.cpu_bf16_pays`) may take longer than a
# worker's used to: more alternating rounds, less at the mercy of a load burst (~1 s)
PROBE_ROUNDS = 8


def cpu_kind() -> str:
    """This machine's kind of CPU (`nn.encoder.cpu_kind`): where fit's precision holds."""
    from autoknow_ray.nn.encoder import cpu_kind as kind

    return kind()


def fit_precision(cfg: JobSettings, models) -> dict:
    """The CPU precision fit decides for its models on this CPU (one probe on the driver),
    written to MODELS/precision.json: every rebuild with these models on the same kind of CPU
    infers at it (`run_precision`), so two rebuilds of one catalogue agree whatever a probe
    would say on the night."""
    import json

    from autoknow_ray.nn.encoder import cpu_bf16_pays

    out = {"cpu": cpu_kind(),
           "cpu_bf16": False if cfg.device == "cuda" else bool(cpu_bf16_pays(rounds=PROBE_ROUNDS))}
    (models / PRECISION_FILE).write_text(json.dumps(out, indent=2))
    return out


def run_precision(cfg: JobSettings, run_dir, previous=None, models=None) -> dict:
    """One bf16 / fp32 decision for the models every stage of this run infers with on CPU
    (settings left at `auto`), made once on the driver: without it each worker process timed
    bf16 against fp32 for itself, and on a loaded machine the probe tipped either way, so two
    rebuilds of one catalogue scored some rows in bf16 and others in fp32 (docs/incremental.md).
    In order: the decision this run already recorded (a resumed run keeps its precision), the
    previous run's (`--previous`: its cached outputs stay reusable), the models' (fit's probe,
    where this is the same kind of CPU: `fit_precision`), else a probe here
    (`nn.encoder.cpu_bf16_pays`). GPU workers use bf16 under `auto` whatever this says.
    Recorded in RUN/precision.json; returns what it wrote."""
    import json

    from autoknow_ray import storage

    def recorded(folder) -> dict:
        p = storage.path(folder) / PRECISION_FILE
        try:
            got = json.loads(p.read_text()) if p.exists() else {}
        except (OSError, ValueError):
            return {}
        return got if isinstance(got.get("cpu_bf16"), bool) else {}

    mine = recorded(run_dir)
    if mine:
        return {**mine, "decided_by": "this run, recorded before a resume"}
    before = recorded(previous) if previous is not None else {}
    if not before and previous is not None:
        # a run from before this file: its title models' cached precision
        from autoknow_ray.pipeline import read_manifest

        cache = ((read_manifest(storage.path(previous) / "taxonomy").get("cache") or {})
                 .get("title_models") or {})
        if cache.get("device") == "cpu" and isinstance(cache.get("bf16"), bool):
            before = {"cpu_bf16": cache["bf16"]}
    fitted = recorded(models) if models is not None else {}
    if before:
        out = {"cpu_bf16": before["cpu_bf16"], "decided_by": "previous run"}
    elif fitted and fitted.get("cpu") == cpu_kind():
        out = {"cpu_bf16": fitted["cpu_bf16"], "decided_by": "the models' fit, on this kind of CPU"}
    elif cfg.device == "cuda":
        out = {"cpu_bf16": False, "decided_by": "device cuda: no model runs on CPU"}
    else:
        from autoknow_ray.nn.encoder import cpu_bf16_pays, cpu_has_bf16

        out = {"cpu_bf16": bool(cpu_bf16_pays(rounds=PROBE_ROUNDS)),
               "decided_by": "probe on the driver" if cpu_has_bf16() else "no bf16 units"}
    (storage.path(run_dir) / PRECISION_FILE).write_text(json.dumps(out, indent=2))
    return out


def set_run_precision(cpu_bf16: bool | None) -> None:
    """The run's decision (`run_precision`) for this driver and the workers of its steps; None
    clears it."""
    global RUN_CPU_BF16
    RUN_CPU_BF16 = cpu_bf16
    _worker_precision(cpu_bf16)


def _worker_env(plan: ActorPlan) -> "WorkerEnv":
    from autoknow_ray.steps import WorkerEnv

    threads = max(1, int(plan.num_cpus)) if plan.device == "cpu" else 1
    return WorkerEnv(device=plan.device, cpu_threads=threads, batch_size=plan.batch_size,
                     artifacts=tuple(_REMOTE_ARTIFACTS), cpu_bf16=RUN_CPU_BF16)


def _worker_precision(cpu_bf16: bool | None) -> None:
    """The run's CPU precision in this worker process (an environment variable that
    `nn.encoder.inference_bf16` reads; set or cleared for every step, since Ray reuses worker
    processes across steps and runs). Does not import torch."""
    import os

    from autoknow_ray.steps import RUN_CPU_BF16_ENV

    if cpu_bf16 is None:
        os.environ.pop(RUN_CPU_BF16_ENV, None)
    else:
        os.environ[RUN_CPU_BF16_ENV] = "1" if cpu_bf16 else "0"


def _local_artifacts(artifacts) -> None:
    """Models from an object store on this node's disk, at the path the driver's copy has."""
    if artifacts:
        from pathlib import Path

        from autoknow_ray import storage

        for uri, local in artifacts:
            storage.local_copy(uri, Path(local))


def _setup(step, env) -> None:
    """A step's setup() on this worker, after its node has the artifacts it reads and with the
    run's CPU precision."""
    _local_artifacts(env.artifacts)
    _worker_precision(getattr(env, "cpu_bf16", None))
    step.setup(env)


class _StepActor:
    """Hosts one step in a Ray Data actor: the step arrives once through the object store and
    `setup()` runs once per actor."""

    def __init__(self, step_ref: list, env):
        self.step = ray.get(step_ref[0])
        _setup(self.step, env)

    def __call__(self, batch):
        from autoknow_ray.steps import as_table

        return self.step.process_batch(as_table(batch))


def _actor_class(step) -> type:
    """`_StepActor` under the step's name (`title_models` -> `TitleModels`), so Ray Data's
    operators, progress bars and worker processes say which step they run."""
    name = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^0-9A-Za-z]+", step.name) if w)
    if not name or not name[0].isalpha():
        return _StepActor
    return type(name, (_StepActor,), {"__module__": __name__, "__qualname__": name})


def _run_step_task(batch, step_ref: list, env):
    from autoknow_ray.steps import as_table

    step = ray.get(step_ref[0])
    _setup(step, env)
    return step.process_batch(as_table(batch))


def hosts_model(step) -> bool:
    """Whether `step` runs in an actor pool (one setup() per actor). The flag is the class's
    `model` (a Chain sets its own): a step that keeps its loaded model in an attribute of the
    same name (`self.model = None` in `__init__`) would otherwise turn the flag off and run as
    tasks, its setup() (models, node tables) again for every batch."""
    flag = step.model
    return flag if isinstance(flag, bool) else bool(getattr(type(step), "model", False))


def map_step(ds: "ray.data.Dataset", step, cfg: JobSettings, n_rows: int | None = None,
             repartition: bool = True) -> "ray.data.Dataset":
    """Run `step` (autoknow_ray.steps.Step) over `ds`: an actor pool for model steps, tasks for
    the rest, sized by the config's resource plan for `step.resources`. `n_rows` (when known)
    keeps small inputs from starting more actors than there are calls, and splits a dataset that
    arrived as one block so every worker gets work. A model step over a small input on CPU
    (`warm_tasks`) runs the pool's calls as tasks in warm worker processes instead, one setup()
    per process; above that size, and on GPU, the actor pool is as before."""
    plan = plan_actors(cfg, step.resources, n_rows)
    if getattr(step, "rows_per_call", None):  # a cheap step's larger calls (steps.Step)
        plan = replace(plan, rows_per_call=max(plan.rows_per_call, int(step.rows_per_call)))
    per_call = rows_per_call(plan, n_rows)
    if step.columns:
        ds = ds.select_columns(list(step.columns))
    if repartition and n_rows and getattr(step, "split_input", True):
        ds = ds.repartition(target_num_rows_per_block=per_call)
    ref = [ray.put(step)]
    env = _worker_env(plan)
    warm = hosts_model(step) and not fixed_pool(cfg, step) and warm_tasks(plan, n_rows)
    if (hosts_model(step) or plan.num_gpus) and not warm:
        return ds.map_batches(_actor_class(step), fn_constructor_kwargs={"step_ref": ref, "env": env},
                              batch_format="pyarrow", **actor_pool_kwargs(plan, per_call))
    if warm:
        # a small input on CPU: the same calls as the pool's, as at most `plan.actors` tasks at
        # a time in the house's warm worker processes, each setting the step up once
        import uuid

        return ds.map_batches(_run_warm_step_task, batch_format="pyarrow", batch_size=per_call,
                              num_cpus=plan.num_cpus,
                              fn_kwargs={"step_ref": ref, "env": env, "token": uuid.uuid4().hex},
                              compute=ray.data.TaskPoolStrategy(size=plan.actors))
    return ds.map_batches(_run_step_task, fn_kwargs={"step_ref": ref, "env": env},
                          batch_format="pyarrow", batch_size=per_call, num_cpus=plan.num_cpus)


def fixed_pool(cfg: JobSettings, step) -> bool:
    """Whether the config fixes the size of `step`'s pool (`actors: n`, not `auto`)."""
    return cfg.stage_resources(step.resources).actors != "auto"


def warm_tasks(plan: ActorPlan, n_rows: int | None) -> bool:
    """Whether a model step runs as tasks in warm worker processes instead of an actor pool:
    on CPU, for an input of at most one call per actor of the plan (`rows_per_call` x `actors`
    rows), where the config leaves the pool's size to the plan (`actors: auto`; a fixed pool,
    as `autoknow bench` sets, is always an actor pool). An actor pool starts a fresh process per
    actor for every execution, which imports torch and transformers again: measured on 2 cores (5 Dec 2026), an actor pool of a step
    that does nothing took 1.9-2.4 s, one that imports torch 3.6-3.8 s, and the same as tasks
    in warm workers 0.1 s; a small catalogue's rebuild runs a dozen model steps. Larger inputs
    and GPU plans keep their actor pools exactly as before."""
    return (n_rows is not None and not plan.num_gpus and plan.device == "cpu"
            and n_rows <= plan.rows_per_call * plan.actors)


# The step a warm task worker has set up: (token of its map_step call, step), and the timer that
# drops it once its execution has gone quiet, so no model outlives its step for long.
_WARM_STEP: tuple | None = None
_WARM_TIMER = None
WARM_STEP_IDLE_S = 5.0


def _drop_warm_step(token: str) -> None:
    global _WARM_STEP
    import gc

    if _WARM_STEP is not None and _WARM_STEP[0] == token:
        _WARM_STEP = None
        gc.collect()


def _run_warm_step_task(batch, step_ref: list, env, token: str):
    """One call of a model step in a task: the step is set up once per worker process and
    map_step call (`token`), kept for that call's later batches, and dropped when none has come
    for `WARM_STEP_IDLE_S` seconds or another step arrives."""
    import threading

    from autoknow_ray.steps import as_table

    global _WARM_STEP, _WARM_TIMER
    if _WARM_TIMER is not None:
        _WARM_TIMER.cancel()
    cached = _WARM_STEP  # one read: the timer may clear the global meanwhile
    if cached is None or cached[0] != token:
        _WARM_STEP = cached = None  # the previous step's model goes before this one loads
        step = ray.get(step_ref[0])
        _setup(step, env)
        _WARM_STEP = cached = (token, step)
    step = cached[1]
    try:
        return step.process_batch(as_table(batch))
    finally:
        _WARM_TIMER = threading.Timer(WARM_STEP_IDLE_S, _drop_warm_step, args=(token,))
        _WARM_TIMER.daemon = True
        _WARM_TIMER.start()


def read_parquet(path, columns: list[str] | None = None) -> "ray.data.Dataset":
    """A stage table (one Parquet file, a folder of shards, or a list of files) as a Ray Dataset."""
    ds = ray.data.read_parquet([str(p) for p in path] if isinstance(path, (list, tuple)) else str(path))
    return ds.select_columns(columns) if columns else ds


_AGGS = {"count": "Count", "sum": "Sum", "mean": "Mean", "min": "Min", "max": "Max",
         "unique": "Unique"}
# Functions whose per-block partials combine exactly: count and sum add up, min and max of the
# partials, mean from partial sums and counts.
_COMBINABLE = {"count", "sum", "mean", "min", "max"}
# Partial aggregates (one row per key per block) up to this many rows are combined on the
# driver; above it, a Ray Data groupby over the partials combines them in the workers. Either
# way the driver holds aggregates only, never the input rows. `connect` sets it from the config
# (`ray.driver_combine_rows`).
DRIVER_COMBINE_ROWS = 200_000


def _partial_exprs(aggs: dict[str, tuple[str, str | None]]):
    import polars as pl

    exprs = []
    for out, (fn, col) in aggs.items():
        if fn == "count":
            exprs.append(pl.len().cast(pl.Int64).alias(out))
        elif fn == "sum":
            exprs.append(pl.col(col).sum().alias(out))
        elif fn == "mean":
            exprs += [pl.col(col).cast(pl.Float64).sum().alias(f"{out}__sum"),
                      pl.col(col).count().cast(pl.Int64).alias(f"{out}__n")]
        else:
            exprs.append(getattr(pl.col(col), fn)().alias(out))
    return exprs


def _combine_exprs(aggs: dict[str, tuple[str, str | None]]):
    import polars as pl

    exprs = []
    for out, (fn, _col) in aggs.items():
        if fn in ("count", "sum"):
            exprs.append(pl.col(out).sum().alias(out))
        elif fn == "mean":
            exprs += [pl.col(f"{out}__sum").sum().alias(f"{out}__sum"),
                      pl.col(f"{out}__n").sum().alias(f"{out}__n")]
        else:
            exprs.append(getattr(pl.col(out), fn)().alias(out))
    return exprs


def _finish_means(df, aggs):
    import polars as pl

    for out, (fn, _col) in aggs.items():
        if fn == "mean":
            df = df.with_columns(pl.when(pl.col(f"{out}__n") > 0)
                                 .then(pl.col(f"{out}__sum") / pl.col(f"{out}__n"))
                                 .otherwise(None).alias(out)).drop(f"{out}__sum", f"{out}__n")
    return df.select([*[c for c in df.columns if c not in aggs], *aggs])


def aggregate(ds: "ray.data.Dataset", by: list[str], aggs: dict[str, tuple[str, str | None]],
              num_partitions: int | None = None, driver_rows: int | None = None):
    """Per-key aggregates of a distributed table, as a polars DataFrame on the driver (one row per
    key: per-type and per-term figures, never per product). `aggs` maps an output column to
    (function, input column): {"n": ("count", None), "score": ("mean", "score")}.

    Two phases, as a combiner does: each block is aggregated in its own task (one row per key
    per block), then the partials are combined: on the driver when they are at most
    `driver_rows` rows (default: the config's `ray.driver_combine_rows`; a small catalogue or
    few keys: Ray Data's shuffle costs seconds of fixed overhead per call), else by a Ray Data
    groupby over the partials with `num_partitions` partitions (Ray's default is 200, a task each: size it to the rows, see
    `shuffle_partitions`). `unique` has no partial form and runs as one Ray Data groupby."""
    import polars as pl

    for out, (fn, _col) in aggs.items():
        if fn not in _AGGS:
            raise ValueError(f"aggregate {out!r}: unknown function {fn!r}; known {sorted(_AGGS)}")
    if not all(fn in _COMBINABLE for fn, _ in aggs.values()):
        return _ray_groupby(ds, by, {o: (fn, c) for o, (fn, c) in aggs.items()}, num_partitions)
    parts_ds = _partials(ds, by, aggs)
    if parts_ds.count() <= (DRIVER_COMBINE_ROWS if driver_rows is None else driver_rows):
        parts = [pl.from_arrow(t) for t in ray.get(parts_ds.to_arrow_refs())]
        parts = [p for p in parts if p.height]
        if not parts:
            return pl.DataFrame()
        merged = pl.concat(parts, how="vertical_relaxed").group_by(by).agg(_combine_exprs(aggs))
        return _finish_means(merged, aggs)
    merged = _ray_groupby(parts_ds, by, _combine_aggs(aggs), num_partitions)
    return _finish_means(merged, aggs) if merged.height else merged


def _partial_block(batch, by, aggs):
    """One block's rows aggregated per key (a partial: one row per key per block)."""
    import polars as pl
    import pyarrow as pa

    if batch.num_rows == 0:
        return pa.table({})
    # float sums in float64: a float32 sum's last bits follow the order of the blocks, and
    # an incremental rebuild (autoknow_ray/incremental.py) holds its rows in other blocks
    # than a full one
    frame = pl.from_arrow(batch).with_columns(pl.col(pl.Float32).cast(pl.Float64))
    return frame.group_by(by).agg(_partial_exprs(aggs)).to_arrow()


def _partials(ds, by, aggs):
    """Each block of `ds` aggregated per key in its own task, materialised."""
    # only the key and input columns travel to the tasks (and through polars): a per-product
    # table's other columns (vectors, descriptions) are neither read nor converted
    needed = list(dict.fromkeys([*by, *(c for _fn, c in aggs.values() if c)]))
    return ds.select_columns(needed).map_batches(
        _partial_block, fn_kwargs={"by": list(by), "aggs": dict(aggs)},
        batch_format="pyarrow").materialize()


def _combine_aggs(aggs):
    """The aggregations that combine partials (`_partial_exprs`' columns) in a Ray groupby."""
    combine = {}
    for out, (fn, _col) in aggs.items():
        if fn == "mean":
            combine[f"{out}__sum"] = ("sum", f"{out}__sum")
            combine[f"{out}__n"] = ("sum", f"{out}__n")
        else:
            combine[out] = ("sum" if fn == "count" else fn, out)
    return combine


def _ray_groupby(ds, by, aggs, num_partitions):
    import polars as pl
    import ray.data.aggregate as A

    fns = []
    for out, (fn, col) in aggs.items():
        cls = getattr(A, _AGGS[fn])
        fns.append(cls(alias_name=out) if fn == "count" else cls(col, alias_name=out))
    try:
        table = ray.get(ds.groupby(by if len(by) > 1 else by[0], num_partitions=num_partitions
                                   ).aggregate(*fns).to_arrow_refs())
    except Exception:
        # Ray Data's shuffle fails on an input with no rows at all (its reduce gets blocks
        # without columns: "No match for FieldRef"); no rows means no keys
        if ds.count() == 0:
            return pl.DataFrame()
        raise
    parts = [pl.from_arrow(t) for t in table]
    parts = [p for p in parts if p.height]
    return pl.concat(parts, how="vertical_relaxed") if parts else pl.DataFrame()


def shuffle_partitions(n_rows: int | None, rows_per_partition: int = 500_000) -> int:
    """Partitions for a groupby over `n_rows` rows: one per `rows_per_partition`, at least 1."""
    return max(1, min(200, -(-(n_rows or 0) // rows_per_partition)))


# ---- keyed aggregation capped in the workers --------------------------------------------------
class TopKeys(NamedTuple):
    """`top_keys`' answer: the kept keys and what was left out, counted."""

    rows: "pl.DataFrame"  # the kept keys with their aggregates, in rank order
    keys: int  # distinct keys of the whole table (before `drop` and the caps)
    dropped: dict  # reason -> keys removed by `drop`
    left_out: int  # keys past the caps: keys - sum(dropped) - kept

    @property
    def truncated(self) -> bool:
        return self.left_out > 0


def _rank(frame, by, order_by):
    """`frame` in rank order: `order_by`'s columns, then the key columns ascending (nulls last
    everywhere), so equal figures are ordered by key, never by the order rows arrived in."""
    cols = [c for c, _ in order_by] + [c for c in by if c not in {c for c, _ in order_by}]
    desc = [d == "desc" for _, d in order_by] + [False] * (len(cols) - len(order_by))
    return frame.sort(cols, descending=desc, nulls_last=True, maintain_order=True)


def _cap_frame(frame, spec: dict):
    """The complete per-key rows of `frame` after `drop` and the caps, and their counts
    ({"keys", "dropped", "kept"}). Every key of `frame` is final (all its rows aggregated)."""
    import polars as pl

    counts = {"keys": frame.height, "dropped": {r: 0 for r in spec["drop"]}}
    for reason, expr in spec["drop"].items():
        if frame.height:
            mask = frame.select(expr.fill_null(False).alias("_m"))["_m"]
            counts["dropped"][reason] = int(mask.sum())
            frame = frame.filter(~mask)
    frame = _rank(frame, spec["by"], spec["order_by"])
    if spec["per_group"] is not None and frame.height:
        cols, k = spec["per_group"]
        frame = frame.filter(pl.int_range(pl.len()).over(list(cols)) < k)
    frame = frame.head(spec["cap"])
    counts["kept"] = frame.height
    return frame, counts


def _cap_block(spec: dict, table):
    """A block of complete per-key aggregates (a Ray groupby's output) capped in its task."""
    import polars as pl

    if table.num_rows == 0:
        return table, {"keys": 0, "dropped": {r: 0 for r in spec["drop"]}, "kept": 0}
    frame = _finish_means(pl.from_arrow(table), spec["aggs"])
    frame, counts = _cap_frame(frame, spec)
    return frame.to_arrow(), counts


def _merge_capped(spec: dict, *parts):
    """Capped blocks merged and capped again; their counts added up. The keys of the blocks
    are disjoint (each key's aggregate is complete in one block), so the counts add."""
    import polars as pl

    frames = [pl.from_arrow(t) for t, _c in parts if t.num_rows]
    dropped = {r: sum(c["dropped"][r] for _t, c in parts) for r in spec["drop"]}
    keys = sum(c["keys"] for _t, c in parts)
    if not frames:
        return parts[0][0].slice(0, 0) if parts else None, {"keys": keys, "dropped": dropped,
                                                             "kept": 0}
    frame, _ = _cap_frame(pl.concat(frames, how="vertical_relaxed"), {**spec, "drop": {}})
    return frame.to_arrow(), {"keys": keys, "dropped": dropped, "kept": frame.height}


_CAP_BLOCK = None
_MERGE_CAPPED = None


def top_keys(ds: "ray.data.Dataset", by: list[str], aggs: dict[str, tuple[str, str | None]],
             cap: int, order_by: list[tuple[str, str]], per_group: tuple[list[str], int] | None = None,
             drop: dict | None = None, num_partitions: int | None = None,
             driver_rows: int | None = None, merge_group: int | None = None) -> TopKeys:
    """`aggregate`, capped in the workers: the `cap` keys that rank first by `order_by`
    ([(column, "desc" | "asc")], ties broken by the `by` columns ascending, nulls last), at most
    `per_group[1]` of them per value of the `per_group[0]` columns (a subset of `by`), after
    leaving out the keys any `drop` expression (reason -> polars expression over the aggregated
    row) holds for. Returns `TopKeys`: the rows in rank order, the number of distinct keys, the
    keys dropped per reason, and the keys the caps left out. Exact wherever the caps are not
    reached; where they are, the result depends on the table only, never on its blocks, their
    order or the parallelism.

    What reaches the driver is bounded whatever the table's size:
    - partials (one row per key per block, as `aggregate` makes them) up to `driver_rows`
      (default: `DRIVER_COMBINE_ROWS`, the config's `ray.driver_combine_rows`) are combined and
      capped on the driver: a small table costs no shuffle;
    - above it, a Ray Data groupby over the partials hash-partitions them by key, so each key's
      aggregate is complete in exactly one output row (no block holds a partial sum). Each
      output block is capped in its own task; the capped blocks are merged and capped again in
      tasks, `merge_group` at a time (default max(4, `DRIVER_COMBINE_ROWS` // cap)), until one
      remains: the driver receives at most `cap` rows and the counts.
    Capping complete rows is exact: a key in the global answer is in the answer of every
    subset that holds it (per group and overall, fewer rows can only rank above it), so no
    merge loses it. A top-N of per-block partial sums would not be: a key's sum is spread over
    blocks, and its parts can each miss their block's top while the whole ranks first."""
    import polars as pl

    global _CAP_BLOCK, _MERGE_CAPPED
    for out, (fn, _col) in aggs.items():
        if fn not in _COMBINABLE:
            raise ValueError(f"top_keys {out!r}: {fn!r} has no partial form; known "
                             f"{sorted(_COMBINABLE)}")
    if cap < 0:
        raise ValueError(f"top_keys: cap {cap} < 0")
    if per_group is not None and not set(per_group[0]) <= set(by):
        raise ValueError(f"top_keys: per_group columns {per_group[0]} not all in {by}")
    spec = {"by": list(by), "aggs": dict(aggs), "order_by": [(c, d) for c, d in order_by],
            "cap": int(cap), "drop": dict(drop or {}),
            "per_group": None if per_group is None else (list(per_group[0]), int(per_group[1]))}
    for c, d in spec["order_by"]:
        if d not in ("asc", "desc"):
            raise ValueError(f"top_keys: order of {c!r} is {d!r}, not 'asc' or 'desc'")
    parts_ds = _partials(ds, by, aggs)
    n_parts = parts_ds.count()
    if n_parts == 0:
        return TopKeys(pl.DataFrame(), 0, {r: 0 for r in spec["drop"]}, 0)
    if n_parts <= (DRIVER_COMBINE_ROWS if driver_rows is None else driver_rows):
        parts = [pl.from_arrow(t) for t in ray.get(parts_ds.to_arrow_refs())]
        merged = pl.concat([p for p in parts if p.height], how="vertical_relaxed")
        merged = _finish_means(merged.group_by(by).agg(_combine_exprs(aggs)), aggs)
        rows, counts = _cap_frame(merged, spec)
        return TopKeys(rows, counts["keys"], counts["dropped"],
                       counts["keys"] - sum(counts["dropped"].values()) - rows.height)
    import ray.data.aggregate as A

    fns = []
    for out, (fn, col) in _combine_aggs(aggs).items():
        fns.append(getattr(A, _AGGS[fn])(col, alias_name=out))
    parts_n = num_partitions or max(int(ray.cluster_resources().get("CPU", 1)),
                                    shuffle_partitions(n_parts))
    grouped = parts_ds.groupby(by if len(by) > 1 else by[0], num_partitions=parts_n).aggregate(*fns)
    if _CAP_BLOCK is None:
        _CAP_BLOCK = ray.remote(_cap_block)
        _MERGE_CAPPED = ray.remote(_merge_capped)
    refs = [_CAP_BLOCK.remote(spec, ref) for ref in grouped.to_arrow_refs()]
    group = max(2, merge_group or max(4, DRIVER_COMBINE_ROWS // max(1, cap)))
    while len(refs) > 1:
        refs = [_MERGE_CAPPED.remote(spec, *refs[i:i + group]) for i in range(0, len(refs), group)]
    table, counts = ray.get(refs[0]) if refs else _merge_capped(spec)
    rows = pl.from_arrow(table) if table is not None and table.num_rows else pl.DataFrame()
    return TopKeys(rows, counts["keys"], counts["dropped"],
                   counts["keys"] - sum(counts["dropped"].values()) - rows.height)


# The column a sample's partial results carry: each row's draw (a 64-bit hash of its key and the
# seed); dropped before the sample is returned.
_DRAW = "__bounded_sample_draw"
_U64 = (1 << 64) - 1


def _value_bytes(col) -> list[bytes]:
    """Each value of the Arrow column `col` as bytes that tell its type class and its length, so
    a concatenation of several columns' values is unambiguous (null, "", 0 and "0" all differ)."""
    import pyarrow as pa

    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        tag, vals = b"s", col.cast(pa.large_binary()).to_pylist()
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        tag, vals = b"b", col.cast(pa.large_binary()).to_pylist()
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        tag, vals = b"i", [None if v is None else str(int(v)).encode() for v in col.to_pylist()]
    else:  # floats, lists, structs, vectors: Python's repr of the value (exact for floats)
        tag, vals = b"r", [None if v is None else repr(v).encode() for v in col.to_pylist()]
    return [b"n" if v is None else tag + len(v).to_bytes(4, "little") + v for v in vals]


def _key_columns(table, key) -> list[str]:
    """The columns of `table` that `key` names: `key` itself (a column, or a list of columns);
    all columns when `key` is None, or is the default "product_id" and the table has none."""
    if key is None:
        return [c for c in table.column_names if c != _DRAW]
    cols = [key] if isinstance(key, str) else list(key)
    missing = [c for c in cols if c not in table.column_names]
    if missing and cols == ["product_id"]:
        return [c for c in table.column_names if c != _DRAW]
    if missing:
        raise KeyError(f"bounded_sample: key column(s) {missing} not in {table.column_names}")
    return cols


def row_draws(table, key, seed: int) -> "np.ndarray":
    """A pseudo-random uint64 per row of the Arrow `table`: blake2b of the seed and the row's
    `key` (see `_key_columns`; several columns hash their values' concatenation). The same key
    and seed give the same draw on every worker, in every process and run."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    prefix = (int(seed) & _U64).to_bytes(8, "little")
    blake2b = hashlib.blake2b
    names = _key_columns(table, key)
    if not names:  # a table without columns: nothing tells its rows apart
        return np.zeros(table.num_rows, dtype=np.uint64)
    col = table.column(names[0])
    if len(names) == 1 and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        # one text column (an id): its bytes as they are, no length to tell columns apart
        text, null = prefix + b"s", prefix + b"n"
        digests = b"".join([blake2b(null if v is None else text + v, digest_size=8).digest()
                            for v in col.cast(pa.large_binary()).to_pylist()])
    else:
        cols = [_value_bytes(table.column(c)) for c in names]
        keys = cols[0] if len(cols) == 1 else [b"".join(parts) for parts in zip(*cols)]
        digests = b"".join([blake2b(prefix + k, digest_size=8).digest() for k in keys])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _smallest(table, draws, cap: int, seed: int):
    """The `cap` rows of `table` (without the draw column) with the smallest `draws`, sorted by
    draw, with the draw column appended. Rows that share a draw (equal keys) are ordered by a
    hash of their whole row, so the pick is the same whatever order they came in."""
    import numpy as np
    import pyarrow as pa

    if len(draws) > cap:  # rows at or under the cap-th smallest draw (ties included)
        kth = np.partition(draws, cap - 1)[cap - 1]
        near = np.flatnonzero(draws <= kth)
        table, draws = table.take(pa.array(near)), draws[near]
    order = np.argsort(draws, kind="stable")
    sorted_draws = draws[order]
    tied = np.flatnonzero(sorted_draws[1:] == sorted_draws[:-1])
    if tied.size:
        rows = order[np.unique(np.concatenate([tied, tied + 1]))]
        second = np.zeros(len(draws), dtype=np.uint64)
        second[rows] = row_draws(table.take(pa.array(rows)), None, seed)
        order = np.lexsort((second, draws))
    order = order[:cap]
    return table.take(pa.array(order)).append_column(_DRAW, pa.array(draws[order], pa.uint64()))


def _sample_block(batch, cap: int, seed: int, key):
    """A block's rows with the `cap` smallest draws (run in the workers)."""
    return _smallest(batch, row_draws(batch, key, seed), cap, seed)


def _merge_samples(cap: int, seed: int, *tables):
    """The `cap` rows with the smallest draws of partial samples (each carries its draws)."""
    import numpy as np
    import pyarrow as pa

    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table({})
    table = pa.concat_tables(tables, promote_options="permissive")
    draws = table.column(_DRAW).to_numpy().astype(np.uint64)
    return _smallest(table.drop_columns([_DRAW]), draws, cap, seed)


_MERGE = None


def bounded_sample(ds: "ray.data.Dataset", cap: int, seed: int, n_rows: int | None = None,
                   key: str | list[str] | tuple[str, ...] | None = "product_id"):
    """A uniform sample without replacement of min(`cap`, rows) rows of `ds`, as a polars
    DataFrame sorted by draw: the only way a per-product table reaches the driver.

    Each row's draw is a 64-bit blake2b hash of its `key` and `seed` (`row_draws`); the sample
    is the `cap` rows with the smallest draws, so it depends on the rows and the seed only, never
    on the blocks, their order or the parallelism ("same inputs, same graph"). `key`: a column,
    or a list of columns (their values hashed together); the default, "product_id", hashes the
    whole row where the table has no product_id, as does None. Key a table with several rows per
    product (texts, behaviour) by the columns that tell its rows apart: rows with equal keys
    share a draw, so they are kept or dropped together (ties are broken by a hash of the row).

    Each block keeps its `cap` smallest draws in its own task (a bottom-k in `map_batches`);
    the driver merges those partial samples, so it holds at most
    max(4 × cap, `DRIVER_COMBINE_ROWS`) rows: with more blocks than that allows, tasks merge the
    partials first, in groups. `n_rows` is accepted for compatibility and not needed."""
    import functools

    import polars as pl

    global _MERGE
    if cap <= 0:
        return pl.DataFrame()
    keep = functools.partial(_sample_block, cap=cap, seed=seed, key=key)
    refs = ds.map_batches(keep, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    group = max(4, DRIVER_COMBINE_ROWS // cap)  # partials merged at once (<= group × cap rows)
    if len(refs) > group and _MERGE is None:
        _MERGE = ray.remote(_merge_samples)
    while len(refs) > group:
        refs = [_MERGE.remote(cap, seed, *refs[i:i + group]) for i in range(0, len(refs), group)]
    table = _merge_samples(cap, seed, *ray.get(refs))
    if table.num_rows == 0:
        return pl.DataFrame()
    return pl.from_arrow(table.drop_columns([_DRAW]))


def map_step_checkpointed(files: list[str], step, cfg: JobSettings, out, resume=None,
                          chunk_rows: int | None = None) -> dict:
    """`map_step` over Parquet `files`, written to the folder `out`, in chunks of about
    `chunk_rows` input rows (whole files; default: the step's `checkpoint_rows`) with a completion
    marker per chunk in `resume` (the stage's `ctx.resume`). A job killed late in a long
    per-product stage resumes without redoing the finished chunks. Outputs are hard-linked into
    `out` (copied where the filesystem has no links, and on object stores).
    Returns {"chunks", "skipped", "rows"}."""
    import json

    import pyarrow.parquet as pq

    from autoknow_ray import storage

    out = storage.path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(f) for f in files)
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    if resume is None:  # nothing to resume into: one pass straight into `out`
        if files:
            map_step(read_parquet(files), step, cfg, sum(rows)).write_parquet(str(out))
        return {"chunks": 1 if files else 0, "skipped": 0, "rows": sum(rows)}
    limit = chunk_rows or cfg.stage_resources(step.resources).checkpoint_rows
    chunks: list[list[int]] = []
    for i, n in enumerate(rows):
        if not chunks or sum(rows[j] for j in chunks[-1]) + n > limit:
            chunks.append([])
        chunks[-1].append(i)
    resume = storage.path(resume)
    resume.mkdir(parents=True, exist_ok=True)
    skipped = 0
    total, done, t0 = sum(rows), 0, time.perf_counter()
    for c, members in enumerate(chunks):
        name = f"chunk-{c:05d}"
        marker, target = resume / f"{name}.done", resume / name
        chunk_files = [files[i] for i in members]
        n = sum(rows[i] for i in members)
        if marker.exists() and json.loads(marker.read_text()).get("files") == chunk_files:
            skipped += 1
            done += n
            continue
        if target.exists():
            storage.rmtree(target)  # a chunk that was being written when the job died
        map_step(read_parquet(chunk_files), step, cfg, n).write_parquet(str(target))
        marker.write_text(json.dumps({"files": chunk_files, "rows": n}))
        done += n
        if len(chunks) > 1:  # the run's own progress inside a long pass (Ray Data's bars are off)
            from autoknow_ray import progress

            progress.line(f"  {step.name}: chunk {c + 1}/{len(chunks)}, {done:,}/{total:,} rows "
                          f"({100 * done / max(total, 1):.0f}%), {time.perf_counter() - t0:.0f} s")
    for c in range(len(chunks)):
        for f in sorted((resume / f"chunk-{c:05d}").glob("*.parquet")):
            storage.link_or_copy(f, out / f"chunk-{c:05d}-{f.name}")
    return {"chunks": len(chunks), "skipped": skipped, "rows": sum(rows)}


def hash_partitions(n_rows: int, max_rows: int, min_rows: int) -> int:
    """Partitions for a key-partitioned pass (`repartition(keys=…)`, `join`) over `n_rows` rows:
    at least one per CPU of the cluster, at most `max_rows` rows each, and never so many that a
    partition holds fewer than `min_rows` rows."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    wanted = max(cpus, math.ceil(n_rows / max(1, max_rows)))
    return max(1, min(wanted, math.ceil(n_rows / max(1, min_rows))))


def count_by(ds: "ray.data.Dataset", by: list[str], num_partitions: int | None = None):
    """Rows per key of a distributed table as a polars DataFrame (`by` columns + `n`), for keys
    that are few (relations, statuses, reasons): `aggregate`'s partial counts per block, combined
    on the driver (or over one partition per CPU when the partials are many)."""
    import polars as pl

    parts = num_partitions or max(1, int(ray.cluster_resources().get("CPU", 1)))
    got = aggregate(ds, by, {"n": ("count", None)}, parts)
    return got if got.height else pl.DataFrame(schema={**{c: pl.String for c in by}, "n": pl.Int64})


# ---- keyed passes over small inputs: one task instead of a shuffle ----------------------------
# A Ray Data shuffle (groupby, keyed repartition, join) costs 3-6 s of fixed overhead on 2 cores
# whatever its size (measured, 5 Dec 2026: a groupby/map_groups of 153 rows 5.1-6.8 s with 1, 2 or
# 200 partitions, a join of 240 by 153 rows 3.8 s): its map tasks run in worker processes of
# their own runtime environment, started for each shuffle. An input of at most this many rows is
# grouped or joined in one task instead (the same grouping and join functions Ray applies in a
# shuffle's reduce), through the house's ordinary worker processes. Above it every pass is the
# shuffle it was, unchanged.
SMALL_SHUFFLE_ROWS = 50_000
# The same for passes over narrow rows (ids, terms, counts: tens of bytes a row), where the
# caller says so: one task holds a few tens of MB at this size, and sorts or sums it in well
# under a second, where a shuffle costs 3-6 s of fixed cost on 2 cores (the synonyms stage's
# term contexts and the related stage's co-view pairs of a 20,000-product catalogue: 150,000
# to 300,000 rows). A key partition of the shuffle holds up to `KEY_BLOCK_MAX_ROWS` anyway.
NARROW_SMALL_ROWS = 500_000


def small_input(ds: "ray.data.Dataset", n_rows: int | None = None,
                rows_hint: int | None = None, limit: int | None = None) -> "ray.data.Dataset | None":
    """`ds` when it has at most `limit` rows (default `SMALL_SHUFFLE_ROWS`), else None. `n_rows`:
    an upper bound on its rows the caller knows (Parquet metadata); where there is none, or it
    is over the limit, a `rows_hint` (an estimate, e.g. the product count) at or under the limit
    has `ds` materialised and counted, so the answer is exact and `ds` is not computed twice.
    Without either, None: the caller shuffles as before."""
    limit = limit or SMALL_SHUFFLE_ROWS
    if n_rows is not None and n_rows <= limit:
        return ds
    if rows_hint is None or rows_hint > limit:
        return None
    done = ds.materialize()
    return done if done.count() <= limit else None


_LEFT_ROW, _RIGHT_ROW = "__small_join_left_row", "__small_join_right_row"


def _join_block(batch, right_refs: list, right_schema, join_type: str, on: tuple):
    """One partition of a join, as Ray's shuffle join reduces it (its `join_tables`): every left
    row of the dataset (one block) joined with every right row. Rows come out in the order the
    shuffle's reduce gives them (it runs polars with one thread): left rows in their order, each
    one's matches in right order. The order matters downstream: a model step's batches are cut
    from it, and a batch's padding moves a score's last bits."""
    import pyarrow as pa
    from ray.data._internal.execution.operators.join import JoinType, join_tables

    tables = [t for t in ray.get(list(right_refs)) if t.num_rows]
    right = pa.concat_tables(tables, promote_options="permissive") if tables else \
        right_schema.empty_table()
    left = batch.append_column(_LEFT_ROW, pa.array(range(batch.num_rows), pa.int64()))
    right = right.append_column(_RIGHT_ROW, pa.array(range(right.num_rows), pa.int64()))
    out = join_tables(left, right, join_type=JoinType(join_type), left_key_col_names=on,
                      right_key_col_names=on)
    out = out.sort_by([(_LEFT_ROW, "ascending"), (_RIGHT_ROW, "ascending")])
    return out.drop_columns([_LEFT_ROW, _RIGHT_ROW])


def join(left: "ray.data.Dataset", right: "ray.data.Dataset", on: tuple[str, ...], join_type: str,
         num_partitions: int, *, left_rows: int | None = None, right_rows: int | None = None,
         rows_hint: int | None = None, right_schema=None) -> "ray.data.Dataset":
    """`left.join(right, join_type, num_partitions, on)`. An inner or left outer join where both
    sides have at most `SMALL_SHUFFLE_ROWS` rows (`left_rows` / `right_rows`: upper bounds where
    known, else the `rows_hint` estimate, see `small_input`) runs in one task with Ray's own join
    of two tables, the right side passed by reference through the object store (never through
    the driver). Larger inputs, and other join types, take the shuffle join exactly as before.
    `right_schema`: the right side's columns where it may come out with no block at all (a map
    over an empty input), which Ray's join cannot read: an empty block of those columns goes in
    front of it, so either path joins a side of no rows as one with columns."""
    if right_schema is not None:
        right = ray.data.from_arrow(right_schema.empty_table()).union(right)
    small_right = small_left = None
    if join_type in ("inner", "left_outer"):
        small_right = small_input(right, right_rows, rows_hint)
        small_left = small_input(left, left_rows, rows_hint) if small_right is not None else None
    if small_left is None or small_right is None:
        return left.join(small_right if small_right is not None else right, join_type=join_type,
                         num_partitions=num_partitions, on=on)
    done = small_right.materialize()
    schema = done.schema(fetch_if_missing=True)
    schema = getattr(schema, "base_schema", schema)
    if schema is None:  # no right block and no schema to build an empty side from
        return left.join(done, join_type=join_type, num_partitions=num_partitions, on=on)
    return small_left.repartition(1).map_batches(
        _join_block, fn_kwargs={"right_refs": list(done.to_arrow_refs()), "right_schema": schema,
                                "join_type": join_type, "on": tuple(on)},
        batch_size=None, batch_format="pyarrow")


def _block_sums(batch, columns: list[str]):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa.table({c: [pc.sum(batch.column(c)).as_py()] for c in columns}
                    | {"__rows": [batch.num_rows]})


def column_sums(ds: "ray.data.Dataset", columns: list[str]) -> dict:
    """`ds.sum(columns)` as {column: sum}: {} where the table has no rows (`Dataset.sum` gives
    None), None for a column of nulls only. Each block is summed in its own task and the one-row
    partials are added on the driver; `Dataset.sum` runs a hash-aggregate shuffle for it, 3 s of
    fixed cost on a small table."""
    import pyarrow as pa

    parts = ds.select_columns(list(columns)).map_batches(
        _block_sums, fn_kwargs={"columns": list(columns)}, batch_format="pyarrow",
        batch_size=None).materialize()
    tables = [t for t in ray.get(parts.to_arrow_refs()) if t.num_rows]
    if not tables or not sum(sum(t.column("__rows").to_pylist()) for t in tables):
        return {}
    table = pa.concat_tables(tables, promote_options="permissive")
    out = {}
    for c in columns:
        vals = [v for v in table.column(c).to_pylist() if v is not None]
        out[c] = sum(vals) if vals else None
    return out


def _sum_block(batch, keys: list[str], sums: dict):
    """Per-key sums of one block holding every row of the table (pyarrow's hash sum, as Ray's
    `Sum` aggregation: nulls skipped, null for a key whose values are all null)."""
    import pyarrow as pa

    if batch.num_rows == 0:
        return
    got = batch.group_by(keys, use_threads=False).aggregate([(c, "sum") for c in sums.values()])
    cols = {k: got.column(k) for k in keys}
    cols.update({out: got.column(f"{col}_sum") for out, col in sums.items()})
    yield pa.table(cols)


def groupby_sum(ds: "ray.data.Dataset", keys: list[str], sums: dict[str, str], num_partitions: int,
                n_rows: int | None = None, rows_hint: int | None = None,
                small_rows: int | None = None) -> "ray.data.Dataset":
    """`ds.groupby(keys, num_partitions).aggregate(Sum(col, alias_name=out) for out, col in
    sums.items())`: one row per key, its sums. An input of at most `small_rows` rows (default
    `SMALL_SHUFFLE_ROWS`; `n_rows`: an upper bound the caller knows, `rows_hint`: an estimate,
    see `small_input`) is summed in one task instead of a shuffle; larger ones take Ray's
    groupby exactly as before."""
    small = small_input(ds, n_rows, rows_hint, small_rows)
    if small is None:
        import ray.data.aggregate as A

        return ds.groupby(keys if len(keys) > 1 else keys[0], num_partitions=num_partitions
                          ).aggregate(*[A.Sum(col, alias_name=out) for out, col in sums.items()])
    return small.repartition(1).map_batches(_sum_block, fn_kwargs={"keys": list(keys), "sums": dict(sums)},
                                            batch_size=None, batch_format="pyarrow")


def keyed_blocks(ds: "ray.data.Dataset", keys: list[str], num_partitions: int,
                 n_rows: int | None = None, small_rows: int | None = None) -> "ray.data.Dataset":
    """`ds.repartition(num_partitions, keys=keys)`: every key's rows in one block, for a
    `map_batches(…, batch_size=None)` that needs them whole. An input of at most `small_rows`
    rows (default `SMALL_SHUFFLE_ROWS`; `n_rows`: an upper bound the caller knows) becomes one
    block without a shuffle; larger ones are hash-partitioned as before."""
    if small_input(ds, n_rows, limit=small_rows) is None:
        return ds.repartition(num_partitions, keys=list(keys))
    return ds.repartition(1)


# rows a key partition of `map_key_blocks` holds at most, and at least (fewer, larger partitions
# where the input is small: each costs a task)
KEY_BLOCK_MAX_ROWS = 1_000_000
KEY_BLOCK_MIN_ROWS = 100_000


def _sortable(t) -> bool:
    import pyarrow as pa

    return not (pa.types.is_nested(t) or pa.types.is_dictionary(t) or pa.types.is_null(t)
                or isinstance(t, pa.ExtensionType))


def key_order(batch, keys: list[str]):
    """A key partition's rows in an order fixed by their content: by the keys (ascending, nulls
    last), then by every other column Arrow can sort (in schema order). A hash shuffle's reduce
    concatenates its input blocks as they arrive, so their order within a key changes from run
    to run (measured: a group's first row differed between two runs of one groupby); a pass
    that keeps a key's first rows, lists them or sums floats would change with it. Rows equal
    on every sortable column differ only in nested values."""
    cols = list(keys) + [n for n, t in zip(batch.schema.names, batch.schema.types)
                         if n not in keys and _sortable(t)]
    return batch.sort_by([(c, "ascending") for c in cols])


def _sorted_key_block(batch, fn, keys: list[str], fn_args: tuple):
    """One key partition: its rows in `key_order`, then `fn` once over all of them."""
    return fn(key_order(batch, keys), *fn_args)


def map_key_blocks(ds: "ray.data.Dataset", keys, fn, *, fn_args: tuple = (),
                   n_rows: int | None = None, rows_hint: int | None = None,
                   max_rows: int | None = None, small_rows: int | None = None) -> "ray.data.Dataset":
    """`fn(block, *fn_args)` once per key partition: every key's rows in one block, in
    `key_order` (by the keys, then by content: the same whatever order the shuffle gave). What
    `map_groups` gives where `fn` is written over many groups at once (a polars group_by, a join
    on the key) instead of called once per group: a Python call per group costs
    about a millisecond (20,000 products' occurrences grouped one product a call: 21 s in one
    process), a vectorised pass over the block a few. `fn` must give for a block what the
    per-group function gives for its groups, concatenated in key order. Small inputs (see
    `small_input`) are one block without a shuffle; larger ones are hash-partitioned on the keys
    (at most `max_rows` rows a partition, default `KEY_BLOCK_MAX_ROWS`: lower it for wide rows;
    at least one partition per CPU). `small_rows`: the one-block bound for this input
    (`NARROW_SMALL_ROWS` for narrow rows; default `SMALL_SHUFFLE_ROWS`)."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    small = small_input(ds, n_rows, rows_hint, small_rows)
    if small is not None:
        blocks = small.repartition(1)
    else:
        n = n_rows if n_rows is not None else (rows_hint or 0)
        cap = max_rows or KEY_BLOCK_MAX_ROWS
        blocks = ds.repartition(hash_partitions(n, cap, min(KEY_BLOCK_MIN_ROWS, cap)), keys=keys)
    # batch_size=None: each partition whole, as map_groups relies on
    return blocks.map_batches(_sorted_key_block, fn_kwargs={"fn": fn, "keys": keys,
                                                            "fn_args": tuple(fn_args)},
                              batch_size=None, batch_format="pyarrow")
