"""Aggregate statistics, stratified bootstrap intervals and pre-registered decision rules (numpy).

Everything here follows Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the
Statistical Precipice" (NeurIPS; arXiv 2108.13264) and its library `rliable`:

- scores are arrays `x_SxK`: S seeds (runs) by K strata (tasks or conditions); a 1-D `x_S` is
  one stratum. Aggregates pool all S·K numbers.
- interquartile mean (IQM): the mean of the middle 50% of the pooled scores, robust to a few
  diverged seeds yet far less noisy than the median.
- stratified bootstrap: each replicate resamples S seeds with replacement *within every
  stratum*, so every task keeps its weight; a 95% interval is the 2.5/97.5 percentiles of the
  replicated statistic (the percentile method, rliable's default).
- probability of improvement P(X > Y): the Mann-Whitney U statistic normalised per stratum,
  ties counted 1/2, averaged over strata.

Matched arms (the same seed key drives init and data order in every arm) are resampled *paired*:
one draw of seed indices is applied to both arms, which keeps the pairing the design created.

The decision rules (`Effect`, `Criterion`, `Control`, `evaluate`, `overall_verdict`) live here
too so that a report can re-derive every verdict from results.json with numpy alone.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np

SUPPORTED = "SUPPORTED"
REFUTED = "REFUTED"
INCONCLUSIVE = "INCONCLUSIVE"
ERROR = "ERROR"  # the simulation raised; no verdict

# ---------------------------------------------------------------------------------------------
# Point statistics. Each takes arrays with any leading batch dims and reduces the trailing one
# (or the trailing two for probability_of_improvement), so the bootstrap can call them on all
# replicates at once.


def iqm(x, axis: Optional[int] = None):
  """Returns the interquartile mean: the mean of x after cutting ⌊n/4⌋ values from each end.

    IQM(x) = 1/(n − 2g) · Σ_{i=g+1}^{n−g} x_(i),   g = ⌊n/4⌋,   x_(i) the i-th smallest

  This is `scipy.stats.trim_mean(x, 0.25)`, what rliable computes (Agarwal et al. 2021). For
  n < 4 nothing is cut (the mean). A NaN anywhere gives NaN: a diverged seed must not be trimmed
  away silently.

  Args:
    x: scores; `axis=None` pools all of them, otherwise the IQM is taken along `axis`.
    axis: the axis to reduce, or None for all.
  """
  x = np.asarray(x, dtype=np.float64)
  if axis is None:
    x, axis = x.reshape(-1), -1
  x = np.moveaxis(x, axis, -1)
  n = x.shape[-1]
  if n == 0:
    raise ValueError("IQM of an empty array")
  g = n // 4
  middle = np.sort(x, axis=-1)[..., g:n - g]
  out = middle.mean(axis=-1)
  return np.where(np.isnan(x).any(axis=-1), np.nan, out)[()]


def iqm_difference(x, y):
  """Returns IQM(x) − IQM(y), each pooled over all seeds and strata."""
  return iqm(x) - iqm(y)


def probability_of_improvement(x_SxK, y_TxK):
  """Returns P(X > Y): for each stratum k the Mann-Whitney probability, averaged over strata.

    P_k = 1/(S·T) · Σ_i Σ_j ( [x_ik > y_jk] + ½ [x_ik = y_jk] ),    P = 1/K · Σ_k P_k

  1 when every x beats every y, ½ for identical samples (Agarwal et al. 2021, §4.3). Leading
  batch dims are kept: shapes [..., S, K] and [..., T, K] give [...]. 1-D inputs are one stratum.
  """
  x, y = _as_strata(x_SxK), _as_strata(y_TxK)
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"strata differ: {x.shape} vs {y.shape}")
  xi = x[..., :, None, :]
  yj = y[..., None, :, :]
  wins = (xi > yj).astype(np.float64) + 0.5 * (xi == yj)
  p = wins.mean(axis=(-3, -2)).mean(axis=-1)
  nan = np.isnan(x).any(axis=(-2, -1)) | np.isnan(y).any(axis=(-2, -1))
  return np.where(nan, np.nan, p)[()]


def _as_strata(x) -> np.ndarray:
  """Returns x as float64 [..., S, K]; a 1-D array becomes [S, 1]."""
  x = np.asarray(x, dtype=np.float64)
  return x[:, None] if x.ndim == 1 else x


def _pooled(x_BxSxK: np.ndarray) -> np.ndarray:
  return x_BxSxK.reshape(x_BxSxK.shape[0], -1)


def _ratio(a, b):
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(b == 0, np.nan, a / np.where(b == 0, 1.0, b))


# name -> (number of samples, batched function of [B, S, K] arrays -> [B])
STATISTICS: dict[str, tuple[int, Callable[..., np.ndarray]]] = {
    "iqm": (1, lambda x: iqm(_pooled(x), axis=-1)),
    "mean": (1, lambda x: _pooled(x).mean(axis=-1)),
    "median": (1, lambda x: np.median(_pooled(x), axis=-1)),
    "iqm_diff": (2, lambda x, y: iqm(_pooled(x), axis=-1) - iqm(_pooled(y), axis=-1)),
    "mean_diff": (2, lambda x, y: _pooled(x).mean(axis=-1) - _pooled(y).mean(axis=-1)),
    "iqm_ratio": (2, lambda x, y: _ratio(iqm(_pooled(x), axis=-1), iqm(_pooled(y), axis=-1))),
    "prob_improvement": (2, probability_of_improvement),
}

STATISTIC_TEXT = {
    "iqm": "IQM({a})",
    "mean": "mean({a})",
    "median": "median({a})",
    "iqm_diff": "IQM({a}) − IQM({b})",
    "mean_diff": "mean({a}) − mean({b})",
    "iqm_ratio": "IQM({a}) / IQM({b})",
    "prob_improvement": "P({a} > {b})",
}

# ---------------------------------------------------------------------------------------------
# Stratified bootstrap.


class Interval(NamedTuple):
  """A point estimate with its bootstrap percentile interval."""

  estimate: float
  lo: float
  hi: float


def stratified_bootstrap(statistic: Callable[..., np.ndarray], *samples, reps: int = 2000,
                         rng: Union[np.random.Generator, int, Sequence[int]] = 0,
                         paired: bool = True) -> tuple[float, np.ndarray]:
  """Returns (statistic on the data, statistic on `reps` stratified bootstrap replicates).

  Replicate b draws, for every stratum k independently, S seed indices i_1..i_S uniformly with
  replacement and evaluates `statistic` on x[i_s, k]. With `paired=True` all samples share one
  draw (they must have the same S: matched arms); otherwise each sample is resampled on its own.

  Args:
    statistic: batched function of arrays [B, S, K] (one per sample) returning [B].
    *samples: arrays [S, K] (or [S]); strata K must agree.
    reps: number of bootstrap replicates.
    rng: a numpy Generator or a seed for `np.random.default_rng`.
    paired: share the resampled indices between samples.
  """
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  xs = [_as_strata(s) for s in samples]
  if any(x.ndim != 2 for x in xs):
    raise ValueError(f"samples must be [S] or [S, K], got {[x.shape for x in xs]}")
  k = xs[0].shape[1]
  if any(x.shape[1] != k for x in xs):
    raise ValueError(f"strata differ: {[x.shape for x in xs]}")
  if paired and any(x.shape[0] != xs[0].shape[0] for x in xs):
    raise ValueError(f"paired resampling needs equal seed counts: {[x.shape for x in xs]}")
  point = float(statistic(*[x[None] for x in xs])[0])
  # Bound the largest intermediate (S·T·K per replicate for P(X > Y)) to ~2^22 numbers.
  per_rep = max(x.shape[0] for x in xs) ** 2 * k
  chunk = max(1, min(reps, (1 << 22) // per_rep))
  cols_K = np.arange(k)
  out = []
  for start in range(0, reps, chunk):
    b = min(chunk, reps - start)
    if paired:
      idx = rng.integers(0, xs[0].shape[0], size=(b, xs[0].shape[0], k))
      boot = [x[idx, cols_K] for x in xs]
    else:
      boot = [x[rng.integers(0, x.shape[0], size=(b, x.shape[0], k)), cols_K] for x in xs]
    out.append(np.asarray(statistic(*boot), dtype=np.float64).reshape(b))
  return point, np.concatenate(out)


def percentile_interval(point: float, replicates: np.ndarray, confidence: float = 0.95) -> Interval:
  """Returns the percentile interval [q_{α/2}, q_{1−α/2}] of the replicates, α = 1 − confidence.

  Any non-finite replicate (a ratio over a zero IQM, a NaN score) makes the interval NaN:
  an undefined statistic must not pass a criterion.
  """
  if not np.all(np.isfinite(replicates)) or not math.isfinite(point):
    return Interval(point, math.nan, math.nan)
  alpha = 1.0 - confidence
  lo, hi = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return Interval(point, float(lo), float(hi))


def interval(statistic: str, x, y=None, *, reps: int = 2000, confidence: float = 0.95,
             rng: Union[np.random.Generator, int, Sequence[int]] = 0, paired: bool = True) -> Interval:
  """Returns a named statistic (see `STATISTICS`) with its stratified bootstrap interval.

  Example:
    >>> x, y = np.random.default_rng(0).normal(size=(2, 10, 3))
    >>> interval('iqm_diff', x + 1.0, y).estimate > 0
    True
  """
  arity, fn = STATISTICS[statistic]
  samples = (x,) if arity == 1 else (x, y)
  if arity == 2 and y is None:
    raise ValueError(f"{statistic} needs two samples")
  point, reps_B = stratified_bootstrap(fn, *samples, reps=reps, rng=rng, paired=paired)
  return percentile_interval(point, reps_B, confidence)


# ---------------------------------------------------------------------------------------------
# Pre-registered decision rules.

DIRECTIONS = ("greater", "less", "within")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Effect:
  """A statistic of one simulation's results, reported with a 95% bootstrap interval.

  One-sample statistics (`iqm`, `mean`, `median`) read `data[arm][metric]`. Two-sample ones
  (`iqm_diff`, `mean_diff`, `iqm_ratio`, `prob_improvement`) compare it with
  `data[baseline or arm][baseline_metric or metric]`: another arm, or another metric of the
  same arm (e.g. held-out ÷ in-distribution). Arrays are [S] or [S, K] (K strata).
  """

  arm: str
  metric: str
  statistic: str = "iqm"
  baseline: Optional[str] = None  # second arm; None: the same arm (then baseline_metric is needed)
  baseline_metric: Optional[str] = None  # second metric; None: the same metric
  paired: bool = True  # resample seeds jointly (arms are matched by seed); False: independently
  label: str = ""  # short human name for the report; defaults to the formula

  def __post_init__(self):
    if self.statistic not in STATISTICS:
      raise ValueError(f"unknown statistic {self.statistic!r}; known: {sorted(STATISTICS)}")
    two = STATISTICS[self.statistic][0] == 2
    if two and self.baseline is None and self.baseline_metric is None:
      raise ValueError(f"{self.statistic} on {self.arm}/{self.metric} needs a baseline arm or metric")
    if not two and (self.baseline is not None or self.baseline_metric is not None):
      raise ValueError(f"{self.statistic} takes one sample; drop baseline/baseline_metric")

  @property
  def two_sample(self) -> bool:
    return STATISTICS[self.statistic][0] == 2

  def operands(self) -> list[tuple[str, str]]:
    """Returns the (arm, metric) pairs the statistic reads, in order."""
    ops = [(self.arm, self.metric)]
    if self.two_sample:
      ops.append((self.baseline or self.arm, self.baseline_metric or self.metric))
    return ops

  def formula(self) -> str:
    names = [f"{a}.{m}" for a, m in self.operands()]
    return STATISTIC_TEXT[self.statistic].format(a=names[0], b=names[-1])

  def title(self) -> str:
    return self.label or self.formula()

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["type"] = type(self).__name__
    return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class Criterion(Effect):
  """A pre-registered pass rule on an Effect's 95% interval [lo, hi].

    direction 'greater' (claim: statistic ≥ t):  SUPPORTED if lo ≥ t,  REFUTED if hi < t
    direction 'less'    (claim: statistic ≤ t):  SUPPORTED if hi ≤ t,  REFUTED if lo > t
    direction 'within'  (claim: a ≤ statistic ≤ b, threshold=(a, b), an equivalence test):
                        SUPPORTED if a ≤ lo and hi ≤ b,  REFUTED if hi < a or lo > b
    otherwise (the interval straddles the threshold, or is undefined): INCONCLUSIVE
  """

  threshold: Union[float, tuple[float, float]]
  direction: str = "greater"
  description: str = ""  # the criterion in words, as pre-registered

  def __post_init__(self):
    super().__post_init__()
    if self.direction not in DIRECTIONS:
      raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
    if self.direction == "within":
      if not (isinstance(self.threshold, (tuple, list)) and len(self.threshold) == 2
              and self.threshold[0] <= self.threshold[1]):
        raise ValueError(f"'within' needs threshold=(low, high), got {self.threshold!r}")
      object.__setattr__(self, "threshold", tuple(float(t) for t in self.threshold))
    elif isinstance(self.threshold, (tuple, list)):
      raise ValueError(f"'{self.direction}' needs one threshold, got {self.threshold!r}")
    else:
      object.__setattr__(self, "threshold", float(self.threshold))

  def rule(self) -> str:
    if self.direction == "within":
      return f"{self.threshold[0]:g} ≤ {self.title()} ≤ {self.threshold[1]:g}"
    op = "≥" if self.direction == "greater" else "≤"
    return f"{self.title()} {op} {self.threshold:g}"

  def decide(self, ci: Interval) -> str:
    """Returns SUPPORTED, REFUTED or INCONCLUSIVE for an interval (see the class docstring)."""
    lo, hi = ci.lo, ci.hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
      return INCONCLUSIVE
    t = self.threshold
    if self.direction == "greater":
      return SUPPORTED if lo >= t else REFUTED if hi < t else INCONCLUSIVE
    if self.direction == "less":
      return SUPPORTED if hi <= t else REFUTED if lo > t else INCONCLUSIVE
    a, b = t
    return SUPPORTED if a <= lo and hi <= b else REFUTED if hi < a or lo > b else INCONCLUSIVE


@dataclasses.dataclass(frozen=True, kw_only=True)
class Control(Criterion):
  """A Criterion on control arms that must be SUPPORTED for the main verdict to count.

  kind 'positive': a manipulation known to cause the effect must show it (the setup is sensitive);
  kind 'negative': a manipulation that cannot cause it must not show it (the setup is not biased).
  """

  kind: str = "positive"

  def __post_init__(self):
    super().__post_init__()
    if self.kind not in ("positive", "negative"):
      raise ValueError(f"control kind must be 'positive' or 'negative', got {self.kind!r}")


RULE_TYPES = {cls.__name__: cls for cls in (Effect, Criterion, Control)}


def rule_from_json(d: dict) -> Effect:
  """Inverts `Effect.to_json` (and its subclasses')."""
  d = dict(d)
  cls = RULE_TYPES[d.pop("type")]
  if isinstance(d.get("threshold"), list):
    d["threshold"] = tuple(d["threshold"])
  return cls(**d)


def stream(*parts: Union[int, str]) -> np.random.Generator:
  """Returns a numpy Generator seeded by a tuple of ints and strings (strings via CRC-32).

  Each effect gets its own stream, so adding an effect never shifts another's interval, and a
  report re-derived from results.json reproduces every interval exactly.
  """
  return np.random.default_rng([p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts])


def estimate(effect: Effect, data: dict, *, reps: int, confidence: float,
             rng: np.random.Generator) -> Interval:
  """Returns the effect's point estimate and percentile interval on `data[arm][metric]`."""
  samples = []
  for arm, metric in effect.operands():
    if arm not in data or metric not in data[arm]:
      raise KeyError(f"{effect.title()}: no data for arm {arm!r}, metric {metric!r}")
    samples.append(np.asarray(data[arm][metric], dtype=np.float64))
  return interval(effect.statistic, *samples, reps=reps, confidence=confidence, rng=rng,
                  paired=effect.paired)


def overall_verdict(criteria: Sequence[str], controls: Sequence[tuple[str, str, str]]) -> tuple[str, str]:
  """Returns (verdict, reason) from the criteria's and controls' own verdicts.

  Any control not SUPPORTED → INCONCLUSIVE (a failed positive control means the setup could not
  have shown the effect; a failed negative control means it shows effects it should not).
  Otherwise: any criterion REFUTED → REFUTED (the prediction is a conjunction); all SUPPORTED →
  SUPPORTED; else INCONCLUSIVE.

  Args:
    criteria: the verdict of each primary criterion.
    controls: (kind, name, verdict) of each control.
  """
  failed = [(kind, name, v) for kind, name, v in controls if v != SUPPORTED]
  if failed:
    what = "; ".join(f"{kind} control `{name}` is {v}" for kind, name, v in failed)
    return INCONCLUSIVE, f"{what}, so the criteria cannot be read"
  n = len(criteria)
  ok = f"{len(controls)} control(s) passed" if controls else "no controls declared"
  if any(v == REFUTED for v in criteria):
    k = sum(v == REFUTED for v in criteria)
    return REFUTED, f"{k} of {n} criteria refuted: the interval lies on the wrong side ({ok})"
  if criteria and all(v == SUPPORTED for v in criteria):
    return SUPPORTED, f"all {n} criteria supported ({ok})"
  k = sum(v == INCONCLUSIVE for v in criteria)
  return INCONCLUSIVE, f"{k} of {n} criteria straddle the threshold or are undefined ({ok})"


def analyse(data: dict, *, criteria: Sequence[Criterion], controls: Sequence[Control] = (),
            effects: Sequence[Effect] = (), reps: int = 2000, confidence: float = 0.95,
            seed: int = 0, name: str = "") -> dict:
  """Returns the JSON-ready analysis of one simulation: every interval and every verdict.

    {'arms':     {metric: {arm: [estimate, lo, hi]}}   IQM per arm, for each metric a rule reads
     'effects':  [{'rule', 'formula', 'estimate', 'lo', 'hi'}]          reported, no threshold
     'criteria': [{... , 'rule', 'threshold', 'direction', 'verdict'}]
     'controls': [{... , 'kind', 'verdict'}]
     'verdict', 'reason'}

  Each interval uses its own stream `stream(seed, name, section, index)`, so the analysis is a
  pure function of (data, rules, reps, confidence, seed, name).

  Args:
    data: {arm: {metric: array [S] or [S, K]}}.
    criteria, controls, effects: the simulation's pre-registered rules.
    reps, confidence, seed: bootstrap settings.
    name: the simulation's name (part of the streams' seeds).
  """
  def one(section: str, i: int, rule: Effect) -> dict:
    ci = estimate(rule, data, reps=reps, confidence=confidence, rng=stream(seed, name, section, i))
    row = {"label": rule.title(), "formula": rule.formula(), "estimate": ci.estimate,
           "lo": ci.lo, "hi": ci.hi}
    if isinstance(rule, Criterion):
      row.update(rule=rule.rule(), description=rule.description, threshold=rule.threshold,
                 direction=rule.direction, verdict=rule.decide(ci))
    if isinstance(rule, Control):
      row["kind"] = rule.kind
    return row

  out = {
      "effects": [one("effect", i, r) for i, r in enumerate(effects)],
      "criteria": [one("criterion", i, r) for i, r in enumerate(criteria)],
      "controls": [one("control", i, r) for i, r in enumerate(controls)],
  }
  metrics = []
  for rule in (*criteria, *controls, *effects):
    metrics += [m for _, m in rule.operands() if m not in metrics]
  out["arms"] = {}
  for metric in metrics:
    row = {}
    for arm in data:
      if metric in data[arm]:
        ci = interval("iqm", data[arm][metric], reps=reps, confidence=confidence,
                      rng=stream(seed, name, "arm", arm, metric))
        row[arm] = list(ci)
    out["arms"][metric] = row
  out["verdict"], out["reason"] = overall_verdict(
      [c["verdict"] for c in out["criteria"]],
      [(c["kind"], c["label"], c["verdict"]) for c in out["controls"]])
  return out
