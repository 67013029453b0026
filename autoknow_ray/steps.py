"""The stage protocol: how every module does per-product work.

A `Step` declares what it needs (which resource plan of the config sizes it, the columns it reads,
whether it hosts a model) and maps one Arrow batch to one Arrow batch. `setup()` loads its model
once per worker, from local artifacts. A step never imports Ray and never chooses its parallelism:
`runtime.map_step` turns it into a Ray Data actor pool (model steps: one `setup()` per actor, GPU
per actor where the cluster has GPUs) or into tasks (the rest), sized by the runtime's plan.

A module's `stage.py` reads as a short list: read these columns, run these steps, aggregate this,
write these tables. Steps must be retry-safe: the same batch in gives the same batch out, since
Ray re-runs the tasks of a lost worker.

    class Lowercase(Step):
        name = "lowercase"
        columns = ("product_id", "title")

        def process_batch(self, batch: pa.Table) -> pa.Table:
            return batch.set_column(1, "title", pc.utf8_lower(batch.column("title")))
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# The environment variable that carries the run's CPU inference precision into a worker process
# ("1" bf16, "0" fp32; `runtime._worker_precision`, read by `nn.encoder.inference_bf16`).
RUN_CPU_BF16_ENV = "AUTOKNOW_RUN_CPU_BF16"


@dataclass(frozen=True)
class WorkerEnv:
    """What the runtime tells a step about the worker it runs in."""

    device: str = "cpu"  # "cuda" where the plan gave this worker a GPU (share)
    cpu_threads: int = 1  # torch threads for this worker
    batch_size: int = 64  # the model batch (rows per forward pass) from the resource plan
    # (object-store URI, local folder) pairs: artifacts the runtime copies onto this worker's
    # node before setup(), so a step's local artifact paths hold on every node
    artifacts: tuple[tuple[str, str], ...] = ()
    # the run's one bf16 / fp32 decision for `auto` inference on CPU (`runtime.run_precision`);
    # None: the worker decides for itself
    cpu_bf16: bool | None = None


# `Step.rows_per_call` of the steps that count, check or reshape rows without a model
CHEAP_ROWS_PER_CALL = 16_384


class Step:
    """One per-product step. Subclasses set the class attributes and `process_batch`.

    Instances are pickled to the workers (through the object store, once per pool), so anything
    set in `__init__` travels: keep it to paths, settings and bounded reference data (a capped
    index), never a per-product table. Models are loaded in `setup()`, never in `__init__`.
    """

    name: str = ""
    resources: str = "default"  # key of `resources:` in the config that sizes this step's pool
    columns: tuple[str, ...] = ()  # the input columns it reads; () = every column
    model: bool = False  # hosts a model (or heavy state): an actor pool with one setup() per actor
    # `runtime.map_step` splits its input into blocks of a call's rows first, so that a table
    # read as a few large blocks spreads over every worker; a step whose work per row is small
    # next to the split's own cost says False (measured on 2 cores, 100,000 rows into an actor
    # pool and a Parquet write: 13.7 s as read, 73.6 s split first: docs/benchmarks.md)
    split_input: bool = True
    # rows per worker call for a step whose work per row is small next to a call's own cost
    # (Ray Data's task or actor call, its block and its transfer: ~50 ms each, measured on 2 cores
    # with the relations counters on 400,000 products and 1.5M customer texts, docs/benchmarks.md);
    # None takes the resource plan's `rows_per_call` (1,024: sized for length-sorted model batches).
    # Only for a step whose output per row does not depend on which rows share its call.
    rows_per_call: int | None = None

    def setup(self, env: WorkerEnv) -> None:
        """Load models or build indexes, once per worker."""

    def process_batch(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError


class Chain(Step):
    """Several steps run one after the other on the same worker (one read of the batch, one
    actor hosting every model): `Chain("title_models", [TagTitles(...), EmbedTitles(...)])`."""

    def __init__(self, name: str, steps: list[Step], resources: str | None = None):
        if not steps:
            raise ValueError("a Chain needs at least one step")
        self.name = name
        self.steps = list(steps)
        self.resources = resources or steps[0].resources
        self.columns = steps[0].columns
        self.model = any(s.model for s in steps)
        # split where a model step of the chain asks for it (the costly work decides)
        models = [s for s in steps if s.model]
        self.split_input = any(getattr(s, "split_input", True) for s in models) if models else True

    def setup(self, env: WorkerEnv) -> None:
        for s in self.steps:
            s.setup(env)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        for s in self.steps:
            missing = [c for c in s.columns if c not in batch.column_names]
            if missing:
                raise KeyError(f"step {s.name!r} needs columns {missing}; the batch has "
                               f"{batch.column_names}")
            batch = s.process_batch(batch)
        return batch


def as_table(batch) -> pa.Table:
    """Ray Data hands `pyarrow` batches; tests and other callers may hand dicts or pandas."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table(batch)
    return pa.Table.from_pandas(batch, preserve_index=False)
