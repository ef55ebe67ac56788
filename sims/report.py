"""REPORT.md and figures, derived from results.json alone.

    python -m sims.report DIR [--figures]

re-derives every interval and verdict from the per-seed numbers and the pre-registered rules
stored in DIR/results.json (the same seeded bootstrap, so the numbers are identical), and writes
DIR/REPORT.md; `--figures` also redraws DIR/<name>.png. `python -m sims` writes its report by
calling `write`, so a regenerated report is byte-for-byte the one the run wrote. No number in
the report is typed by hand.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from typing import Any, Callable, Optional

import numpy as np

from sims import jsonio
from sims import stats

MATPLOTLIB_MISSING = ("matplotlib is not installed, so no figure was drawn "
                      "(`pip install -e '.[sims]'`, then `python -m sims.report DIR --figures`)")
ORDER = (stats.SUPPORTED, stats.REFUTED, stats.INCONCLUSIVE, stats.ERROR)


def load(out: str) -> dict:
  """Returns the parsed DIR/results.json."""
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


def arrays(record: dict) -> dict:
  """Returns a record's data as {arm: {metric: float64 array}} ('nan'/'inf' strings restored)."""
  return {arm: {m: np.array(v, dtype=np.float64) for m, v in metrics.items()}
          for arm, metrics in (record.get("data") or {}).items()}


def reanalyse(record: dict, bootstrap: dict) -> Optional[dict]:
  """Returns the analysis re-derived from a record's data and stored rules (None without data)."""
  if record.get("data") is None:
    return None
  rules = {k: [stats.rule_from_json(r) for r in record.get(k, [])]
           for k in ("criteria", "controls", "effects")}
  analysis = stats.analyse(arrays(record), name=record["name"], reps=bootstrap["reps"],
                           confidence=bootstrap["confidence"], seed=bootstrap["seed"], **rules)
  return json.loads(json.dumps(_jsonable(analysis)))


def _jsonable(x):
  return jsonio.jsonable(x)


# ---------------------------------------------------------------------------------------------
# Formatting.


def _f(x: Any) -> str:
  """Formats a number to 4 significant digits; 'nan'/'inf' strings pass through."""
  x = float(x)
  if not math.isfinite(x):
    return "undefined" if math.isnan(x) else ("∞" if x > 0 else "−∞")
  return f"{x:.4g}"


def _ci(row) -> str:
  return f"{_f(row['estimate'])} [{_f(row['lo'])}, {_f(row['hi'])}]"


def _cell(text: Any) -> str:
  return " ".join(str(text).split()).replace("|", "\\|")


def _short(text: str, n: int = 110) -> str:
  text = " ".join(text.split())
  return text if len(text) <= n else text[:n - 1].rstrip() + "…"


def _seconds(timing: dict, key: str) -> str:
  v = timing.get(key)
  return "–" if v is None else f"{float(v):.1f} s"


def render(results: dict, analyses: Optional[dict] = None) -> str:
  """Returns REPORT.md for parsed results (analyses: name -> re-derived analysis, else stored)."""
  analyses = analyses or {}
  cfg = results.get("config", {})
  boot = cfg.get("bootstrap", {})
  sims = results.get("simulations", [])
  git = results.get("git") or {}
  versions = results.get("versions") or {}
  commit = git.get("commit")
  commit = "unknown" if not commit else commit[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
  lines = [
      "# Simulation report", "",
      "Generated from `results.json` by `sims/report.py`; every number below comes from the run "
      "(regenerate with `python -m sims.report DIR`).", "",
      f"- run: {results.get('created', '?')}, {_path(cfg)}, "
      f"wall time {_seconds(results.get('timing', {}), 'total_s')}",
      f"- code: git `{commit}`; python {versions.get('python')}, jax {versions.get('jax')}, "
      f"numpy {versions.get('numpy')}, backend {versions.get('backend')}"
      + (f", XLA_FLAGS `{versions['xla_flags']}`" if versions.get("xla_flags") else ""),
      f"- statistics: interquartile mean (IQM); {boot.get('reps')} stratified bootstrap replicates "
      f"(seeds resampled within strata), {100 * float(boot.get('confidence', 0.95)):g}% percentile "
      f"intervals, bootstrap seed {boot.get('seed')}; probability of improvement P(X > Y) with "
      "ties ½ (Agarwal et al. 2021, arXiv 2108.13264)",
      "- verdicts: SUPPORTED if the interval clears the pre-registered threshold on the predicted "
      "side, REFUTED if it lies entirely on the wrong side, INCONCLUSIVE if it straddles it or a "
      "control failed",
  ]
  if cfg.get("quick"):
    lines += ["", "> **Quick run.** Verdicts from the quick path test that the code runs; read "
              "the full run for the evidence."]
  if any(r.get("figure_note") == MATPLOTLIB_MISSING for r in sims):
    lines += ["", f"> **No figures:** {MATPLOTLIB_MISSING}."]
  lines += ["", "## Summary", "",
            "| simulation | prediction | verdict | first criterion: estimate [95% CI] | seeds | time |",
            "|---|---|---|---|---|---|"]
  for r in sims:
    a = analyses.get(r["name"], r.get("analysis"))
    first = "–"
    if a and a["criteria"]:
      c = a["criteria"][0]
      first = f"{_cell(c['label'])} = {_ci(c)}"
    kind = " (harness self-check)" if r.get("selfcheck") else ""
    lines.append(f"| [{r['name']}](#{r['name']}){kind} | {_cell(_short(r.get('prediction', '')))} | "
                 f"**{_verdict(r, a)}** | {first} | {r.get('seeds', '–')} | "
                 f"{_seconds(r.get('timing', {}), 'total_s')} |")
  counts = {v: sum(_verdict(r, analyses.get(r["name"], r.get("analysis"))) == v for r in sims)
            for v in ORDER}
  lines += ["", " · ".join(f"{v}: {n}" for v, n in counts.items()), ""]
  for r in sims:
    lines += _section(r, analyses.get(r["name"], r.get("analysis")), results)
  return "\n".join(lines).rstrip() + "\n"


def _verdict(record: dict, analysis: Optional[dict]) -> str:
  return analysis["verdict"] if analysis else record.get("verdict", stats.ERROR)


def _section(r: dict, a: Optional[dict], results: dict) -> list[str]:
  name = r["name"]
  lines = ["---", "", f'<a id="{name}"></a>', "", f"## {name}: {_verdict(r, a)}", ""]
  if r.get("selfcheck"):
    lines += ["> **Harness self-check, not a prediction.** A synthetic effect of known sign "
              "checks the statistics, the verdict rules and the report end to end.", ""]
  lines += [f"**Question.** {r.get('question', '')}", "",
            f"**Prediction (as stated).** {r.get('prediction', '')}", "",
            f"**Setup.** {r.get('setup', '')}", ""]
  seeds = r.get("seeds")
  if seeds is not None:
    path = "quick path" if r.get("quick") else "full path"
    lines += [f"Seeds: {seeds} ({path}), run together with `jax.vmap`; arms are matched by seed.", ""]
  if r.get("config"):
    lines += ["Settings used: " + ", ".join(f"`{k}` = `{_cell(json.dumps(v))}`"
                                             for k, v in r["config"].items()), ""]
  lines += ["**Arms.**", ""] + [f"- `{arm}`: {text}" for arm, text in r.get("arms", {}).items()]
  lines.append("")
  if r.get("error"):
    tail = "\n".join(r["error"].rstrip().splitlines()[-15:])
    lines += ["**The simulation raised an error; no verdict.**", "", "```", tail, "```", ""]
  if r.get("figure"):
    lines += [f"![{name}]({r['figure']})", ""]
  elif r.get("figure_note"):
    lines += [f"_No figure: {r['figure_note']}._", ""]
  if a:
    lines += _arm_table(a, r)
    lines += _rules_table(a, r)
    if a["effects"]:
      lines += ["**Further effects (reported, no threshold).**", "", "| effect | estimate [95% CI] |",
                "|---|---|"]
      lines += [f"| {_cell(e['label'])} | {_ci(e)} |" for e in a["effects"]] + [""]
    lines += [f"**Verdict: {a['verdict']}**: {a['reason']}.", ""]
  if r.get("notes"):
    lines += ["**Notes.**", ""] + [f"- {n}" for n in r["notes"]] + [""]
  t = r.get("timing", {})
  lines += [f"Time: run {_seconds(t, 'run_s')}, analysis {_seconds(t, 'analysis_s')}, "
            f"figure {_seconds(t, 'figure_s')}.", ""]
  return lines


def _arm_table(a: dict, r: dict) -> list[str]:
  metrics = list(a["arms"])
  if not metrics:
    return []
  arms = [arm for arm in r.get("arms", {}) if any(arm in a["arms"][m] for m in metrics)]
  shapes = {tuple(np.shape(v)) for arm in r["data"].values() for m, v in arm.items() if m in metrics}
  strata = sorted({s[1] if len(s) > 1 else 1 for s in shapes})
  k = "×".join(str(s) for s in strata)
  lines = [f"**IQM per arm** (95% CI; {r.get('seeds')} seeds × {k} strata).", "",
           "| arm | " + " | ".join(f"`{m}`" for m in metrics) + " |",
           "|---" * (len(metrics) + 1) + "|"]
  for arm in arms:
    cells = []
    for m in metrics:
      v = a["arms"][m].get(arm)
      cells.append("–" if v is None else f"{_f(v[0])} [{_f(v[1])}, {_f(v[2])}]")
    lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
  return lines + [""]


def _rules_table(a: dict, r: dict) -> list[str]:
  lines = [f"**Pre-registered criteria** (declared in code before the run; rules SHA-256 "
           f"`{r.get('rules_sha256', '?')[:16]}`, registered {r.get('registered_at', '?')}).", "",
           "| role | rule | what it means | estimate [95% CI] | verdict |", "|---|---|---|---|---|"]
  for c in a["criteria"]:
    lines.append(f"| criterion | {_cell(c['rule'])} | {_cell(c['description'])} | {_ci(c)} | "
                 f"**{c['verdict']}** |")
  for c in a["controls"]:
    lines.append(f"| {c['kind']} control | {_cell(c['rule'])} | {_cell(c['description'])} | "
                 f"{_ci(c)} | **{c['verdict']}** |")
  lines.append("")
  if r.get("amendment"):
    lines += [f"_Amendment (declared in code; its text says what changed, when and why):_ {r['amendment']}", ""]
  return lines


# ---------------------------------------------------------------------------------------------
# Figures.


def draw_figure(record: dict, out: str, plot: Optional[Callable[..., None]] = None
                ) -> tuple[Optional[str], Optional[str]]:
  """Draws DIR/<name>.png; returns (file name, None) or (None, why there is no figure).

  The default figure has one panel per metric a rule reads (every seed's value as a dot, the
  IQM with its 95% CI as a bar, per arm) and one panel per criterion and control (the interval
  against its threshold). `plot(fig, data, analysis)` replaces it when a simulation has its own.
  """
  try:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, MATPLOTLIB_MISSING
  a = record.get("analysis")
  if not a:
    return None, "no analysis to plot"
  data = arrays(record)
  fname = f"{record['name']}.png"
  try:
    if plot is not None:
      fig = Figure(figsize=(10, 6), layout="constrained")
      plot(fig, data, a)
    else:
      fig = _default_figure(Figure, record["name"], data, a)
    fig.savefig(os.path.join(out, fname), dpi=100)
  except Exception as e:  # pylint: disable=broad-except
    return None, f"drawing the figure failed: {type(e).__name__}: {e}"
  return fname, None


def _default_figure(Figure, name: str, data: dict, a: dict):
  metrics = list(a["arms"])
  rules = [("criterion", c) for c in a["criteria"]] + [(f"{c['kind']} control", c) for c in a["controls"]]
  panels = len(metrics) + len(rules)
  cols = min(3, panels)
  rows = -(-panels // cols)
  fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
  fig.suptitle(name)
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  rng = np.random.default_rng(0)  # jitter only
  for ax, metric in zip(axes, metrics):
    arms = list(a["arms"][metric])
    for i, arm in enumerate(arms):
      v = data[arm][metric].reshape(-1)
      ax.scatter(i + rng.uniform(-0.15, 0.15, v.shape), v, s=9, alpha=0.45, color="tab:gray")
      est, lo, hi = (float(x) for x in a["arms"][metric][arm])
      if all(map(math.isfinite, (est, lo, hi))):
        ax.errorbar([i], [est], yerr=[[est - lo], [hi - est]], fmt="o", color="tab:blue", capsize=4)
    ax.set_xticks(range(len(arms)), arms, rotation=30 if len(arms) > 3 else 0, ha="right" if len(arms) > 3 else "center", fontsize=8)
    ax.set_title(f"{metric}: seeds and IQM [95% CI]", fontsize=9)
  for ax, (role, c) in zip(axes[len(metrics):], rules):
    est, lo, hi = (float(c[k]) for k in ("estimate", "lo", "hi"))
    color = {"SUPPORTED": "tab:green", "REFUTED": "tab:red"}.get(c["verdict"], "tab:orange")
    if all(map(math.isfinite, (est, lo, hi))):
      ax.errorbar([est], [0], xerr=[[est - lo], [hi - est]], fmt="o", color=color, capsize=5)
    t = c["threshold"]
    for t in (t if isinstance(t, list) else [t]):
      ax.axvline(t, color="black", ls="--", lw=1)
    ax.set_yticks([])
    ax.set_title(f"{role}: {c['verdict']}\n{_short(c['rule'], 60)}", fontsize=8)
  for ax in axes[panels:]:
    ax.set_visible(False)
  return fig


# ---------------------------------------------------------------------------------------------
# Writing.


def _path(cfg: dict) -> str:
  if cfg.get("smoke"):
    return "**smoke** path (a few steps and 2 seeds: checks the code runs; the verdicts mean nothing)"
  return "**quick** path (fewer seeds and steps)" if cfg.get("quick") else "full path"


def write(out: str, figures: bool = False) -> str:
  """Re-derives the analysis from DIR/results.json and writes DIR/REPORT.md; returns its path.

  Args:
    out: the run folder.
    figures: also redraw DIR/<name>.png (a simulation's own `plot` is used when its module
      imports), updating the figure entries of results.json.
  """
  results = load(out)
  boot = results["config"]["bootstrap"]
  analyses, changed = {}, []
  for r in results["simulations"]:
    a = reanalyse(r, boot)
    if a is not None:
      analyses[r["name"]] = a
      if a != r.get("analysis"):
        changed.append(r["name"])
  if figures:
    for r in results["simulations"]:
      if r.get("data") is not None:
        r["analysis"] = analyses[r["name"]]
        r["figure"], r["figure_note"] = draw_figure(r, out, plot=_sim_plot(r["name"]))
    jsonio.write_json(os.path.join(out, "results.json"), results)
  if changed:
    print(f"note: the analysis re-derived with the current code differs from the stored one for "
          f"{', '.join(changed)}; the report shows the re-derived one", file=sys.stderr)
  text = render(results, analyses)
  path = os.path.join(out, "REPORT.md")
  with open(path, "w") as f:
    f.write(text)
  return path


def _sim_plot(name: str) -> Optional[Callable[..., None]]:
  try:
    return getattr(importlib.import_module(f"sims.{name}").SIMULATION, "plot", None)
  except Exception:  # pylint: disable=broad-except
    return None


def main(argv: list[str]) -> None:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) != 2:
    raise app.UsageError("usage: python -m sims.report DIR [--figures]")
  print(write(argv[1], figures=flags.FLAGS.figures))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_boolean("figures", False, "Also redraw the PNG figures.")
  app.run(main)
