"""The imputation artifact: the conditioned tagger, type-name vectors and the known values.

models/imputation/
  tagger/                     the conditioned tagger (safetensors + config.json + tokenizer)
  type_vectors.safetensors    MiniLM embeddings of the training types' names (+ type_names.json)
  known_values.parquet        (type, attribute, term, n): the training catalogue's filled values,
                              capped, the labelled terms of the embedding clusters
  known_attribute_values.parquet  (attribute, term, n): per attribute, the values the sampled
                              products give it (n products), capped: the known values that
                              calibration.json's `threshold_known` is for
  calibration.json            `threshold` (or `abstain_reason`) and, since 7 Dec 2026,
                              `threshold_known` / `threshold_unknown` with `known_values`
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.nn.conditioned_tagger import ConditionedTagger

TAGGER = "tagger"
TYPE_VECTORS = "type_vectors.safetensors"
TYPE_NAMES = "type_names.json"
KNOWN_VALUES = "known_values.parquet"
KNOWN_ATTRIBUTE_VALUES = "known_attribute_values.parquet"  # (attribute, term, n): threshold_known's
CALIBRATION = "calibration.json"  # the threshold fit chose for its precision target, or why none
UNCALIBRATED_THRESHOLD = 0.9  # models fitted before calibration existed


def shipped_threshold(model_dir: Path, setting) -> tuple[float | None, str | None]:
    """(threshold, why none): a configured number as is; `auto` = fit's calibrated threshold,
    None with the reason where fit found none reaching its precision target."""
    if setting != "auto":
        return float(setting), None
    p = Path(model_dir) / CALIBRATION
    if not p.exists():
        return UNCALIBRATED_THRESHOLD, None
    c = json.loads(p.read_text())
    if c.get("threshold") is None:
        return None, c.get("abstain_reason") or "fit found no threshold reaching its precision target"
    return float(c["threshold"]), None


def known_value_thresholds(model_dir: Path, setting, enabled: bool) -> tuple[float, float] | None:
    """(threshold for known values, threshold for the others) fit calibrated together, or None:
    switched off, a configured number (the user's one threshold), a model fitted before them,
    or a fit that found no such pair."""
    p = Path(model_dir) / CALIBRATION
    if not enabled or setting != "auto" or not p.exists():
        return None
    c = json.loads(p.read_text())
    if c.get("threshold_known") is None or c.get("threshold_unknown") is None:
        return None
    if not (Path(model_dir) / KNOWN_ATTRIBUTE_VALUES).exists():
        return None
    return float(c["threshold_known"]), float(c["threshold_unknown"])


def load_known_attribute_values(model_dir: Path, cap: int) -> frozenset[tuple[str, str]]:
    """The (attribute, value key) pairs fit shipped as known, the `cap` most frequent (fit wrote
    them most frequent first under its own cap; a model from elsewhere is held to this run's)."""
    p = Path(model_dir) / KNOWN_ATTRIBUTE_VALUES
    if not p.exists() or cap <= 0:
        return frozenset()
    df = pl.read_parquet(p, columns=["attribute", "term"], n_rows=cap)
    return frozenset(zip(df["attribute"].to_list(), df["term"].to_list()))


def title_reference(model_dir: Path) -> dict | None:
    """Fit's measure of its validation titles (`fit.title_reference`), None for models fitted
    before it existed."""
    p = Path(model_dir) / CALIBRATION
    return json.loads(p.read_text()).get("title_reference") if p.exists() else None


def save_type_vectors(out: Path, names: list[str], vectors: np.ndarray) -> None:
    from safetensors.numpy import save_file

    save_file({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, str(out / TYPE_VECTORS))
    (out / TYPE_NAMES).write_text(json.dumps(names))


class TypeVectors:
    """Type name -> its MiniLM sentence embedding: from the artifact for the training types, the
    packaged encoder (loaded on first need) for a type never seen; zeros for no type."""

    def __init__(self, model_dir: Path, encoder: str, dim: int, device: str = "cpu"):
        from safetensors.numpy import load_file

        self.dim = dim
        self.encoder_name, self.device = encoder, device
        self._encoder = None
        self.cache: dict[str, np.ndarray] = {}
        if (model_dir / TYPE_VECTORS).exists():
            names = json.loads((model_dir / TYPE_NAMES).read_text())
            vecs = load_file(str(model_dir / TYPE_VECTORS))["vectors"]
            self.cache = {n: vecs[i] for i, n in enumerate(names)}
        self.encoded_new = 0

    def __call__(self, types: list[str | None]) -> np.ndarray:
        out = np.zeros((len(types), self.dim), dtype=np.float32)
        new = sorted({t for t in types if isinstance(t, str) and t.strip() and t not in self.cache})
        if new:
            if self._encoder is None:
                from autoknow_ray.nn.encoder import TextEncoder

                self._encoder = TextEncoder(self.encoder_name, device=self.device)
            for t, v in zip(new, self._encoder.encode(new)):
                self.cache[t] = v
            self.encoded_new += len(new)
        for i, t in enumerate(types):
            if isinstance(t, str) and t in self.cache:
                out[i] = self.cache[t]
        return out


def load_tagger(model_dir: Path, device: str, cpu_threads: int) -> ConditionedTagger:
    return ConditionedTagger.load(model_dir / TAGGER, device=device, cpu_threads=cpu_threads)


def load_known_values(model_dir: Path | None) -> pl.DataFrame:
    p = None if model_dir is None else model_dir / KNOWN_VALUES
    if p is None or not p.exists():
        return pl.DataFrame(schema={"type": pl.Utf8, "attribute": pl.Utf8, "term": pl.Utf8,
                                    "n": pl.Int64})
    return pl.read_parquet(p)
