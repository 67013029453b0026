"""The per-row steps of module 5 (autoknow_ray.steps protocol: Arrow batch in, Arrow batch out).

- ExplodeTerms: a product's type and attribute values as term occurrences;
- EditedTerms: the values earlier modules added or corrected, as term occurrences;
- EmbedTerms: vocabulary terms -> MiniLM vectors (fp16);
- ScorePairs: candidate pairs -> classifier score (plus the single-feature baseline scores);
- CanonicalizeTerms: occurrences of merged terms -> `removed` original + `corrected` canonical
  triples. Its term -> canonical map is per term (bounded by the vocabulary cap) and travels
  inside the step.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from autoknow_ray.schema import HAS_TYPE, TRIPLES, conform
from autoknow_ray.steps import CHEAP_ROWS_PER_CALL, Step, WorkerEnv

MODULE = "synonyms"
TYPE_ATTRIBUTE = ""  # the attribute of type terms inside the module (null in graph tables)
OCCURRENCE = pa.schema([("product_id", pa.string()), ("kind", pa.string()),
                        ("attribute", pa.string()), ("relation", pa.string()),
                        ("term", pa.string())])


def _occurrences(df: pl.DataFrame) -> pa.Table:
    df = (df.with_columns(pl.col("term").str.strip_chars())
          .filter(pl.col("term").is_not_null() & (pl.col("term") != "")
                  & pl.col("attribute").is_not_null())
          .unique(["product_id", "relation", "term"], keep="first", maintain_order=True))
    return conform(df.to_arrow(), OCCURRENCE)


class ExplodeTerms(Step):
    name = "explode_terms"
    resources = MODULE
    rows_per_call = CHEAP_ROWS_PER_CALL  # one product's rows are one call's whatever its size
    columns = ("product_id", "type", "attributes", "brand")

    def process_batch(self, batch: pa.Table) -> pa.Table:
        df = pl.from_arrow(batch)
        types = df.select("product_id", pl.lit("type").alias("kind"),
                          pl.lit(TYPE_ATTRIBUTE).alias("attribute"),
                          pl.lit(HAS_TYPE).alias("relation"), pl.col("type").alias("term"))
        attrs = (df.select("product_id", "attributes").explode("attributes")
                 .filter(pl.col("attributes").is_not_null())
                 .select("product_id", pl.lit("value").alias("kind"),
                         pl.col("attributes").struct.field("name").alias("attribute"),
                         pl.col("attributes").struct.field("name").alias("relation"),
                         pl.col("attributes").struct.field("value").alias("term")))
        brand = df.select("product_id", pl.lit("value").alias("kind"),
                          pl.lit("Brand").alias("attribute"), pl.lit("Brand").alias("relation"),
                          pl.col("brand").alias("term"))
        return _occurrences(pl.concat([types, attrs, brand], how="vertical_relaxed"))


class EditedTerms(Step):
    """Values that earlier modules added or corrected (their types are already in `type`)."""

    name = "edited_terms"
    resources = MODULE
    columns = ("subject", "relation", "object", "status")

    def process_batch(self, batch: pa.Table) -> pa.Table:
        df = pl.from_arrow(batch).filter(pl.col("status").is_in(["added", "corrected"])
                                         & (pl.col("relation") != HAS_TYPE))
        return _occurrences(df.select(pl.col("subject").alias("product_id"),
                                      pl.lit("value").alias("kind"),
                                      pl.col("relation").alias("attribute"), "relation",
                                      pl.col("object").alias("term")))


class EmbedTerms(Step):
    name = "embed_terms"
    resources = MODULE
    columns = ("kind", "attribute", "term")
    model = True

    def __init__(self, encoder: str):
        self.encoder_name = encoder
        self.encoder = None

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.nn.encoder import TextEncoder, set_cpu_threads

        set_cpu_threads(env.cpu_threads)
        self.encoder = TextEncoder(self.encoder_name, device=env.device, batch_size=env.batch_size)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        vecs = self.encoder.encode(batch.column("term").to_pylist()).astype(np.float16)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])
        return batch.append_column("embedding", emb)


class ScorePairs(Step):
    name = "score_pairs"
    resources = MODULE
    columns = ("kind", "attribute", "term_a", "term_b", "source", "cosine", "shared")
    model = True

    def __init__(self, model_dir: Path, votes: bool = False):
        self.model_dir = Path(model_dir)
        self.model = None
        if votes:  # the pairs carry their canonical vote (transfer.py), the classifier's last input
            self.columns = (*ScorePairs.columns, "canonical_vote")

    def setup(self, env: WorkerEnv) -> None:
        import torch

        from autoknow_ray.modules.synonyms.model import load

        torch.set_num_threads(max(1, env.cpu_threads))
        self.model, meta = load(self.model_dir)
        self.cosine_scorer = meta.get("scorer") == "cosine"

    def process_batch(self, batch: pa.Table) -> pa.Table:
        from autoknow_ray.modules.synonyms.features import edit_similarity
        from autoknow_ray.modules.synonyms.model import score_pairs

        a, b = batch.column("term_a").to_pylist(), batch.column("term_b").to_pylist()
        cos = batch.column("cosine").to_numpy(zero_copy_only=False)
        votes = (batch.column("canonical_vote").to_numpy(zero_copy_only=False)
                 if "canonical_vote" in batch.column_names else None)
        score = score_pairs(self.model, self.cosine_scorer, a, b, cos, votes)
        return (batch.append_column("edit_sim", pa.array(edit_similarity(a, b), pa.float32()))
                .append_column("score", pa.array(score, pa.float32())))


class CanonicalizeTerms(Step):
    name = "canonicalize_terms"
    resources = MODULE
    rows_per_call = CHEAP_ROWS_PER_CALL
    columns = ("product_id", "relation", "term")

    def __init__(self, mapping: dict[tuple[str, str], tuple[str, float]]):
        self.mapping = mapping  # (relation, term) -> (canonical, score)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        subj, rel, obj, conf, status, ev = [], [], [], [], [], []
        for pid, r, t in zip(batch.column("product_id").to_pylist(),
                             batch.column("relation").to_pylist(), batch.column("term").to_pylist()):
            hit = self.mapping.get((r, t))
            if hit is None:
                continue
            canon, score = hit
            subj += [pid, pid]
            rel += [r, r]
            obj += [t, canon]
            conf += [score, score]
            status += ["removed", "corrected"]
            ev += [f"synonym of {canon}", f"synonym: original {t}"]
        return pa.table({"subject": subj, "relation": rel, "object": obj,
                         "confidence": pa.array(conf, pa.float32()),
                         "module": [MODULE] * len(subj), "status": status, "evidence": ev},
                        schema=TRIPLES)
