"""TensorBoard scalars (process 0 only, TF-free writer) and a console progress bar with ETA.

Tags sit under three prefixes (nested dict keys joined with '/'):

  train/...    each step: the objective's metrics as they come (train/loss, train/rewards/margins,
               train/logps/chosen, train/grad_norm, train/grad/layer_0/norm, ...), train/lr,
               train/step_time_s, train/tokens, train/tokens_per_s
  eval/...     held-out evaluation: eval/perplexity, eval/perplexity/ratio, eval/logps/chosen, ...
  monitor/...  what the guard watches besides: monitor/drift/..., monitor/residual_growth/...

(`dreamjax.train.evaluation.tb_sections` splits an eval's figures into eval/ and monitor/.)
Events go to RUN/tb/.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, TextIO

import jax
import numpy as np


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """Returns {tag: float} with nested dict keys joined by '/'; a 1-D array gives tag/0, tag/1, ...

  Raises ValueError naming the tag of a value that is not numeric or has more than one dimension.
  """
  out = {}
  for k, v in metrics.items():
    tag = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten_metrics(v, tag))
      continue
    try:
      a = np.asarray(jax.device_get(v), dtype=np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"metric {tag!r}: expected a number or numeric array, got {type(v).__name__}") from None
    if a.ndim == 0:
      out[tag] = float(a)
    elif a.ndim == 1:
      width = len(str(max(a.shape[0] - 1, 0)))
      out.update({f"{tag}/{i:0{width}d}": float(x) for i, x in enumerate(a)})
    else:
      raise ValueError(f"metric {tag!r}: expected a scalar or 1-D array, got shape {a.shape}")
  return out


def format_duration(seconds: float) -> str:
  """Returns h:mm:ss (or d-h:mm:ss past a day); '?' when unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  d, s = divmod(s, 86400)
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  return (f"{d}-" if d else "") + f"{h}:{m:02d}:{s:02d}"


class ProgressBar:
  """A progress bar with rate and ETA on a stream (stderr); periodic plain lines when not a TTY.

  The rate is measured from the first update (after compilation), over the steps since then:
    rate = (step − step_0) / (t − t_0),   ETA = (total − step) / rate
  """

  def __init__(self, total: int, *, stream: Optional[TextIO] = None, width: int = 30,
               tty: Optional[bool] = None, line_every_s: float = 30.0, redraw_every_s: float = 0.1,
               clock: Callable[[], float] = time.monotonic):
    self.total, self.width = int(total), width
    self.stream = stream if stream is not None else sys.stderr
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
    self.line_every_s, self.redraw_every_s, self.clock = line_every_s, redraw_every_s, clock
    self._start: Optional[tuple[int, float]] = None
    self._last_draw = -math.inf
    self._closed = False

  def rate(self, step: int, now: float) -> float:
    """Returns steps per second since the first update (nan before two distinct points)."""
    if self._start is None or now <= self._start[1] or step <= self._start[0]:
      return float("nan")
    return (step - self._start[0]) / (now - self._start[1])

  def render(self, step: int, now: float, postfix: Mapping[str, Any]) -> str:
    """Returns the bar's text at `step`."""
    frac = min(max(step / self.total, 0.0), 1.0) if self.total > 0 else 1.0
    filled = int(frac * self.width)
    rate = self.rate(step, now)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    elapsed = now - self._start[1] if self._start else 0.0
    extras = " ".join(f"{k}={_fmt(v)}" for k, v in postfix.items())
    bar = "#" * filled + "." * (self.width - filled)
    rate_s = f"{rate:.3g} step/s" if math.isfinite(rate) else "? step/s"
    text = (f"[{bar}] {step}/{self.total} {100 * frac:5.1f}% {rate_s} "
            f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}")
    return f"{text} {extras}" if extras else text

  def update(self, step: int, **postfix) -> None:
    """Shows progress at `step` (redrawn in place on a TTY, a line every line_every_s otherwise)."""
    now = self.clock()
    if self._start is None:
      self._start = (int(step), now)
    final = step >= self.total
    every = self.redraw_every_s if self.tty else self.line_every_s
    if not final and now - self._last_draw < every:
      return
    self._last_draw = now
    text = self.render(step, now, postfix)
    if self.tty:
      self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
    else:
      self.stream.write(text + "\n")
    self.stream.flush()
    if final:
      self._closed = True

  def close(self) -> None:
    if self.tty and not self._closed and self._start is not None:
      self.stream.write("\n")
      self.stream.flush()
    self._closed = True


def _fmt(v) -> str:
  try:
    f = float(np.asarray(jax.device_get(v)))
  except (TypeError, ValueError):
    return str(v)
  return f"{f:.4g}"


class Logger:
  """Writes TensorBoard scalars under RUN/tb/ and drives the progress bar — on the main process only.

  Usage:
    with Logger(run_dir, total_steps) as log:
      log.log(step, metrics, lr=lr, step_time=dt, tokens=n)   # train/...: any nested dict of scalars
      log.log(step, evaluation.tb_sections(figures), prefix="")  # eval/... and monitor/...
      log.progress(step, loss=metrics['loss'])
  """

  def __init__(self, run_dir: str, total_steps: int, is_main_process: Optional[bool] = None, *,
               stream: Optional[TextIO] = None, tty: Optional[bool] = None, line_every_s: float = 30.0,
               flush_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
    self.is_main_process = jax.process_index() == 0 if is_main_process is None else is_main_process
    self.tb_dir = os.path.join(run_dir, "tb")
    self.clock, self.flush_every_s = clock, flush_every_s
    self._writer = None
    self._bar = None
    self._last_flush = clock()
    if self.is_main_process:
      from tensorboard.summary import Writer  # TF-free; imported here so other processes skip it

      os.makedirs(self.tb_dir, exist_ok=True)
      self._writer = Writer(self.tb_dir)
      self._bar = ProgressBar(total_steps, stream=stream, tty=tty, line_every_s=line_every_s, clock=clock)

  def log(self, step: int, metrics: Optional[Mapping[str, Any]] = None, *, lr=None, step_time: Optional[float] = None,
          tokens=None, prefix: str = "train") -> dict[str, float]:
    """Writes the scalars of one step; returns them as {tag: value} (empty off the main process).

    Args:
      metrics: nested dict of scalars (or 1-D arrays, one tag per entry); device arrays are fine.
      lr: learning rate -> train/lr.
      step_time: seconds of this step -> train/step_time_s (and train/tokens_per_s with tokens).
      tokens: tokens processed this step -> train/tokens.
      prefix: prepended to every metric tag (default 'train'; '' for none). lr, step_time and
        tokens always go under train/.
    """
    if not self.is_main_process:
      return {}
    if self._writer is None:
      raise RuntimeError(f"Logger for {self.tb_dir} is closed")
    scalars = flatten_metrics(metrics or {}, prefix)
    if lr is not None:
      scalars["train/lr"] = float(np.asarray(jax.device_get(lr)))
    if tokens is not None:
      scalars["train/tokens"] = float(np.asarray(jax.device_get(tokens)))
    if step_time is not None:
      scalars["train/step_time_s"] = float(step_time)
      if tokens is not None and step_time > 0:
        scalars["train/tokens_per_s"] = scalars["train/tokens"] / float(step_time)
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, value, int(step))
    if self.clock() - self._last_flush >= self.flush_every_s:
      self.flush()
    return scalars

  def progress(self, step: int, **postfix) -> None:
    """Updates the console progress bar (postfix values, e.g. loss=..., are shown after it)."""
    if self._bar is not None:
      self._bar.update(step, **postfix)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
    self._last_flush = self.clock()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self._bar is not None:
      self._bar.close()

  def __enter__(self) -> "Logger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
