"""The Arrow schemas at every door of the pipeline (see DESIGN.md, "The doors").

Every table that crosses a stage boundary is written with one of these schemas, so a stage can be
swapped out and a run directory can be read with polars or pyarrow without guessing.
"""
from __future__ import annotations

import pyarrow as pa

STR = pa.string()
ATTRIBUTE_PAIR = pa.struct([("name", STR), ("value", STR)])

# ---- input catalogue -------------------------------------------------------------------------
PRODUCTS = pa.schema(
    [
        ("product_id", STR),
        ("title", STR),
        ("description", STR),
        ("bullets", pa.list_(STR)),
        ("product_type", STR),
        ("attributes", pa.list_(ATTRIBUTE_PAIR)),
        ("brand", STR),
    ]
)
PRODUCTS_REQUIRED = ("product_id", "title")

TAXONOMY = pa.schema([("type", STR), ("parent", STR)])  # parent null: a root, or a type to place
TEXTS = pa.schema([("product_id", STR), ("kind", STR), ("text", STR)])
TEXT_KINDS = ("review", "question", "answer")
BEHAVIOR = pa.schema([("query", STR), ("product_id", STR), ("action", STR), ("count", pa.int64())])
BEHAVIOR_ACTIONS = ("view", "click", "purchase")
COPURCHASE = pa.schema([("src", STR), ("dst", STR), ("count", pa.int64())])
# The columns that tell one row from another in the tables with several rows per product (the
# key `runtime.bounded_sample` draws their rows by; products are keyed by product_id).
TEXTS_KEY = ("product_id", "kind", "text")
BEHAVIOR_KEY = ("query", "product_id", "action")
COPURCHASE_KEY = ("src", "dst")

CATALOGUE_TABLES: dict[str, pa.Schema] = {
    "products": PRODUCTS,
    "taxonomy": TAXONOMY,
    "texts": TEXTS,
    "behavior": BEHAVIOR,
    "copurchase": COPURCHASE,
}
OPTIONAL_TABLES = ("texts", "behavior", "copurchase")

# ---- gold labels (catalogue_dir/gold/, never read by rebuild or fit) -------------------------
# types: the true product type of a product; start/end locate it in the title when it is there.
GOLD_TYPES = pa.schema(
    [("product_id", STR), ("type", STR), ("start", pa.int32()), ("end", pa.int32())]
)
# spans: attribute values of a product; field is "title" or "description"; start/end are
# character offsets into that field (-1 when the value is known but not located).
GOLD_SPANS = pa.schema(
    [
        ("product_id", STR),
        ("attribute", STR),
        ("value", STR),
        ("field", STR),
        ("start", pa.int32()),
        ("end", pa.int32()),
    ]
)
# hypernyms: held-out parent edges. child_kind "type" (a type whose parent edge was hidden) or
# "product" (a product whose type was hidden: depth 1 is its type, depth 2 that type's parent…).
GOLD_HYPERNYMS = pa.schema(
    [("child", STR), ("child_kind", STR), ("parent", STR), ("depth", pa.int32())]
)
GOLD_SYNONYMS = pa.schema(
    [("kind", STR), ("attribute", STR), ("term", STR), ("canonical", STR)]
)
GOLD_COPURCHASE = COPURCHASE
GOLD_MATCHES = pa.schema([("left_id", STR), ("right_id", STR), ("label", pa.int8())])
# wrong_values: attribute values planted or known to be wrong, with the right one when known.
GOLD_WRONG_VALUES = pa.schema(
    [("product_id", STR), ("attribute", STR), ("value", STR), ("correct_value", STR)]
)
# fit_types: the product types a model was fitted on (written by `autoknow type-split`), so that
# eval reports types seen in fit and types never seen apart
GOLD_FIT_TYPES = pa.schema([("type", STR)])
# held_out_values: attribute values removed from the catalogue for judging imputation
GOLD_HELD_OUT_VALUES = pa.schema([("product_id", STR), ("attribute", STR), ("value", STR)])
# wrong_types: products whose catalogue type was planted wrong (type), with the right one.
GOLD_WRONG_TYPES = pa.schema([("product_id", STR), ("type", STR), ("correct_type", STR)])
GOLD_TABLES: dict[str, pa.Schema] = {
    "types": GOLD_TYPES,
    "spans": GOLD_SPANS,
    "hypernyms": GOLD_HYPERNYMS,
    "synonyms": GOLD_SYNONYMS,
    "copurchase": GOLD_COPURCHASE,
    "matches": GOLD_MATCHES,
    "wrong_values": GOLD_WRONG_VALUES,
    "fit_types": GOLD_FIT_TYPES,
    "held_out_values": GOLD_HELD_OUT_VALUES,
    "wrong_types": GOLD_WRONG_TYPES,
}

# ---- stage outputs ---------------------------------------------------------------------------
QUARANTINE = pa.schema(
    [
        ("table", STR),
        ("source", STR),  # file the row came from
        ("row", pa.int64()),  # 0-based row (or line) number inside that file
        ("product_id", STR),
        ("reason", STR),
        ("raw", STR),  # the row as text, truncated
    ]
)
# tags: one row per span the title tagger found.
TAGS = pa.schema(
    [
        ("product_id", STR),
        ("label", STR),  # "type" or an attribute name
        ("value", STR),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("score", pa.float32()),
    ]
)

# cleaning scores: every triple the cleaning stage judged (catalogue facts and upstream edits),
# with P(misassigned) and its decision; status kept | removed | corrected | upstream_removed.
CLEANING_SCORES = pa.schema(
    [
        ("subject", STR),
        ("relation", STR),
        ("object", STR),
        ("origin", STR),  # "catalogue", or "<module>:<status>" of the upstream edit
        ("score", pa.float32()),
        ("module", STR),
        ("status", STR),
        ("confidence", pa.float32()),
        ("evidence", STR),
    ]
)

# ---- the graph -------------------------------------------------------------------------------
TRIPLE_STATUSES = ("kept", "added", "corrected", "removed")
TRIPLES = pa.schema(
    [
        ("subject", STR),
        ("relation", STR),
        ("object", STR),
        ("confidence", pa.float32()),
        ("module", STR),
        ("status", STR),
        ("evidence", STR),
    ]
)
GRAPH_TAXONOMY = pa.schema(
    [("type", STR), ("parent", STR), ("is_new", pa.bool_()), ("confidence", pa.float32())]
)
GRAPH_ATTRIBUTES = pa.schema(
    [
        ("type", STR),
        ("attribute", STR),
        ("applicability", pa.float32()),
        ("applicable", pa.bool_()),
        ("importance", pa.float32()),
        ("rank", pa.int32()),
    ]
)
GRAPH_SYNONYMS = pa.schema(
    [("kind", STR), ("attribute", STR), ("term", STR), ("canonical", STR), ("score", pa.float32())]
)
GRAPH_RELATED = pa.schema(
    [("product_id", STR), ("related_id", STR), ("rank", pa.int32()), ("score", pa.float32())]
)
GRAPH_TABLES: dict[str, pa.Schema] = {
    "triples": TRIPLES,
    "taxonomy": GRAPH_TAXONOMY,
    "attributes": GRAPH_ATTRIBUTES,
    "synonyms": GRAPH_SYNONYMS,
    "related": GRAPH_RELATED,
}
HAS_TYPE = "has_type"


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema`: missing columns become nulls, extra columns are dropped."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            cols.append(table.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(cols, schema=schema)
