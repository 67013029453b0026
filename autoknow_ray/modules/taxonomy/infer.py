"""The title tagger as a Ray Data actor: one artifact load per actor, TAGS rows out.

    ds.map_batches(TitleTagger,
                   fn_constructor_kwargs={"artifact_dir": ..., "device": "auto",
                                          "batch_size": 64, "cpu_threads": 1},
                   batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=n), ...)
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from autoknow_ray.nn.tagger import SpanTagger
from autoknow_ray.schema import TAGS


class TitleTagger:
    def __init__(
        self,
        artifact_dir: str | Path,
        device: str = "auto",
        batch_size: int = 64,
        cpu_threads: int | None = 1,
        bf16: bool | str = "auto",
        min_score: float = 0.0,
    ):
        self.tagger = SpanTagger.load(artifact_dir, device=device, bf16=bf16,
                                      cpu_threads=cpu_threads)
        self.batch_size = int(batch_size)
        self.min_score = float(min_score)
        self.labels = list(self.tagger.labels)

    def __call__(self, batch) -> pa.Table:
        if not isinstance(batch, pa.Table):  # numpy / pandas batch formats
            batch = pa.table(batch) if isinstance(batch, dict) else pa.Table.from_pandas(batch)
        if batch.num_rows == 0:
            return TAGS.empty_table()
        ids = batch.column("product_id").to_pylist()
        titles = batch.column("title").to_pylist()
        preds = self.tagger.predict(titles, batch_size=self.batch_size)
        cols: dict[str, list] = {f.name: [] for f in TAGS}
        for pid, title, spans in zip(ids, titles, preds):
            for label, start, end, score in spans:
                if score < self.min_score:
                    continue
                cols["product_id"].append(None if pid is None else str(pid))
                cols["label"].append(label)
                cols["value"].append(title[start:end])
                cols["start"].append(start)
                cols["end"].append(end)
                cols["score"].append(score)
        return pa.table(cols, schema=TAGS)
