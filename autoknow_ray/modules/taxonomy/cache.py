"""The taxonomy stage's cached step: the title models (tagger spans and title vector per product).

The models read the title only, so the cache key is the title with the step's fingerprint: the
tagger's artifact files, the encoder's files, the tagger's span floor, the precision and device
the models run at, and the source of the code that computes spans and vectors. What follows the
models in the same worker (the best type span, the type names a title writes) depends on this
catalogue's taxonomy and the fit's vocabulary, so it runs again on cached rows (cheap).
"""
from __future__ import annotations

from pathlib import Path

from autoknow_ray.incremental import CachedStep, DropColumns, file_digest, source_digest
from autoknow_ray.steps import Chain, Step

STEP = "title_models"
CODE = ["autoknow_ray.incremental", "autoknow_ray.modules.taxonomy.infer", "autoknow_ray.nn.encoder",
        "autoknow_ray.nn.gazetteer", "autoknow_ray.nn.tagger"]


def title_precision(device: str, previous_stage: Path | None = None) -> bool:
    """bf16 or fp32 for the title models, one answer for every actor (so one rebuild's vectors
    are all of one precision, and the cache can name it): on GPU bf16; on CPU the run's one
    decision (`runtime.run_precision`: a resumed run's, the previous run's, the models', or one
    probe), else, outside a rebuild, a probe here. `previous_stage` is read by run_precision
    (kept for callers)."""
    from autoknow_ray import runtime

    return runtime.model_bf16(device)


def title_models_step(tagger: Step, after: list[Step], embed: Step, *, tagger_dir: Path | None,
                      encoder: str | None, min_score: float, bf16: bool, device: str) -> CachedStep:
    """The stage's title-model chain (`tagger`, then `after`, then `embed`, in one actor) as a
    cached step: `spans` and `embedding` are cached; `after` runs again on cached rows."""
    from autoknow_ray.nn.encoder import resolve_encoder

    encoder_dir = Path(resolve_encoder(encoder))
    return CachedStep(
        name=STEP,
        fresh=Chain(STEP, [tagger, *after, embed]),
        reuse=Chain(f"{STEP}_cached", [*after, DropColumns(("title",))]) if after
        else DropColumns(("title",)),
        inputs=("title",),
        outputs=("spans", "embedding"),
        fingerprint={
            "tagger": file_digest([tagger_dir]) if tagger_dir else None,
            "encoder": file_digest([encoder_dir]),
            "min_score": float(min_score),
            "bf16": bool(bf16),
            "device": device,
            "code": source_digest(CODE),
        },
    )
