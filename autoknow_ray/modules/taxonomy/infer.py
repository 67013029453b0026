"""The title tagger as a step of the stage protocol: one artifact load per worker, each product's
spans out as one list column (no copies of the title: offsets and the spanned words only)."""
from __future__ import annotations

import pyarrow as pa

from autoknow_ray.steps import Step, WorkerEnv

SPAN = pa.struct([("label", pa.string()), ("value", pa.string()), ("start", pa.int32()),
                  ("end", pa.int32()), ("score", pa.float32())])
SPANS = pa.list_(SPAN)


class TagTitles(Step):
    """(product_id, title, …) → the same columns plus `spans` (label, value, start, end, score)
    per product. Without an artifact (fit found nothing to learn) every product gets no span."""

    name = "tag_titles"
    resources = "taxonomy"
    columns = ("product_id", "title", "product_type")
    model = True

    def __init__(self, artifact_dir: str | None, min_score: float = 0.0, bf16: bool | str = "auto"):
        self.artifact_dir = artifact_dir
        self.min_score = float(min_score)
        self.bf16 = bf16
        self.tagger = None
        self.batch_size = 64

    def setup(self, env: WorkerEnv) -> None:
        from autoknow_ray.nn.tagger import SpanTagger

        self.batch_size = env.batch_size
        if self.artifact_dir:
            self.tagger = SpanTagger.load(self.artifact_dir, device=env.device, bf16=self.bf16,
                                          cpu_threads=env.cpu_threads)

    def process_batch(self, batch: pa.Table) -> pa.Table:
        titles = batch.column("title").to_pylist()
        if self.tagger is None or not titles:
            preds = [[] for _ in titles]
        else:
            preds = self.tagger.predict(titles, batch_size=self.batch_size)
        spans = [
            [{"label": label, "value": title[s:e], "start": s, "end": e, "score": score}
             for label, s, e, score in p if score >= self.min_score]
            for title, p in zip(titles, preds)
        ]
        return batch.append_column("spans", pa.array(spans, SPANS))
