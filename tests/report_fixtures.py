"""A small finished run for the report and export tests: the real graph and report stages, fed
by stand-ins for ingest and for a module stage that hand them the tables they write.

A title holds markup and script, a value holds N-Triples' special characters: both must come out
as text."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from autoknow_ray.config import Config
from autoknow_ray.pipeline import RunContext, Stage, run_stages
from autoknow_ray.schema import CATALOGUE_TABLES, GRAPH_TABLES, QUARANTINE, TRIPLES, conform

EVIL_TITLE = '<script>alert("x")</script><img src=x onerror=alert(1)> Crunchy Snack'
TRICKY_VALUE = 'say "hi"\\ back\nline two\ttab\x01 café'
N_PRODUCTS = 40


def catalogue_tables() -> dict[str, pa.Table]:
    types = ["chips", "crackers", "cereal", "shampoo"]
    products = [{
        "product_id": f"p{i:03d}",
        "title": EVIL_TITLE if i == 0 else f"Brand{i % 5} {types[i % 4]} {i}",
        "description": None, "bullets": None,
        "product_type": types[i % 4],
        "attributes": [{"name": "Flavor", "value": "salt" if i % 2 else "cheese"}],
        "brand": f"Brand{i % 5}",
    } for i in range(N_PRODUCTS)]
    tax = [("chips", "snacks"), ("crackers", "snacks"), ("snacks", "food"), ("cereal", "food"),
           ("shampoo", "beauty"), ("food", None), ("beauty", None)]
    quarantine = [
        {"table": "products", "source": "products.jsonl", "row": 40, "product_id": "p001",
         "reason": "duplicate product_id (first seen in products.jsonl row 1)", "raw": "p001"},
        {"table": "products", "source": "products.jsonl", "row": 41, "product_id": None,
         "reason": "missing title", "raw": '{"title": "<script>alert(2)</script>"}'},
    ]
    return {
        "products": pa.Table.from_pylist(products, schema=CATALOGUE_TABLES["products"]),
        "taxonomy": pa.table({"type": [t for t, _ in tax], "parent": [p for _, p in tax]}),
        "quarantine": pa.Table.from_pylist(quarantine, schema=QUARANTINE),
    }


class PlantedIngestStage(Stage):
    """Writes what the ingest stage writes (products as a folder of shards, the taxonomy, the
    quarantine) without starting Ray: the report and the exports only read these tables."""

    name = "ingest"

    def run(self, ctx: RunContext) -> dict:
        t = catalogue_tables()
        (ctx.out / "products").mkdir()
        half = t["products"].num_rows // 2
        pq.write_table(t["products"].slice(0, half), ctx.out / "products" / "part-00000.parquet")
        pq.write_table(t["products"].slice(half), ctx.out / "products" / "part-00001.parquet")
        ctx.write("taxonomy", t["taxonomy"], CATALOGUE_TABLES["taxonomy"])
        ctx.write("quarantine", t["quarantine"], QUARANTINE)
        n_p, n_t, n_q = t["products"].num_rows, t["taxonomy"].num_rows, t["quarantine"].num_rows
        return {"rows_in": n_p + n_t + n_q, "rows_out": n_p + n_t, "rows_quarantined": n_q,
                "tables": {"products": {"rows_in": n_p + n_q, "rows_out": n_p, "rows_quarantined": n_q},
                           "taxonomy": {"rows_in": n_t, "rows_out": n_t, "rows_quarantined": 0}},
                "quarantine_reasons": {"duplicate product_id": 1, "missing title": 1}}


class PlantedModuleStage(Stage):
    """Stands in for a module: added, corrected and removed triples (edits as a folder of
    shards), new types with parents, and one row group for each other graph table."""

    name = "cleaning"
    needs = ("ingest",)

    def run(self, ctx: RunContext) -> dict:
        edits = [
            ("p002", "Flavor", "smoky bbq", 0.91, "added", "span 'smoky bbq' in description"),
            ("p003", "Flavor", "sea salt", 0.8, "corrected", "was 'salt'"),
            ("p004", "Flavor", "cheese", 0.97, "removed", "score 0.97 misassigned"),
            ("p000", "Color", TRICKY_VALUE, 0.6, "added", "<b>bold</b> evidence"),
            ("p005", "has_type", "veggie chips", 0.88, "corrected", "title span 'veggie chips'"),
        ]
        (ctx.out / "edits").mkdir()
        for i, part in enumerate((edits[:2], edits[2:])):
            t = pa.table({"subject": [e[0] for e in part], "relation": [e[1] for e in part],
                          "object": [e[2] for e in part], "confidence": [e[3] for e in part],
                          "module": ["cleaning"] * len(part), "status": [e[4] for e in part],
                          "evidence": [e[5] for e in part]})
            pq.write_table(conform(t, TRIPLES), ctx.out / "edits" / f"part-{i}.parquet")
        ctx.write("graph_taxonomy", pa.table({
            "type": ["veggie chips", "kettle chips", "dry shampoo"],
            "parent": ["chips", "chips", "shampoo"],
            "is_new": [True, True, True], "confidence": [0.9, 0.7, 0.6]}), GRAPH_TABLES["taxonomy"])
        ctx.write("graph_attributes", pa.table({
            "type": ["chips", "chips", "shampoo"], "attribute": ["Flavor", "Brand", "Scent"],
            "applicability": [0.95, 0.9, 0.8], "applicable": [True, True, True],
            "importance": [0.7, 0.5, 0.6], "rank": [1, 2, 1]}), GRAPH_TABLES["attributes"])
        ctx.write("graph_synonyms", pa.table({
            "kind": ["type", "value"], "attribute": [None, "Flavor"],
            "term": ["crisps", "bbq"], "canonical": ["chips", "smoky bbq"], "score": [0.9, 0.8]}),
            GRAPH_TABLES["synonyms"])
        ctx.write("graph_related", pa.table({
            "product_id": ["p001", "p001"], "related_id": ["p002", "p003"], "rank": [1, 2],
            "score": [0.8, 0.6]}), GRAPH_TABLES["related"])
        return {"rows_in": N_PRODUCTS, "rows_out": len(edits), "rows_quarantined": 1,
                "quarantine_reasons": {"empty description": 1}, "flagged": 2,
                "resources": {"actors": 1, "device": "cpu"}}


def build_run(root: Path) -> Path:
    from autoknow_ray.eval.report import ReportStage
    from autoknow_ray.graph.assemble import GraphStage

    run = root / "run"
    cfg = Config(stages=["ingest", "cleaning", "graph", "report"])
    ctx = RunContext(run_dir=run, catalogue=root / "catalogue", cfg=cfg, cluster={"cpus": 2.0})
    run_stages([PlantedIngestStage(), PlantedModuleStage(), GraphStage(), ReportStage()], ctx)
    return run


def shard_graph_table(run: Path, name: str) -> None:
    """Turn RUN/graph/<name> (one file, or the graph stage's own shards) into a folder of exactly
    two shards, as large runs write it."""
    import shutil

    single, folder = run / "graph" / f"{name}.parquet", run / "graph" / name
    t = pq.read_table(single if single.exists() else folder)
    if single.exists():
        single.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    half = t.num_rows // 2
    pq.write_table(t.slice(0, half), folder / "part-00000.parquet")
    pq.write_table(t.slice(half), folder / "part-00001.parquet")
