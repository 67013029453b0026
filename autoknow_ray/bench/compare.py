"""The model stages against the simple way, on the same model and the same titles, in-process.

Three kinds of figure, all titles/s (per wall second and per CPU-second of this process),
measured in interleaved rounds (best round kept, so a burst of load from a neighbour hurts every
variant alike and none twice):

- `simple`: the plain way (see `simple.py`) at batch sizes 1, 8, 32, torch's default threads;
  also at one thread (batches > 1). Two rows of it are named, so a reader sees what Ray adds and
  what the model path adds:
  - `naive`: the loop a user writes first: fp32, Hugging Face defaults, batch 32, torch's
    default threads, titles in catalogue order (`ratio_vs_simple` is ours over this);
  - `single_process`: our model path in one process with every thread torch takes: bf16 where it
    pays (GPU, CPU with bf16 units), rows sorted by length across 1024-row chunks
    (`ratio_vs_single_process` is ours over this: what the Ray pool adds).
  The best of all simple variants stays in the result too.
- `model_path`: our SpanTagger / TextEncoder exactly as one actor runs them (one thread, Ray
  batches of `ray_batch` rows, model batch as the stage sets it, fp32 on CPU), then with one
  change at a time: rows sorted by length across a larger Ray batch, bf16 autocast, both.
  These are the speedups the stage could take; the pipeline run measures what it does take.
- `agreement`: the simple way and ours must do the same work: exact-span F1 between their spans,
  and between our fp32 and bf16 spans; mean cosine between the embeddings.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from autoknow_ray.bench.machine import cpu_has_bf16
from autoknow_ray.nn.encoder import cpu_bf16_pays
from autoknow_ray.bench.simple import SimpleEmbedder, SimpleTagger
from autoknow_ray.nn.encoder import TextEncoder
from autoknow_ray.nn.tagger import SpanTagger, span_prf


@contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_chunks(fn: Callable[[list[str]], object], titles: list[str], chunk: int) -> list:
    """Call `fn` on consecutive chunks, as Ray Data hands an actor its batches."""
    out: list = []
    for i in range(0, len(titles), chunk):
        r = fn(titles[i:i + chunk])
        out.extend(r if isinstance(r, list) else list(r))
    return out


def _rate(fn: Callable[[], object], n: int,
          threads: int | None) -> tuple[float, float, object]:
    """(items per wall second, items per CPU-second of this process, output)."""
    with torch_threads(threads):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return n / dt, n / max(dc, 1e-9), out


def compare_model_path(tagger_dir: str | Path, encoder: str | None, titles: list[str], *,
                       ray_batch: int, tag_batch: int, embed_batch: int, bucket_batch: int = 1024,
                       batch_sizes=(1, 8, 32), rounds: int = 2, device: str = "cpu",
                       progress: Callable[[str], None] | None = None) -> dict:
    """Titles/s of the simple way and of our model path (and its variants) on `titles`."""
    on_gpu = device == "cuda"
    actor_threads = None if on_gpu else 1
    default_threads = torch.get_num_threads()
    ours_tag = SpanTagger.load(tagger_dir, device=device, bf16=False)
    ours_emb = TextEncoder(encoder, device=device, bf16=False, batch_size=embed_batch)
    simple_tag = SimpleTagger(tagger_dir, device=device, probe_texts=titles[:16])
    simple_emb = SimpleEmbedder(encoder, max_length=ours_emb.max_length, device=device)
    # bf16 variants are measured wherever the CPU has bf16 units; the tuned path takes bf16 only
    # where the actors would (the probe finds it faster than fp32 here)
    bf16_units = on_gpu or cpu_has_bf16()
    bf16_ok = on_gpu or cpu_bf16_pays()
    n = len(titles)

    def ours_tagger(bf16: bool, chunk: int, batch: int):
        def run():
            ours_tag.bf16 = bf16
            return in_chunks(lambda t: ours_tag.predict(t, batch_size=batch), titles, chunk)
        return run

    def ours_embedder(bf16: bool, chunk: int, batch: int):
        def run():
            ours_emb.bf16, ours_emb.batch_size = bf16, batch
            return in_chunks(ours_emb.encode, titles, chunk)
        return run

    # name -> (kind, model, callable, threads)
    variants: dict[str, tuple[str, str, Callable[[], object], int | None]] = {}
    for b in batch_sizes:
        variants[f"simple_tag_b{b}"] = ("simple", "tagger", lambda b=b: simple_tag(titles, b), None)
        variants[f"simple_embed_b{b}"] = ("simple", "encoder", lambda b=b: simple_emb(titles, b), None)
    if not on_gpu and default_threads > 1:  # a user may also run it on one thread
        for b in [b for b in batch_sizes if b > 1]:
            variants[f"simple_tag_b{b}_1thread"] = (
                "simple_1thread", "tagger", lambda b=b: simple_tag(titles, b), 1)
            variants[f"simple_embed_b{b}_1thread"] = (
                "simple_1thread", "encoder", lambda b=b: simple_emb(titles, b), 1)
    paths = {"as_run": (False, ray_batch), "bucketed": (False, bucket_batch)}
    if bf16_units:
        paths.update({"bf16": (True, ray_batch), "bucketed_bf16": (True, bucket_batch)})
    tuned = "bucketed_bf16" if bf16_ok else "bucketed"
    variants["single_process_tag"] = ("single_process", "tagger",
                                      ours_tagger(bf16_ok, bucket_batch, tag_batch), None)
    variants["single_process_embed"] = ("single_process", "encoder",
                                        ours_embedder(bf16_ok, bucket_batch, embed_batch), None)
    for name, (bf16, chunk) in paths.items():
        variants[f"ours_tag_{name}"] = ("ours", "tagger", ours_tagger(bf16, chunk, tag_batch),
                                        actor_threads)
        variants[f"ours_embed_{name}"] = ("ours", "encoder",
                                          ours_embedder(bf16, chunk, embed_batch), actor_threads)

    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    outputs: dict[str, object] = {}
    for r in range(rounds):
        for name, (_, _, fn, threads) in variants.items():
            if progress:
                progress(f"round {r + 1}/{rounds}: {name}")
            rate, cpu_rate, out = _rate(fn, n, threads)
            best[name] = max(best.get(name, 0.0), rate)
            best_cpu[name] = max(best_cpu.get(name, 0.0), cpu_rate)
            outputs.setdefault(name, out)

    def pick(kinds: tuple[str, ...], model: str) -> dict[str, float]:
        return {k: v for k, v in best.items() if variants[k][0] in kinds and variants[k][1] == model}

    def combined(kinds: tuple[str, ...]) -> tuple[str, str, float] | None:
        t, e = pick(kinds, "tagger"), pick(kinds, "encoder")
        if not t or not e:
            return None
        bt, be = max(t, key=t.get), max(e, key=e.get)
        return bt, be, 1.0 / (1.0 / best[bt] + 1.0 / best[be])

    def combined_cpu(kinds: tuple[str, ...]) -> float:
        t = [v for k, v in best_cpu.items() if variants[k][0] in kinds and variants[k][1] == "tagger"]
        e = [v for k, v in best_cpu.items() if variants[k][0] in kinds and variants[k][1] == "encoder"]
        return 1.0 / (1.0 / max(t) + 1.0 / max(e))

    naive_b = 32 if 32 in batch_sizes else max(batch_sizes)
    naive = 1.0 / (1.0 / best[f"simple_tag_b{naive_b}"] + 1.0 / best[f"simple_embed_b{naive_b}"])
    naive_cpu = 1.0 / (1.0 / best_cpu[f"simple_tag_b{naive_b}"]
                       + 1.0 / best_cpu[f"simple_embed_b{naive_b}"])
    single = combined(("single_process",))[2]
    single_cpu = combined_cpu(("single_process",))
    best_tag, best_emb, combined_best = combined(("simple", "simple_1thread"))
    default = combined(("simple",))
    one_thread = combined(("simple_1thread",))

    ours_spans = outputs["ours_tag_as_run"]
    agreement = {
        "simple_tagger": simple_tag.kind,
        "why_not_the_hf_pipeline": simple_tag.why_not_pipeline,
        "hf_vs_ours_max_logit_diff": simple_tag.logit_diff,
        "spans_simple": sum(len(x) for x in outputs[best_tag]),
        "spans_ours": sum(len(x) for x in ours_spans),
        "span_f1_simple_vs_ours": span_prf([[s[:3] for s in x] for x in outputs[best_tag]],
                                           ours_spans)["f1"],
        "embed_cosine_simple_vs_ours": _mean_cosine(outputs[best_emb], outputs["ours_embed_as_run"]),
    }
    if "ours_tag_bf16" in outputs:
        agreement["span_f1_fp32_vs_bf16"] = span_prf([[s[:3] for s in x] for x in ours_spans],
                                                     outputs["ours_tag_bf16"])["f1"]
        agreement["embed_cosine_fp32_vs_bf16"] = _mean_cosine(outputs["ours_embed_as_run"],
                                                              outputs["ours_embed_bf16"])
    model_path = {}
    for name in paths:
        t, e = best[f"ours_tag_{name}"], best[f"ours_embed_{name}"]
        model_path[name] = {"tagger": t, "encoder": e, "combined": 1.0 / (1.0 / t + 1.0 / e)}
    return {
        "titles": n,
        "rounds": rounds,
        "device": device,
        "threads_simple": default_threads if not on_gpu else None,
        "threads_ours_per_actor": actor_threads,
        "ray_batch": ray_batch,
        "tag_batch": tag_batch,
        "embed_batch": embed_batch,
        "bucket_batch": bucket_batch,
        "rates": best,
        "rates_per_cpu_s": best_cpu,
        "naive": {"batch_size": naive_b, "precision": "fp32", "threads": default_threads
                  if not on_gpu else None, "combined": naive, "combined_per_cpu_s": naive_cpu},
        "single_process": {"path": tuned, "threads": default_threads if not on_gpu else None,
                           "combined": single, "combined_per_cpu_s": single_cpu},
        "simple": {
            "best_tagger": best_tag,
            "best_encoder": best_emb,
            "combined_best": combined_best,
            "combined_default_threads": default[2],
            "combined_one_thread": one_thread[2] if one_thread else None,
            "combined_best_per_cpu_s": combined_cpu(("simple", "simple_1thread")),
        },
        "model_path_per_actor": model_path,
        "agreement": agreement,
    }


def _mean_cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-6)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-6)
    return float((a * b).sum(1).mean())
