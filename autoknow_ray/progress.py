"""What a person sees while a long step runs: stage lines, a line per training epoch, bars.

One switch for all of it: `AUTOKNOW_PROGRESS=0` in the environment (the CLI's `--quiet` sets it,
so Ray workers see it too). Ray Data's own operator bars are off either way (`AUTOKNOW_RAY_BARS=1`
brings them back; `runtime.configure_data_context`). Everything goes to stderr, so stdout stays
the command's result. On a terminal a bar redraws in place (tqdm); anywhere else (CI logs, files)
it prints a plain line at most every `LINE_INTERVAL_S` seconds, and one at the end, so a log
never fills with carriage-return frames.
"""
from __future__ import annotations

import os
import sys
import time

ENV = "AUTOKNOW_PROGRESS"
LINE_INTERVAL_S = 10.0  # a non-terminal bar prints at most one line per this many seconds
EPOCH_INTERVAL_S = 2.0  # epochs faster than this are summarised, not printed one by one

_last_epoch_line: dict[str, float] = {}


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def set_enabled(on: bool) -> None:
    """Turn progress output on or off for this process and the Ray workers it starts."""
    os.environ[ENV] = "1" if on else "0"


def configure(quiet: bool = False) -> None:
    """Called once by the CLI. `quiet` turns progress off; the Hugging Face model-loading bars
    go too when quiet or when stderr is not a terminal (they redraw with carriage returns)."""
    if quiet:
        set_enabled(False)
    if quiet or not _is_terminal(sys.stderr):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def line(text: str) -> None:
    """One progress line on stderr (nothing when progress is off)."""
    if enabled():
        print(text, file=sys.stderr, flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def epoch_line(task: str, epoch: int, epochs: int, metrics: dict | None = None) -> None:
    """`tagger epoch 3/12: loss 0.1234 val_f1 0.8123 (41.2 s)`. Epochs that come faster than
    EPOCH_INTERVAL_S apart are skipped, except the first and the last, so a 40-epoch fit of a
    small model gives a few lines, not forty."""
    if not enabled():
        return
    now = time.monotonic()
    last = _last_epoch_line.get(task)
    first_or_last = epoch <= 1 or epoch >= epochs
    if not first_or_last and last is not None and now - last < EPOCH_INTERVAL_S:
        return
    _last_epoch_line[task] = now
    metrics = dict(metrics or {})
    seconds = metrics.pop("seconds", None)
    metrics.pop("epoch", None)
    figures = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
    tail = f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""
    line(f"{task} epoch {epoch}/{epochs}: {figures}{tail}".rstrip())


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LineBar(_Closing):
    """A bar for logs: `synth: 4,000/20,000 products (20%), 1,234 products/s` at a bounded rate."""

    def __init__(self, total: int | None, desc: str, unit: str, stream, interval_s: float):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.interval_s = interval_s
        self.n = 0
        self.t0 = self.last = time.monotonic()

    def _print(self) -> None:
        rate = self.n / max(1e-9, time.monotonic() - self.t0)
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {done} {self.unit}{pct}, {rate:,.0f} {self.unit}/s",
              file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self._print()

    def close(self) -> None:
        self._print()


class _NoBar(_Closing):
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "rows", *, on: bool = True,
        interval_s: float = LINE_INTERVAL_S):
    """A progress bar with `update(n)` and `close()` (also a context manager): tqdm on a
    terminal, bounded-rate lines elsewhere, nothing when `on` is false or progress is off."""
    stream = sys.stderr
    if not (on and enabled()):
        return _NoBar()
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return _LineBar(total, desc, unit, stream, interval_s)


def stage_started(name: str) -> None:
    line(f"stage {name}: running …")


def stage_finished(name: str, seconds: float, rows: int | None = None,
                   skipped: str | None = None) -> None:
    """`skipped`: the reason a stage that ran found nothing to do (no rate is shown then: rows
    passed through untouched are no throughput)."""
    if skipped:
        line(f"stage {name}: done in {seconds:.{1 if seconds >= 1 else 2}f} s, nothing to do: {skipped}")
        return
    per_s = rows / seconds if rows and seconds > 0 else None
    rate = "" if per_s is None else f", {per_s:,.0f} rows/s" if per_s >= 10 else f", {per_s:.2g} rows/s"
    line(f"stage {name}: done in {seconds:.{1 if seconds >= 1 else 2}f} s{rate}")


def stage_skipped(name: str) -> None:
    line(f"stage {name}: up to date, skipped")


class Phases:
    """Wall seconds per named phase of a stage, for its manifest (`phase_seconds`): `done(name)`
    closes the phase that began at the previous `done` (or at construction). A phase that ends
    in a Ray Data write or aggregate is timed whole; a lazy dataset's work is counted where it
    is executed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 2)
        self._t = now
