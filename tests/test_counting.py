"""Honest counting: every stage says what its rows are, every drop has a reason, and a stage
whose figures must balance fails by name when they do not. (The rebuild of a hostile catalogue
with real stages is in test_rebuild.py, beside the fitted models it needs.)"""
from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from autoknow_ray.config import Config
from autoknow_ray.graph.assemble import (
    ADDITION_KNOWN, ADDITION_REPEATED, DROP, DUPLICATE_FACT, DUPLICATE_ORIGIN, ORIGIN, OTHER_STATUS,
    REMOVAL_APPLIED, REMOVAL_NO_FACT, REMOVAL_REPEATED, TRIPLES_WITH_ORIGIN, assemble_partition,
    edit_partition, edit_partition_counted,
)
from autoknow_ray.pipeline import BalanceError, RunContext, Stage, read_manifest, run_stages


def _partition(rows):
    cols = [*TRIPLES_WITH_ORIGIN.names]
    return pa.Table.from_pylist([dict(zip(cols, r)) for r in rows], schema=TRIPLES_WITH_ORIGIN)


ROWS = [
    # the catalogue: p1 states Flavor Mint twice
    ("p1", "has_type", "tea", 1.0, "catalogue", "kept", "catalogue", -1),
    ("p1", "Flavor", "Mint", 1.0, "catalogue", "kept", "catalogue", -1),
    ("p1", "Flavor", "Mint", 1.0, "catalogue", "kept", "catalogue", DUPLICATE_ORIGIN),
    # module 0: a removal twice, a removal of nothing, an addition twice, one of a live fact
    ("p1", "has_type", "tea", 0.8, "taxonomy", "removed", "x", 0),
    ("p1", "has_type", "tea", 0.7, "taxonomy", "removed", "x again", 0),
    ("p1", "Size", "1 lb", 0.9, "taxonomy", "removed", "no such fact", 0),
    ("p1", "Size", "12 oz", 0.6, "taxonomy", "added", "low", 0),
    ("p1", "Size", "12 oz", 0.9, "taxonomy", "added", "high", 0),
    ("p1", "Flavor", "Mint", 0.9, "taxonomy", "added", "already there", 0),
    ("p1", "Color", "red", 0.9, "taxonomy", "kept", "a status edits do not have", 0),
    # module 3: removes the addition module 0 made
    ("p1", "Size", "12 oz", 0.7, "cleaning", "removed", "y", 3),
]


def test_every_row_of_a_partition_is_written_or_dropped_with_its_reason():
    table = _partition(ROWS)
    triples, dropped = assemble_partition(pl.from_arrow(table))
    # in = out + dropped, and the triples are what the uncounted path writes
    assert table.num_rows == triples.height + dropped.height
    assert triples.equals(pl.from_arrow(edit_partition(table)))
    reasons = dropped.group_by("reason").len()
    assert dict(reasons.iter_rows()) == {
        DUPLICATE_FACT: 1, REMOVAL_REPEATED: 1, REMOVAL_NO_FACT: 1, ADDITION_REPEATED: 1,
        ADDITION_KNOWN: 1, OTHER_STATUS: 1, REMOVAL_APPLIED: 2}
    lost = dropped.filter(pl.col("reason") == ADDITION_REPEATED)
    assert lost["evidence"].to_list() == ["low"]  # the highest confidence one was kept
    assert dropped.filter(pl.col("reason") == REMOVAL_NO_FACT)["object"].to_list() == ["1 lb"]
    status = {(r, o): s for r, o, s in triples.select("relation", "object", "status").iter_rows()}
    assert status == {("has_type", "tea"): "removed", ("Flavor", "Mint"): "kept",
                      ("Size", "12 oz"): "removed"}
    # the worker function hands both back in one table, the reason in `_drop`
    both = pl.from_arrow(edit_partition_counted(table))
    assert both.filter(pl.col(DROP).is_null()).height == triples.height
    assert both.filter(pl.col(DROP).is_not_null()).height == dropped.height
    assert ORIGIN not in both.columns


class _Counted(Stage):
    name = "counted"
    units = {"rows_in": "products", "rows_out": "products"}
    per_product = True
    balanced = True

    def __init__(self, counts):
        self.counts = counts

    def run(self, ctx):
        return dict(self.counts)


def test_a_balanced_stage_checks_its_figures(tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run", catalogue=tmp_path, cfg=Config(stages=["ingest"]))
    ok = {"rows_in": 10, "rows_out": 7, "rows_quarantined": 1, "rows_dropped": {"no text": 2}}
    run_stages([_Counted(ok)], ctx)
    m = read_manifest(tmp_path / "run" / "counted")
    assert m["balance_checked"] and m["per_product"] and m["units"]["rows_in"] == "products"
    # one product unaccounted for: the stage fails, naming itself and every figure
    bad = {"rows_in": 10, "rows_out": 7, "rows_dropped": {"no text": 2}}
    with pytest.raises(BalanceError, match=r"'counted': 10 rows read but 7 written and 0 "
                                           r"quarantined and 2 dropped \(no text\) \(\+1 unaccounted\)"):
        run_stages([_Counted(bad)], ctx, force=True)
