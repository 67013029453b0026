"""bench.json, bench.md and the plots, from the result dict of `run_bench`."""
from __future__ import annotations

import json
import math
from pathlib import Path

VARIANTS = {"as_run": "fp32, Ray batch = model batch (no sorting)",
            "bucketed": "rows sorted by length over 1024-row Ray batches",
            "bf16": "bf16 autocast",
            "bucketed_bf16": "sorted + bf16 (what the stage runs on GPU and on CPUs with bf16 units)"}
PLOTS = ("throughput_vs_workers.png", "time_vs_size.png", "model_path.png")
GIB = 2**30


def _clean(x):
    """JSON without NaN/Infinity (strict parsers reject them): non-finite floats become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _clean(x.item())
    return x


def write_outputs(result: dict, out: Path) -> None:
    out = Path(out)
    data = _clean(result)
    (out / "bench.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    plot(data, out)
    (out / "bench.md").write_text(markdown(data))


# ---- numbers -------------------------------------------------------------------------------------
def f(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def gib(b) -> str:
    return "—" if b is None else f"{b / GIB:.2f}"


def _peak(run: dict, label: str):
    a = (run.get("memory") or {}).get("actors", {}).get(label)
    return a["peak_bytes_max"] if a else None


def actor_memory_table(table: list[dict]) -> list[str]:
    """Peak memory of the largest process of each worker class, per catalogue size, and its
    growth from the smallest size to the largest (same worker count)."""
    from autoknow_ray.bench.probe import TASK_WORKERS

    labels = sorted({k for run in table for k in ((run.get("memory") or {}).get("actors") or {})})
    if not labels:
        return []
    runs = sorted(table, key=lambda x: (x["workers"], x["n"]))
    L = ["", "### Worker memory", "",
         "Largest process of each class (peak resident, VmHWM), GiB. A step's class is its Ray "
         "Data actors; 'task workers' are every other Ray worker process (reused across tasks, so "
         "their peak is over every task they ran).", "",
         "| class | " + " | ".join(f"{x['n']:,} (w{x['workers']})" for x in runs)
         + " | largest / smallest size |",
         "|---|" + "---|" * (len(runs) + 1)]
    for lab in labels:
        peaks = [_peak(x, lab) for x in runs]
        same_w = [x for x in runs if x["workers"] == runs[-1]["workers"] and _peak(x, lab)]
        growth = (_peak(same_w[-1], lab) / _peak(same_w[0], lab)
                  if len(same_w) > 1 and same_w[0]["n"] != same_w[-1]["n"] else None)
        L.append(f"| {lab} | " + " | ".join(gib(v) for v in peaks) + f" | {f(growth)} |")
    top = runs[-1]
    titles = {lab: a.get("sampled_peak_title") for lab, a in
              ((top.get("memory") or {}).get("actors") or {}).items() if a.get("sampled_peak_title")}
    if titles.get(TASK_WORKERS):
        L += ["", f"At {top['n']:,} products the task worker with the highest sampled resident set "
              f"was running `{titles[TASK_WORKERS]}` then."]
    return L


# ---- markdown ------------------------------------------------------------------------------------
def against_table(ag: dict | None, config: str | None) -> list[str]:
    """The --against section: each size rebuilt under both configs, stage by stage."""
    if not ag or not ag.get("pairs"):
        return []
    L = ["", f"### Against `{ag['config']}`", "",
         f"Each size rebuilt under `{config or 'the built-in defaults'}` and then under "
         f"`{ag['config']}` (same catalogue, models and workers; one bench run): seconds and "
         "against / config.", "",
         "| products | stage | config s | against s | against / config |", "|---|---|---|---|---|"]
    for p in ag["pairs"]:
        for st, v in p["stages"].items():
            L.append(f"| {p['n']:,} | {st} | {f(v['config'])} | {f(v['against'])} | {f(v['ratio'])} |")
        L.append(f"| {p['n']:,} | **wall** | {f(p['wall_config'])} | {f(p['wall_against'])} | "
                 f"**{f(p['wall_ratio'])}** |")
    return L


def markdown(r: dict) -> str:
    s, m, fl, cmp_ = r["summary"], r["machine"], r["flops"], r["simple_way"]
    cmd = r["command"]
    args = ["autoknow bench", f"--out {r['out']}"]
    if cmd["quick"]:
        args.append("--quick")
    for k in ("sizes", "workers"):
        if cmd.get(k):
            args.append(f"--{k} " + " ".join(str(x) for x in cmd[k]))
    for k in ("config", "models", "address", "against"):
        if cmd.get(k):
            args.append(f"--{k} {cmd[k]}")
    if cmd.get("fresh_driver") is False:
        args.append("--in-process")
    for k in ("compare_titles", "compare_rounds"):
        if cmd.get(k):
            args.append(f"--{k.replace('_', '-')} {cmd[k]}")
    cl = m["ray_cluster"]
    L = [
        "# autoknow bench",
        "",
        f"Command (as resolved): `{' '.join(args)}` — wall time {r['wall_seconds']:.0f} s, "
        f"{r['created_at']}.",
        "",
        f"Machine: {m['cpu_model']}, {m['host_cpus']} CPUs on the host; Ray cluster "
        f"{f(cl['cpus'])} CPUs, {f(cl['gpus'])} GPUs, {cl['nodes']} node(s); GPUs seen by torch: "
        f"{', '.join(m['gpus']) or 'none'}; CPU bf16 units: {f(m['cpu_bf16'])}. "
        f"Ray {m['ray_version']}, torch {m['torch_version']}, transformers "
        f"{m['transformers_version']}, Python {m['python']}. Load average at start / end: "
        f"{_load(m.get('load_average_at_start'))} / {_load(m.get('load_average_at_end'))} "
        "(other jobs share this machine: compare ratios measured in one run, not times).",
        "",
        f"Models: {r['models']['source']} ({r['models']['path']}).",
        "",
        "Each rebuild ran in a driver process of its own, joined to the bench's cluster, as a "
        "user runs one: its driver figures are that rebuild's alone."
        if cmd.get("fresh_driver") else
        "Every rebuild ran in the bench's own process (`--in-process`): a later size's driver "
        "starts where the earlier rebuilds left it.",
        "",
        "## Summary against the targets",
        "",
        "| figure | target | measured (wall time) | met | per CPU-second | met | per CPU-second basis |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in r["targets"]:
        L.append(f"| {t['target']} | {t['goal']} | {f(t['measured'])} | {f(t['met'])} | "
                 f"{f(t.get('per_cpu_s'))} | {f(t.get('per_cpu_s_met'))} | "
                 f"{t.get('per_cpu_s_basis') or '—'} |")
    L += [
        f"| FLOP fraction of the model stages | — | {f(s.get('flop_fraction'))} "
        f"({fl.get('peak_precision')}) | — | {f(s.get('flop_fraction_per_cpu_s'))} | — | "
        "FLOPs / actor CPU-seconds / the one-thread fp32 rate |",
        "",
        "Per CPU-second figures use Ray Data's per-task CPU time of the model batches "
        "(`ray.data` operator stats) and `time.process_time()` for the simple way: they measure "
        "the work done per core, which the neighbours' load on a shared machine does not change; "
        "the wall-time figures also carry how much of the cores the run got "
        f"(actor CPU share at {s['scaling_size']:,} products: "
        + ", ".join(f"{w} worker(s) {f(v)}" for w, v in (s.get("actor_cpu_share") or {}).items())
        + " of a core each).",
        "",
        f"- `ratio_vs_simple` = {f(s.get('ours_model_titles_per_s'))} / "
        f"{f(s.get('naive_titles_per_s'))} titles/s: {s['ratio_vs_simple_basis']}.",
        f"- `ratio_vs_single_process` = {f(s.get('ours_model_titles_per_s'))} / "
        f"{f(s.get('single_process_titles_per_s'))} titles/s = "
        f"{f(s.get('ratio_vs_single_process'))}: {s.get('ratio_vs_single_process_basis')}.",
        f"- Against the best of every simple variant (batch 1/8/32, default or one thread, "
        f"{f(s.get('simple_titles_per_s'))} titles/s): {f(s.get('ratio_vs_best_simple'))}×; at "
        f"torch's default threads only: {f(s.get('ratio_vs_simple_default_threads'))}×.",
        f"- Steady state (fixed costs — actor start, model load, reads — removed by a linear fit "
        f"over sizes): model stages {f(s.get('model_marginal_titles_per_s'))} titles/s, "
        f"{f(s.get('ratio_vs_simple_steady'))}× the naive loop; fixed cost of the model stages "
        f"{f(s.get('model_fixed_seconds'))} s per rebuild.",
        f"- Whole rebuild: {f(s.get('fixed_seconds'))} s fixed + "
        f"{f(s.get('marginal_seconds_per_1k'))} s per 1k products (linear fit); seconds per 1k: "
        + ", ".join(f"{int(k):,} → {f(v)}" for k, v in s["seconds_per_1k"].items()) + ".",
    ]
    if s.get("model_path_gain_per_core"):
        L.append("- Model path per core (one actor, one thread) over the simple way at one thread: "
                 + ", ".join(f"{k} {f(v)}×" for k, v in s["model_path_gain_per_core"].items()) + ".")
    L += ["", "## Runs", "",
          "Fixed actor pools (`resources.taxonomy.actors` = workers, "
          f"{f(r['table'][0]['plan']['num_cpus'])} CPU per actor, one torch thread per actor on CPU). "
          "Model stages = the taxonomy stage's two Ray Data executions (read → repartition → "
          "actor pool → write Parquet), timed inside the real rebuild.", "",
          "| products | workers | rebuild s | products/s | s per 1k | model stages titles/s | "
          "per worker | titles per actor CPU-s | actor CPU share | load avg | peak GiB per "
          "TitleModels actor (tagger + embedder) | driver peak GiB resident (over its start) | "
          "object store peak GiB | "
          "spilled GiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in r["table"]:
        mem = run.get("memory") or {}
        mt = run.get("model_titles_per_s")
        L.append(
            f"| {run['n']:,} | {run['workers']} | {f(run['wall_seconds'])} | "
            f"{f(run['products_per_s'])} | {f(run['seconds_per_1k'])} | {f(mt)} | "
            f"{f(mt / run['workers'] if mt else None)} | {f(run.get('model_titles_per_cpu_s'))} | "
            f"{f(run.get('actor_cpu_share'))} | {f(run.get('load_average_mean'))} | "
            f"{gib(_peak(run, 'TitleModels'))} | {gib(run.get('driver_peak_resident_bytes'))} "
            f"({gib(run.get('driver_peak_rss_bytes'))}) | "
            f"{gib(mem.get('object_store_peak_bytes'))} | "
            f"{gib(mem.get('object_store_spilled_bytes'))} |")
    L += ["", "### Per stage", "",
          "Driver MiB from each stage's manifest (`driver_memory`): the driver's peak resident "
          "set during the stage, and its growth over the stage's start.", "",
          "| products | workers | stage | seconds | products/s | products/s per worker | "
          "driver peak MiB | driver growth MiB |",
          "|---|---|---|---|---|---|---|---|"]
    for run in r["table"]:
        n, w = run["n"], run["workers"]
        ss = run["stage_seconds"]
        ops = run.get("model_ops", {})
        dm = run.get("stage_driver_memory") or {}
        for st in ss:
            sec = ss[st]
            d = dm.get(st) or {}
            L.append(f"| {n:,} | {w} | {st} | {f(sec)} | {f(n / sec if sec else None)} | — | "
                     f"{f(d.get('rss_peak_mib'))} | {f(d.get('rss_growth_mib'))} |")
            if st == "taxonomy":
                rest = sec
                for op, label in (("TitleModels", "taxonomy: tagger + embedder (one actor pool)"),):
                    if op in ops:
                        o = ops[op]["seconds"]
                        rest -= o
                        L.append(f"| {n:,} | {w} | {label} | {f(o)} | {f(n / o)} | {f(n / o / w)} |")
                L.append(f"| {n:,} | {w} | taxonomy: the rest (types, hypernyms; driver) | "
                         f"{f(rest)} | {f(n / rest if rest > 0 else None)} | — |")
    L += actor_memory_table(r["table"])
    L += against_table(r.get("against"), r["command"].get("config"))
    se, sm = s.get("scaling_end_to_end") or {}, s.get("scaling_model_stages") or {}
    if len(se) > 1:
        L += ["", f"### Scaling with workers ({s['scaling_size']:,} products)", "",
              "| workers | rebuild products/s | efficiency | model stages titles/s | efficiency |",
              "|---|---|---|---|---|"]
        for w in se:
            L.append(f"| {w} | {f(se[w]['throughput'])} | {f(se[w]['efficiency'])} | "
                     f"{f(sm.get(w, {}).get('throughput'))} | {f(sm.get(w, {}).get('efficiency'))} |")
    w_top = max(x["workers"] for x in r["table"])
    n_top = max(x["n"] for x in r["table"])
    L += ["", "## The simple way, same model and titles", "",
          f"{cmp_['titles']} titles sampled from the {max(x['n'] for x in r['table']):,}-product "
          f"catalogue, best of {cmp_['rounds']} interleaved rounds, device {cmp_['device']}. "
          f"Simple tagger: {_simple_tagger_text(cmp_['agreement'])}; simple embedding: a plain "
          "encoder loop "
          f"(fp32, titles in order, torch default threads = {cmp_['threads_simple']}). Ours: "
          "`SpanTagger.predict` / `TextEncoder.encode` as one actor runs them "
          f"({cmp_['threads_ours_per_actor'] or 'default'} thread, Ray batches of "
          f"{cmp_['ray_batch']}), then one change at a time.", "",
          "| variant | tagger titles/s | embedding titles/s | both | both, per CPU-s |",
          "|---|---|---|---|---|"]
    rates = cmp_["rates"]
    cpu = cmp_.get("rates_per_cpu_s", {})

    def both(kind: str, suffix: str = "", table: dict = rates):
        t, e = table.get(f"{kind}_tag{suffix}"), table.get(f"{kind}_embed{suffix}")
        return 1 / (1 / t + 1 / e) if t and e else None

    bs = sorted({int(k.split("_b")[1].split("_")[0]) for k in rates if k.startswith("simple_tag_b")})
    for b in bs:
        for suffix, label in (("", ""), ("_1thread", ", one thread")):
            t, e = rates.get(f"simple_tag_b{b}{suffix}"), rates.get(f"simple_embed_b{b}{suffix}")
            if t and e:
                L.append(f"| simple, batch {b}{label} | {f(t)} | {f(e)} | "
                         f"{f(both('simple', f'_b{b}{suffix}'))} | "
                         f"{f(both('simple', f'_b{b}{suffix}', cpu))} |")
    sp = cmp_.get("single_process")
    if sp:
        L.append(f"| our model path in one process ({sp['path']}, default threads) | "
                 f"{f(rates.get('single_process_tag'))} | {f(rates.get('single_process_embed'))} | "
                 f"{f(sp['combined'])} | {f(sp['combined_per_cpu_s'])} |")
    for name, v in cmp_["model_path_per_actor"].items():
        L.append(f"| ours per actor: {VARIANTS.get(name, name)} | {f(v['tagger'])} | "
                 f"{f(v['encoder'])} | {f(v['combined'])} | {f(both('ours', f'_{name}', cpu))} |")
    L.append(f"| the pipeline, {w_top} worker(s), {n_top:,} products (model stages end to end) | — "
             f"| — | {f(s.get('ours_model_titles_per_s'))} | "
             f"{f(s.get('ours_model_titles_per_cpu_s'))} (actor CPU time of the model batches) |")
    ag = cmp_["agreement"]
    L += ["", "Same work: " + ", ".join(f"{k} = {f(v, 4)}" for k, v in ag.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool))
          + ". "
          "(With the HF pipeline, span F1 simple vs ours < 1 is the decoding: the pipeline takes "
          "each word's arg-max tag, ours a BIO-constrained Viterbi path, on identical logits.)", "",
          "## FLOP floor", "",
          "| model | linear weights | mean tokens per title | FLOPs per title | pad overhead as run "
          "| sorted by tokens | simple b32 |", "|---|---|---|---|---|---|---|"]
    for name in ("tagger", "encoder"):
        x = fl[name]
        p = x["padding_overhead"]
        L.append(f"| {name} | {x['linear_weights']:,} | {f(x['mean_tokens'])} | "
                 f"{x['flops_per_title'] / 1e6:.0f} M | {f(p['as_run_ray_batches_of_64'])} | "
                 f"{f(p['sorted_by_tokens_1024_batch_64'])} | {f(p['simple_b32_in_order'])} |")
    hr = r["hardware_rates"]
    rate_txt = "; ".join(
        f"{t} thread(s): fp32 {v['fp32'] / 1e9:.0f} GFLOP/s"
        + (f", bf16 {v['bf16'] / 1e9:.0f} GFLOP/s" if v.get("bf16") else "")
        for t, v in hr["cpu"].items())
    if hr.get("gpu"):
        rate_txt += f"; GPU bf16 {hr['gpu']['bf16'] / 1e12:.0f} TFLOP/s"
    L += ["", f"Measured matmul rates ({hr['matmul_n']}², best of {hr['rounds']}): {rate_txt}.", "",
          f"Model stages on {fl['catalogue_titles']:,} titles: {fl['flops_catalogue'] / 1e12:.2f} "
          f"TFLOP (useful tokens only), floor {f(fl['floor_seconds'])} s at "
          f"{fl['peak_flops_per_s'] / 1e9:.0f} GFLOP/s ({fl['peak_precision']}); achieved "
          f"{f((fl.get('achieved_flops_per_s') or 0) / 1e9)} GFLOP/s = **{f(fl.get('flop_fraction'))}** "
          f"of the floor rate" + (f" ({f(fl.get('flop_fraction_vs_bf16_peak'))} of the bf16 rate)"
                                  if fl.get("flop_fraction_vs_bf16_peak") else "") + ".", ""]
    pr = r["projection_100m"]
    L += ["## Projected cost of a 100M-product rebuild", "",
          f"From the largest pool ({pr['measured_on']['workers']} workers on "
          f"{f(pr['measured_on']['cores'])} cores): {f(pr['seconds_per_1k_used'])} s per 1k "
          f"products ({pr['seconds_per_1k_basis']}) × {f(pr['measured_on']['cores'])} cores → "
          f"**{f(pr['cpu_core_hours'])} CPU core-hours** ({f(pr['wall_hours_on_100_cores'])} h on "
          f"100 cores if the pool's efficiency holds; {f(pr['cpu_core_hours_pessimistic'])} "
          f"core-hours if a large cluster loses as much again as 1 → "
          f"{pr['measured_on']['workers']} workers did here, efficiency "
          f"{f(pr['scaling_efficiency_measured'])}).", ""]
    if pr.get("gpu_estimate"):
        g = pr["gpu_estimate"]
        L += [f"GPU, **estimate only** ({g['note']}): "
              + "; ".join(f"{k}: {f(v)} GPU-hours" for k, v in g["gpu_hours"].items()) + ".", ""]
    L += ["## How it was measured", "",
          "- Times: wall clock around each `rebuild()` (Ray already up, models fitted); per stage "
          "from the stage manifests; the two model executions by wrapping "
          "`Dataset.write_parquet` in the driver (Ray Data's own operator stats are in "
          "bench.json, `table[].ray_data_stats`).",
          f"- Memory: {(r['table'][0].get('memory') or {}).get('method', '—')}. Peak per actor = "
          "largest VmHWM among that class's actor processes. Driver: "
          f"{(r['table'][0].get('driver_memory') or {}).get('method', '—')}.",
          "- Object store: `object_store_bytes_used` sampled from the raylet (peak), spilled = "
          "difference of `spilled_bytes_total` over the run (what `ray memory --stats-only` shows).",
          f"- Ray Data DataContext: target_max_block_size = "
          f"{m['data_context'].get('target_max_block_size')}, "
          f"enable_progress_bars = {m['data_context'].get('enable_progress_bars')} "
          "(all scalar fields in bench.json, `machine.data_context`).", "",
          "![throughput vs workers](throughput_vs_workers.png)", "",
          "![time vs catalogue size](time_vs_size.png)", "",
          "![model path](model_path.png)", ""]
    return "\n".join(L)


def _simple_tagger_text(ag: dict) -> str:
    if ag.get("why_not_the_hf_pipeline"):
        return (f"{ag['simple_tagger']} (the HF token-classification pipeline cannot hold this "
                f"artifact: {ag['why_not_the_hf_pipeline']})")
    return (f"`{ag['simple_tagger']}` on the tagger weights loaded as "
            "`AutoModelForTokenClassification` (max logit difference to ours "
            f"{f(ag.get('hf_vs_ours_max_logit_diff'))})")


def _load(x) -> str:
    return "—" if not x else "/".join(f"{v:.1f}" for v in x)


# ---- plots ---------------------------------------------------------------------------------------
def plot(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["summary"]
    se, sm = s.get("scaling_end_to_end") or {}, s.get("scaling_model_stages") or {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for data, label, marker in ((se, "rebuild, products/s", "o"),
                                (sm, "model stages, titles/s", "s")):
        if data:
            ws = [int(w) for w in data]
            ys = [data[w]["throughput"] for w in data]
            ax.plot(ws, ys, marker=marker, label=label)
            ax.plot(ws, [ys[0] * w / ws[0] for w in ws], ls=":", color=ax.lines[-1].get_color(),
                    label=f"{label.split(',')[0]}, linear")
    per_cpu = {x["workers"]: x["model_titles_per_cpu_s"] for x in r["table"]
               if x["n"] == s["scaling_size"] and x.get("model_titles_per_cpu_s")}
    if len(per_cpu) > 1:
        ws = sorted(per_cpu)
        ax.plot(ws, [per_cpu[w] * w for w in ws], marker="^", ls="--",
                label="model stages, titles per actor CPU-s × workers")
    ax.set_xticks(sorted({int(w) for w in se} | {int(w) for w in sm}) or [1])
    ax.set_xlabel("workers (fixed actor pool)")
    ax.set_ylabel("throughput")
    ax.set_title(f"Throughput vs workers, {s['scaling_size']:,} products")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=110)
    plt.close(fig)

    w_max = max(x["workers"] for x in r["table"])
    runs = sorted((x for x in r["table"] if x["workers"] == w_max), key=lambda x: x["n"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    ns = [x["n"] for x in runs]
    a1.plot(ns, [x["wall_seconds"] for x in runs], marker="o", label="rebuild")
    a1.plot(ns, [x["model_seconds"] for x in runs], marker="s", label="model stages")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("products")
    a1.set_ylabel("seconds")
    a1.set_title(f"Time vs catalogue size ({w_max} workers)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3, which="both")
    a2.plot(ns, [x["seconds_per_1k"] for x in runs], marker="o", label="rebuild")
    a2.plot(ns, [x["model_seconds"] / (x["n"] / 1000) for x in runs], marker="s",
            label="model stages")
    a2.set_xscale("log")
    a2.set_xlabel("products")
    a2.set_ylabel("seconds per 1k products")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=110)
    plt.close(fig)

    c = r["simple_way"]
    labels, vals, colors = [], [], []
    rates = c["rates"]
    bs = sorted({int(k.split("_b")[1].split("_")[0]) for k in rates if k.startswith("simple_tag_b")})
    for suffix, name, color in (("", "", "tab:gray"), ("_1thread", ", 1 thread", "silver")):
        for b in bs:
            t, e = rates.get(f"simple_tag_b{b}{suffix}"), rates.get(f"simple_embed_b{b}{suffix}")
            if t and e:
                labels.append(f"simple b{b}{name}")
                vals.append(1 / (1 / t + 1 / e))
                colors.append(color)
    for name, v in c["model_path_per_actor"].items():
        labels.append(f"ours/actor {name}")
        vals.append(v["combined"])
        colors.append("tab:blue")
    labels.append(f"pipeline, {w_max} workers")
    vals.append(s.get("ours_model_titles_per_s") or 0)
    colors.append("tab:green")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(labels, vals, color=colors)
    ax.set_xlabel("titles/s, tagger + embedding")
    ax.set_title("Model stages: simple way vs our model path")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=110)
    plt.close(fig)
