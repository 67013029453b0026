"""Train the title tagger on a catalogue (distant supervision) and write its artifact.

In-process by default; with `cfg.use_ray_train` the same training function runs inside a Ray
Train `TorchTrainer` (data-parallel over `ray_num_workers`; rank 0 writes the artifact, so
`out_dir` must be reachable from the worker that gets rank 0: one machine or a shared disk).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

from autoknow_ray.modules.taxonomy.config import TaggerConfig
from autoknow_ray.modules.taxonomy import type_names
from autoknow_ray.modules.taxonomy.distant import (TYPE_LABEL, build_examples,
                                                   single_valued_labels, swap_types)
from autoknow_ray.nn.tagger import CONFIG, SpanTagger, TrainSettings, train_span_tagger

log = logging.getLogger(__name__)


def train_settings(cfg: TaggerConfig) -> TrainSettings:
    """The generic tagger's settings from the module's config."""
    return TrainSettings(
        encoder=cfg.encoder,
        max_length=cfg.max_length,
        epochs=cfg.epochs,
        lr=cfg.lr,
        head_lr=cfg.head_lr,
        batch_size=cfg.batch_size,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        dropout=cfg.dropout,
        shape_dim=cfg.shape_dim,
        o_weight=cfg.o_weight,
        val_fraction=cfg.val_fraction,
        patience=cfg.patience,
        seed=cfg.seed,
        bf16=cfg.bf16,
        device=cfg.device,
        cpu_threads=cfg.cpu_threads,
        eval_batch_size=cfg.infer_batch_size,
        gazetteer=cfg.gazetteer,
        gazetteer_folds=cfg.gazetteer_folds,
        gazetteer_max_entries=cfg.gazetteer_max_entries,
        gazetteer_skip=(TYPE_LABEL,),
        mention_replacement=cfg.mention_replacement,
        mention_skip=() if cfg.mention_replace_type else (TYPE_LABEL,),
    )


def _summary(metrics: dict) -> dict:
    keys = ("n_train", "n_val", "epochs_run", "best_epoch", "val_precision", "val_recall",
            "val_f1", "train_seconds", "train_examples_per_s", "device", "bf16")
    return {k: metrics[k] for k in keys if k in metrics}


def fit_tagger(products: pl.DataFrame, cfg: TaggerConfig, out_dir: Path) -> dict:
    """Distant supervision → training → artifact in `out_dir`; returns the metrics."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    ds = build_examples(
        products,
        min_attribute_count=cfg.min_attribute_count,
        empty_keep_fraction=cfg.empty_keep_fraction,
        max_value_chars=cfg.max_value_chars,
        use_type=cfg.use_type,
        use_attributes=cfg.use_attributes,
        seed=cfg.seed,
    )
    if not ds.labels or ds.stats["n_with_spans"] == 0:
        raise ValueError(
            "distant supervision found no type or attribute value in any title: nothing to learn"
        )
    names: tuple[str, ...] | list[str] = ()
    if cfg.type_swap > 0:
        names = type_names.load(cfg.type_names)
        ds.stats["type_names_source"] = cfg.type_names
        if not names and cfg.type_names == "auto" and "product_type" in products.columns:
            # no public taxonomy beside the project: the catalogue's own type names
            names = sorted({n for n in (type_names.usable(t) for t in
                                        products["product_type"].drop_nulls().unique().to_list()) if n})
            ds.stats["type_names_source"] = "catalogue"
        ds.stats["type_names"] = len(names)
    ds.examples, ds.stats["n_type_swapped"] = swap_types(ds.examples, names, cfg.type_swap, cfg.seed)
    settings = train_settings(cfg)
    extra = {"distant_supervision": ds.stats, "task": "title-tagger"}
    if cfg.single_value_share is not None:
        extra["single_valued"] = single_valued_labels(ds.stats, cfg.single_value_share)
    members, member_metrics = [], []
    # a fit into a folder an earlier fit wrote: its members go (a smaller ensemble would leave
    # them behind, unread but in the artifact's digest and on disk)
    shutil.rmtree(out_dir / "members", ignore_errors=True)
    for k in range(cfg.ensemble):
        # member k: its own seed (initial head, batch order, dropout, validation split)
        s_k = replace(settings, seed=settings.seed + k)
        dir_k = out_dir if k == 0 else out_dir / "members" / str(k)
        if cfg.use_ray_train:
            m_k = _fit_with_ray_train(ds.examples, ds.labels, s_k, cfg, dir_k, extra)
        else:
            _, m_k = train_span_tagger(ds.examples, ds.labels, s_k, dir_k, artifact_extra=extra)
        if k:
            members.append(f"members/{k}")
        member_metrics.append(m_k)
    if members:
        SpanTagger.write_ensemble(out_dir, members)
    train_metrics = member_metrics[0]
    return {
        "n_products": ds.stats["n_products"],
        "n_examples": ds.stats["n_examples"],
        "n_examples_with_spans": ds.stats["n_with_spans"],
        "n_spans": ds.stats["n_spans"],
        "labels": ds.labels,
        "dropped_attributes": ds.stats["dropped_attributes"],
        **_summary(train_metrics),
        "ensemble": cfg.ensemble,
        "members": [{"seed": settings.seed + k, **_summary(m)} for k, m in enumerate(member_metrics)],
        "train_seconds": sum(float(m.get("train_seconds", 0.0)) for m in member_metrics),
        "history": train_metrics.get("history", []),
        "ray_train": cfg.use_ray_train,
        "artifact_dir": str(out_dir),
        "seconds": time.perf_counter() - t0,
    }


# ---- Ray Train -------------------------------------------------------------------------------
def _ray_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    settings = TrainSettings(**config["settings"])
    device = ray.train.torch.get_device()
    _, metrics = train_span_tagger(
        config["examples"],
        config["labels"],
        settings,
        config["out_dir"] if rank == 0 else None,
        device=device,
        rank=rank,
        world_size=world,
        wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
        artifact_extra=config["extra"],
    )
    ray.train.report({k: v for k, v in _summary(metrics).items()
                      if isinstance(v, (int, float, str, bool))})


def _fit_with_ray_train(examples, labels, settings: TrainSettings, cfg: TaggerConfig,
                        out_dir: Path, extra: dict) -> dict:
    from dataclasses import asdict

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    use_gpu = cfg.ray_use_gpu
    if use_gpu == "auto":  # ask for GPUs only where the cluster has them (never wait forever)
        use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.ray_num_workers
    st = asdict(settings)
    st["device"] = "auto"  # the worker's device comes from Ray Train
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "examples": examples,
            "labels": labels,
            "settings": st,
            "out_dir": str(out_dir.resolve()),
            "extra": extra,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.ray_num_workers,
            use_gpu=bool(use_gpu),
            resources_per_worker={"CPU": cfg.ray_cpus_per_worker},
        ),
        run_config=RunConfig(name="title-tagger"),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    art_cfg = out_dir / CONFIG
    if art_cfg.exists():  # the full record, written by rank 0 beside the weights
        metrics = {**json.loads(art_cfg.read_text()).get("training", {}), **metrics}
    return metrics
