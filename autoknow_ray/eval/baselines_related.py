"""Baselines for related products, each written as a run folder that `autoknow eval` scores from
`graph/related.parquet` exactly like a rebuild:

- `copurchase`: item-item co-purchase counts — a product's top k are the products most often
  bought with it in the catalogue (count A -> B plus B -> A);
- `popularity`: one list for every product, the products most often bought with another (the
  product itself left out of its own list);
- `type-copurchase`: the products most often bought with products of the product's type (its
  catalogue `product_type`; A -> B counts summed over every A of the type; itself left out), the
  popularity list for a product without a type — what counting knows of a new listing;
- `copurchase-walk`: the products a two-step walk over the co-purchase graph most often ends at
  (a step from A to a product it was bought with, with probability count / A's co-purchases;
  P2(A, B) summed over every middle product): what the products bought with A were bought
  with, the count prior's two-hop reach without any model;
- `text-knn`: the nearest titles by the packaged MiniLM embedding (cosine);
- `gnn-symmetric`: the same GNN and training with one embedding per product (source = target),
  without the asymmetry term — what the dual embeddings are measured against.

The first two are the simple way on purpose (one process, polars and FAISS); they are meant for
the evaluation catalogues, not for a 100M-product rebuild.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from autoknow_ray.eval.baselines import read_catalogue_table
from autoknow_ray.pipeline import write_table
from autoknow_ray.schema import GRAPH_RELATED, GRAPH_TAXONOMY, TRIPLES

METHODS = ("copurchase", "copurchase-walk", "popularity", "type-copurchase", "text-knn", "gnn-symmetric")


def _write_run(out: Path, related: pl.DataFrame) -> dict:
    out = Path(out)
    write_table(out / "graph" / "related.parquet", related, GRAPH_RELATED)
    write_table(out / "graph" / "triples.parquet", TRIPLES.empty_table(), TRIPLES)
    write_table(out / "graph" / "taxonomy.parquet", GRAPH_TAXONOMY.empty_table(), GRAPH_TAXONOMY)
    return {"run": str(out), "rows": related.height,
            "products_with_list": related["product_id"].n_unique() if related.height else 0}


def copurchase_counts(copurchase: pl.DataFrame, top_k: int) -> pl.DataFrame:
    if copurchase.height == 0:
        return pl.from_arrow(GRAPH_RELATED.empty_table())
    cp = copurchase.select("src", "dst", pl.col("count").cast(pl.Float64)).filter(pl.col("src") != pl.col("dst"))
    both = pl.concat([cp, cp.select(src="dst", dst="src", count="count")])
    pairs = both.group_by("src", "dst").agg(pl.col("count").sum())
    ranked = pairs.sort(["src", "count", "dst"], descending=[False, True, False]).with_columns(
        rank=pl.int_range(1, pl.len() + 1).over("src"))
    return ranked.filter(pl.col("rank") <= top_k).select(
        product_id="src", related_id="dst", rank=pl.col("rank").cast(pl.Int32),
        score=pl.col("count").cast(pl.Float32))


def _ranked_lists(ids: pl.DataFrame, lists: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """Each product of `ids` (product_id, key) takes the list of its key in `lists` (key, dst,
    count; at most top_k + 1 per key), itself left out, ranked by count then id, top k."""
    joined = ids.join(lists, on="key", how="inner").filter(pl.col("product_id") != pl.col("dst"))
    ranked = joined.sort(["product_id", "count", "dst"], descending=[False, True, False]).with_columns(
        rank=pl.int_range(1, pl.len() + 1).over("product_id"))
    return ranked.filter(pl.col("rank") <= top_k).select(
        "product_id", related_id="dst", rank=pl.col("rank").cast(pl.Int32),
        score=pl.col("count").cast(pl.Float32))


def _top_per_key(pairs: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """(key, dst, count) summed per (key, dst), the top_k + 1 by count (ties by id) per key."""
    summed = pairs.group_by("key", "dst").agg(pl.col("count").sum())
    return summed.sort(["key", "count", "dst"], descending=[False, True, False]).with_columns(
        r=pl.int_range(1, pl.len() + 1).over("key")).filter(pl.col("r") <= top_k + 1).drop("r")


def popularity_lists(products: pl.DataFrame, copurchase: pl.DataFrame, top_k: int) -> pl.DataFrame:
    if copurchase.height == 0 or products.height == 0:
        return pl.from_arrow(GRAPH_RELATED.empty_table())
    cp = copurchase.filter(pl.col("src") != pl.col("dst"))
    pairs = cp.select(key=pl.lit(0), dst="dst", count=pl.col("count").cast(pl.Float64))
    ids = products.select("product_id", key=pl.lit(0))
    return _ranked_lists(ids, _top_per_key(pairs, top_k), top_k)


def type_copurchase_lists(products: pl.DataFrame, copurchase: pl.DataFrame, top_k: int) -> pl.DataFrame:
    if copurchase.height == 0 or products.height == 0:
        return pl.from_arrow(GRAPH_RELATED.empty_table())
    types = products.select("product_id", "product_type")
    cp = copurchase.filter(pl.col("src") != pl.col("dst")).join(
        types, left_on="src", right_on="product_id", how="inner").filter(pl.col("product_type").is_not_null())
    pairs = cp.select(key="product_type", dst="dst", count=pl.col("count").cast(pl.Float64))
    typed = _ranked_lists(types.filter(pl.col("product_type").is_not_null()).select(
        "product_id", key="product_type"), _top_per_key(pairs, top_k), top_k)
    # a product without a type, or of a type nothing was bought with: the popularity list
    rest = products.filter(~pl.col("product_id").is_in(typed["product_id"].unique().implode()))
    return pl.concat([typed, popularity_lists(rest, copurchase, top_k)]).sort("product_id", "rank")


def run_popularity(catalogue: str | Path, out: str | Path, top_k: int = 20) -> dict:
    return _write_run(Path(out), popularity_lists(read_catalogue_table(catalogue, "products"),
                                                  read_catalogue_table(catalogue, "copurchase"), top_k))


def run_type_copurchase(catalogue: str | Path, out: str | Path, top_k: int = 20) -> dict:
    return _write_run(Path(out), type_copurchase_lists(read_catalogue_table(catalogue, "products"),
                                                       read_catalogue_table(catalogue, "copurchase"), top_k))


def run_copurchase(catalogue: str | Path, out: str | Path, top_k: int = 20) -> dict:
    return _write_run(Path(out), copurchase_counts(read_catalogue_table(catalogue, "copurchase"), top_k))


def walk_lists(copurchase: pl.DataFrame, top_k: int, chunk: int = 1024) -> pl.DataFrame:
    """Each product's top k by the two-step walk probability P2(A, B) (counts of both directions,
    every edge; A itself left out, ties by id), computed chunk by chunk of sources."""
    import scipy.sparse as sp

    if copurchase.height == 0:
        return pl.from_arrow(GRAPH_RELATED.empty_table())
    # the rows the related stage quarantines (no id, a self-pair, a count that is not positive)
    # take no step
    cp = copurchase.select("src", "dst", pl.col("count").cast(pl.Float64)).filter(
        pl.col("src").is_not_null() & pl.col("dst").is_not_null() & (pl.col("src") != pl.col("dst"))
        & (pl.col("count") > 0))
    if cp.height == 0:
        return pl.from_arrow(GRAPH_RELATED.empty_table())
    both = pl.concat([cp, cp.select(src="dst", dst="src", count="count")]).group_by("src", "dst").agg(
        pl.col("count").sum())
    ids = pl.concat([both["src"], both["dst"]]).unique().sort()
    at = {x: i for i, x in enumerate(ids.to_list())}
    a = np.array([at[x] for x in both["src"].to_list()])
    b = np.array([at[x] for x in both["dst"].to_list()])
    n = len(ids)
    m = sp.csr_matrix((both["count"].to_numpy(), (a, b)), shape=(n, n))
    step = (sp.diags(1.0 / np.maximum(np.asarray(m.sum(1)).ravel(), 1.0)) @ m).tocsr()
    parts = []
    k = min(top_k, n - 1)
    for lo in range(0, n, chunk):
        rows = np.arange(lo, min(n, lo + chunk))
        p2 = (step[rows] @ step).toarray()
        p2[np.arange(len(rows)), rows] = -1.0
        # the k best by probability, ties by id (the column order)
        top = np.argsort(-p2, 1, kind="stable")[:, :k]
        sc = np.take_along_axis(p2, top, 1)
        r, c = np.nonzero(sc > 0)
        parts.append(pl.DataFrame({"a": rows[r], "b": top[r, c], "score": sc[r, c].astype(np.float32),
                                   "rank": (c + 1).astype(np.int32)}))
    df = pl.concat(parts)
    return df.select(product_id=ids.gather(df["a"]), related_id=ids.gather(df["b"]), rank="rank",
                     score="score")


def run_copurchase_walk(catalogue: str | Path, out: str | Path, top_k: int = 20) -> dict:
    return _write_run(Path(out), walk_lists(read_catalogue_table(catalogue, "copurchase"), top_k))


def text_neighbours(ids: list[str], vectors: np.ndarray, top_k: int) -> pl.DataFrame:
    from autoknow_ray.index.faiss_index import VectorIndex

    if len(ids) < 2:
        return pl.from_arrow(GRAPH_RELATED.empty_table())
    scores, nn = VectorIndex("ip", ivf_min_size=10**9).build(vectors).search(vectors, top_k + 1)
    a = np.repeat(np.arange(len(ids)), nn.shape[1])
    b, s = nn.reshape(-1), scores.reshape(-1)
    df = pl.DataFrame({"a": a, "b": b, "score": s.astype(np.float32)}).filter(
        (pl.col("b") >= 0) & (pl.col("a") != pl.col("b")))
    df = df.with_columns(rank=pl.int_range(1, pl.len() + 1).over("a")).filter(pl.col("rank") <= top_k)
    idarr = pl.Series(ids)
    return df.select(product_id=idarr.gather(df["a"]), related_id=idarr.gather(df["b"]),
                     rank=pl.col("rank").cast(pl.Int32), score="score")


def run_text_knn(catalogue: str | Path, out: str | Path, encoder: str = "default", top_k: int = 20,
                 max_length: int = 32) -> dict:
    from autoknow_ray.nn.encoder import TextEncoder

    products = read_catalogue_table(catalogue, "products")
    titles = [t or "" for t in products["title"].to_list()]
    vectors = TextEncoder(encoder, max_length=max_length).encode(titles)
    return _write_run(Path(out), text_neighbours(products["product_id"].to_list(), vectors, top_k))


def run_gnn_symmetric(catalogue: str | Path, out: str | Path, config: str | Path | None = None) -> dict:
    from autoknow_ray.config import load_config
    from autoknow_ray.rebuild import rebuild

    cfg = load_config(config)
    cfg = cfg.model_copy(update={
        "stages": [s for s in ("ingest", "related", "graph") if s in {*cfg.stages, "ingest", "related", "graph"}],
        "related": cfg.related.model_copy(update={"symmetric": True}),
    })
    return rebuild(catalogue, out, config=cfg)


def run_baseline(method: str, catalogue: str | Path, out: str | Path, *, encoder: str = "default",
                 config: str | Path | None = None) -> dict:
    if method == "copurchase":
        return run_copurchase(catalogue, out)
    if method == "copurchase-walk":
        return run_copurchase_walk(catalogue, out)
    if method == "popularity":
        return run_popularity(catalogue, out)
    if method == "type-copurchase":
        return run_type_copurchase(catalogue, out)
    if method == "text-knn":
        return run_text_knn(catalogue, out, encoder=encoder)
    if method == "gnn-symmetric":
        return run_gnn_symmetric(catalogue, out, config)
    raise ValueError(f"unknown related-products baseline {method!r}; known: {METHODS}")
