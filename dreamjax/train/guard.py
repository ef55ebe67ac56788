"""The guard: decides continue, or abort and roll back, from each eval's figures; its log.

Figures (see dreamjax.train.diagnostics and dreamjax.train.evaluation) go in; a `Decision` comes
out and is appended to `RUN/monitor.jsonl`, which a resumed run reads back. `LogpTrend` tracks the
held-out preferred likelihood (logps/chosen/fall, logps/chosen/slope) and `NonfiniteCounter` the
steps the train step skipped as non-finite. Everything here runs on the host. On several hosts
every process computes the same figures and decisions, but only the main process writes
monitor.jsonl; broadcast the action of process 0
(`jax.experimental.multihost_utils.broadcast_one_to_all`) if hosts could disagree.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

Figures = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Non-finite steps.


@dataclasses.dataclass
class NonfiniteCounter:
  """Counts skipped (non-finite) steps; `exceeded` once more than `max_skips` were skipped in all."""

  max_skips: int  # K: up to K skipped steps are tolerated, the (K+1)-th aborts
  count: int = 0  # skipped steps so far
  consecutive: int = 0  # skipped steps since the last finite one

  def record(self, loss, grad_norm=None) -> bool:
    """Returns True when the step is non-finite (to be skipped), counting it."""
    finite = math.isfinite(float(loss)) and (grad_norm is None or math.isfinite(float(grad_norm)))
    if finite:
      self.consecutive = 0
      return False
    self.count += 1
    self.consecutive += 1
    return True

  @property
  def exceeded(self) -> bool:
    return self.count > self.max_skips



# ---------------------------------------------------------------------------------------------
# The preferred likelihood's trend.


def _slope(y: Sequence[float]) -> float:
  """Returns the least-squares slope of y against its index: Σ (i − ī)(y_i − ȳ) / Σ (i − ī)²."""
  x = np.arange(len(y), dtype=np.float64)
  x -= x.mean()
  return float(np.sum(x * (np.asarray(y, np.float64) - np.mean(y))) / np.sum(x * x))


@dataclasses.dataclass
class LogpTrend:
  """Tracks held-out mean log-probs of chosen and rejected responses across evals (host side).

  The DPO failure mode: both likelihoods fall, the margin grows, and the preferred response
  becomes less likely than it was. Figures per update (nats, in the caller's units):
    logps/chosen/fall   = first chosen − current chosen          (> 0: it fell)
    logps/chosen/slope  = least-squares slope over the last `window` evals, per eval
    logps/margin        = chosen − rejected
  """

  window: int = 5  # evals in the slope's window
  steps: list = dataclasses.field(default_factory=list)
  chosen: list = dataclasses.field(default_factory=list)
  rejected: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.window < 2:
      raise ValueError(f"LogpTrend: window must be >= 2 evals, got {self.window}")

  def update(self, step: int, chosen: float, rejected: Optional[float] = None) -> Figures:
    """Records one eval; returns the trend figures (slope only once `window` evals are in)."""
    self.steps.append(int(step))
    self.chosen.append(float(chosen))
    self.rejected.append(float("nan") if rejected is None else float(rejected))
    return self.figures()

  def figures(self) -> Figures:
    if not self.chosen:
      return {}
    out = {"logps/chosen/fall": self.chosen[0] - self.chosen[-1]}
    if len(self.chosen) >= self.window:
      out["logps/chosen/slope"] = _slope(self.chosen[-self.window :])
    if not math.isnan(self.rejected[-1]):
      out["logps/margin"] = self.chosen[-1] - self.rejected[-1]
    return out


# ---------------------------------------------------------------------------------------------
# The guard.


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """Thresholds of the guard; None switches a check off. Check names appear in the reasons."""

  max_perplexity_ratio: Optional[float] = 1.5  # 'perplexity': held-out perplexity / base perplexity
  max_weight_drift: Optional[float] = 0.5  # 'drift': max over layers of ||W − W_base|| / ||W_base||
  max_residual_growth: Optional[float] = None  # 'residual_growth': max_l ||h_{l+1}||/||h_l|| (model-specific)
  max_residual_growth_vs_base: Optional[float] = 2.0  # 'residual_growth_vs_base': max_l growth_l / base growth_l
  max_chosen_logp_fall: Optional[float] = 1.0  # 'chosen_fall': nats the chosen log-prob fell since the first eval
  min_chosen_logp_slope: Optional[float] = -0.05  # 'chosen_slope': slope per eval over trend_window evals
  trend_window: int = 5  # evals in the chosen log-prob slope
  max_nonfinite_steps: int = 10  # 'nonfinite': K skipped NaN/Inf steps tolerated; the (K+1)-th aborts
  abort_on_nonfinite_figure: bool = True  # 'nonfinite_figure': any NaN/Inf figure at an eval
  warn_only: tuple[str, ...] = ("chosen_slope",)  # checks that warn instead of aborting


_CHECKS = (  # (check name, figure key, GuardConfig field): abort when figure > limit
    ("perplexity", "perplexity/ratio", "max_perplexity_ratio"),
    ("drift", "drift/max", "max_weight_drift"),
    ("residual_growth", "residual_growth/max", "max_residual_growth"),
    ("residual_growth_vs_base", "residual_growth/max_vs_base", "max_residual_growth_vs_base"),
    ("chosen_fall", "logps/chosen/fall", "max_chosen_logp_fall"),
)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the guard decided at a step."""

  step: int
  action: str  # 'continue' | 'abort' (abort: roll back to Guard.rollback_step and stop)
  passed: bool  # every check passed (a skipped non-finite step never passes)
  reasons: tuple[str, ...] = ()  # failed checks, each 'name: what and the limit'
  warnings: tuple[str, ...] = ()  # failed warn-only checks
  kind: str = "eval"  # 'eval' | 'nonfinite' | 'step'


def _to_json(x):
  """Returns x as strict JSON: floats, with NaN/±Inf as the strings 'nan', 'inf', '-inf'."""
  if isinstance(x, Mapping):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (bool, str)) or x is None:
    return x
  a = np.asarray(x)
  if a.ndim:
    return [_to_json(v) for v in a.tolist()]
  if np.issubdtype(a.dtype, np.integer):
    return int(a)
  f = float(a)
  return f if math.isfinite(f) else str(f)


class Guard:
  """Decides continue or abort at every eval; appends each decision to RUN/monitor.jsonl.

  Usage:
    guard = Guard(run_dir, GuardConfig(...))
    d = guard.skip_nonfinite(step, loss, grad_norm)     # every step (host values)
    d = guard.decide(step, monitor.figures(params))      # every eval
    if d.action == 'abort': restore guard.rollback_step(checkpoint_steps) and stop.

  The file is only ever appended to. `restore(step)` replays it on resume.
  """

  def __init__(self, run_dir: str, config: GuardConfig = GuardConfig(), *, is_main_process: Optional[bool] = None):
    self.config = config
    self.path = os.path.join(run_dir, "monitor.jsonl")
    self.is_main_process = jax.process_index() == 0 if is_main_process is None else is_main_process
    self.trend = LogpTrend(window=config.trend_window)
    self.nonfinite = NonfiniteCounter(config.max_nonfinite_steps)
    self.last_passed_step: Optional[int] = None
    if self.is_main_process:
      os.makedirs(run_dir, exist_ok=True)

  # -- decisions -------------------------------------------------------------------------------

  def decide(self, step: int, figures: Mapping[str, Any]) -> Decision:
    """Returns the decision on one eval's figures (floats or scalar arrays) and logs it.

    When figures hold 'logps/chosen' (and 'logps/rejected'), the trend tracker is updated and
    its figures join the checked and logged ones. Checks whose figure is absent are not run.
    """
    figs = {k: _to_json(v) for k, v in figures.items()}
    if "logps/chosen" in figs:
      figs.update(self.trend.update(step, _num(figs["logps/chosen"]), _num(figs.get("logps/rejected"))))
    failed = []
    if self.config.abort_on_nonfinite_figure:
      bad = sorted(k for k, v in figs.items() if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)))
      if bad:
        failed.append(("nonfinite_figure", f"nonfinite_figure: {', '.join(f'{k} = {figs[k]}' for k in bad)}"))
    for name, key, field in _CHECKS:
      limit = getattr(self.config, field)
      if limit is None or key not in figs:
        continue
      v = _num(figs[key])
      if not math.isfinite(v) or v > limit:
        failed.append((name, f"{name}: {key} = {v:.6g} > {field} {limit:g}"))
    slope_limit = self.config.min_chosen_logp_slope
    if slope_limit is not None and "logps/chosen/slope" in figs:
      v = _num(figs["logps/chosen/slope"])
      if not v >= slope_limit:
        failed.append(("chosen_slope", f"chosen_slope: logps/chosen/slope = {v:.6g} per eval over the last "
                                       f"{self.trend.window} evals < min_chosen_logp_slope {slope_limit:g} "
                                       "(the preferred likelihood keeps falling)"))
    reasons = tuple(r for n, r in failed if n not in self.config.warn_only)
    warns = tuple(r for n, r in failed if n in self.config.warn_only)
    passed = not reasons
    if passed:
      self.last_passed_step = int(step)
    d = Decision(int(step), "continue" if passed else "abort", passed, reasons, warns, "eval")
    self._write(d, figs)
    return d

  def skip_nonfinite(self, step: int, loss, grad_norm=None) -> Decision:
    """Returns the decision on one step's loss: a non-finite step is skipped and counted
    (kind 'nonfinite', logged); more than `max_nonfinite_steps` skips in all abort. A finite step
    gives a passing 'step' decision that is not logged."""
    if not self.nonfinite.record(loss, grad_norm):
      return Decision(int(step), "continue", True, kind="step")
    n, k = self.nonfinite.count, self.config.max_nonfinite_steps
    what = f"loss = {float(loss)}" + ("" if grad_norm is None else f", grad_norm = {float(grad_norm)}")
    if self.nonfinite.exceeded:
      d = Decision(int(step), "abort", False, (f"nonfinite: {n} skipped non-finite steps > max_nonfinite_steps {k} "
                                               f"({what})",), kind="nonfinite")
    else:
      d = Decision(int(step), "continue", False, warnings=(f"nonfinite: step skipped ({what}); {n} of {k} "
                                                           "tolerated",), kind="nonfinite")
    self._write(d, {"loss": _to_json(loss), **({} if grad_norm is None else {"grad_norm": _to_json(grad_norm)})})
    return d

  def rollback_step(self, checkpoint_steps: Iterable[int]) -> Optional[int]:
    """Returns the newest checkpoint step <= the last step that passed (None if there is none)."""
    if self.last_passed_step is None:
      return None
    ok = [int(s) for s in checkpoint_steps if int(s) <= self.last_passed_step]
    return max(ok) if ok else None

  # -- the log ---------------------------------------------------------------------------------

  def _write(self, d: Decision, figures: Mapping[str, Any], **extra):
    if not self.is_main_process:
      return
    line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step": d.step, "kind": d.kind, "action": d.action, "passed": d.passed,
            "reasons": list(d.reasons), "warnings": list(d.warnings),
            "last_passed_step": self.last_passed_step, "nonfinite_count": self.nonfinite.count,
            "figures": figures, **extra}
    text = json.dumps(line, allow_nan=False) + "\n"
    if os.path.exists(self.path) and os.path.getsize(self.path):
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # a line cut by a crash: start ours on a fresh line
          text = "\n" + text
    with open(self.path, "a", encoding="utf-8") as f:  # append-only: earlier decisions stay as written
      f.write(text)
      f.flush()

  def restore(self, step: int) -> None:
    """Replays monitor.jsonl up to `step` (a resumed checkpoint's step): the last passed step,
    the non-finite count and the log-prob trend; lines after `step` (work the resume discards)
    are ignored. Appends a 'resume' line."""
    self.trend = LogpTrend(window=self.config.trend_window)
    self.nonfinite = NonfiniteCounter(self.config.max_nonfinite_steps)
    self.last_passed_step = None
    for line in read_monitor_log(self.path):
      if line.get("kind") == "resume" or line["step"] > step:
        continue
      figs = line.get("figures", {})
      if line["kind"] == "nonfinite":
        self.nonfinite.count += 1
      elif line["kind"] == "eval":
        if "logps/chosen" in figs:
          self.trend.update(line["step"], _num(figs["logps/chosen"]), _num(figs.get("logps/rejected")))
        if line["passed"]:
          self.last_passed_step = line["step"]
    self._write(Decision(int(step), "continue", True, kind="resume"), {})


def _num(v) -> Optional[float]:
  """Returns a JSON figure as a float ('nan'/'inf' strings included); None stays None."""
  return None if v is None else float(v)


def read_monitor_log(path: str) -> list[dict]:
  """Returns the decisions in a monitor.jsonl (empty if the file does not exist).

  A line cut short by a crash mid-write is skipped with a warning.
  """
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        warnings.warn(f"{path}: line {i} is not JSON ({e.msg}); skipped (a write cut short?)")
  return out
