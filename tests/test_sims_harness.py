"""Tests of the simulation harness on inputs whose answer is known: statistics, rules, CLI, report."""

import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from sims import harness
from sims import report
from sims import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------- IQM


def _trimmed_mean_loop(values):
  """An independent IQM: drop ⌊n/4⌋ smallest and largest one at a time, then average."""
  v = sorted(float(x) for x in values)
  for _ in range(len(v) // 4):
    v.pop(0)
    v.pop()
  return sum(v) / len(v)


def test_iqm_known_values():
  assert stats.iqm(np.arange(1, 9)) == 4.5  # mean of 3, 4, 5, 6
  assert stats.iqm([0, 1, 2, 3, 4, 5, 6, 1000]) == 3.5  # the outlier is cut
  assert stats.iqm([7.0]) == 7.0
  assert stats.iqm([1.0, 2.0, 10.0]) == pytest.approx(13 / 3)  # n < 4: nothing is cut


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 31])
def test_iqm_matches_loop_and_scipy(n):
  x = np.random.default_rng(n).standard_cauchy(n)
  assert stats.iqm(x) == pytest.approx(_trimmed_mean_loop(x), rel=1e-12)
  assert stats.iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25), rel=1e-12)


def test_iqm_axis_pools_and_propagates_nan():
  x_3x7 = np.random.default_rng(0).normal(size=(3, 7))
  np.testing.assert_allclose(stats.iqm(x_3x7, axis=1), [_trimmed_mean_loop(r) for r in x_3x7])
  assert stats.iqm(x_3x7) == pytest.approx(_trimmed_mean_loop(x_3x7.ravel()))
  x_3x7[1, 6] = np.nan
  out = stats.iqm(x_3x7, axis=1)
  assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
  assert np.isnan(stats.iqm(x_3x7))  # a diverged seed is not trimmed away


# ------------------------------------------------------------------- probability of improvement


def _poi_loop(x_SxK, y_TxK):
  ps = []
  for k in range(x_SxK.shape[1]):
    wins = [1.0 if a > b else 0.5 if a == b else 0.0
            for a, b in itertools.product(x_SxK[:, k], y_TxK[:, k])]
    ps.append(sum(wins) / len(wins))
  return sum(ps) / len(ps)


def test_probability_of_improvement_known_values():
  x = np.arange(5.0)
  assert stats.probability_of_improvement(x + 10, x) == 1.0
  assert stats.probability_of_improvement(x, x + 10) == 0.0
  assert stats.probability_of_improvement(x, x) == 0.5
  assert stats.probability_of_improvement([1.0, 2.0], [1.0, 1.0]) == 0.75  # ties count ½


def test_probability_of_improvement_matches_loop_with_strata_and_ties():
  rng = np.random.default_rng(1)
  x_SxK = rng.integers(0, 4, (7, 3)).astype(float)  # small integers: many ties
  y_TxK = rng.integers(0, 4, (5, 3)).astype(float)
  assert stats.probability_of_improvement(x_SxK, y_TxK) == pytest.approx(_poi_loop(x_SxK, y_TxK))


# -------------------------------------------------------------------------------- bootstrap


def test_bootstrap_covers_true_difference_at_nominal_rate():
  rng = np.random.default_rng(0)
  offsets_K, delta, trials, hits = np.array([0.0, 3.0]), 0.7, 200, 0
  for t in range(trials):
    x = rng.normal(size=(20, 2)) + offsets_K + delta
    y = rng.normal(size=(20, 2)) + offsets_K
    ci = stats.interval("iqm_diff", x, y, reps=500, rng=t, paired=False)
    hits += ci.lo <= delta <= ci.hi
  assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_bootstrap_interval_shrinks_with_seeds():
  rng = np.random.default_rng(1)

  def mean_width(n):
    widths = []
    for t in range(20):
      x, y = rng.normal(size=(2, n, 3))
      ci = stats.interval("iqm_diff", x + 1.0, y, reps=500, rng=t, paired=False)
      widths.append(ci.hi - ci.lo)
    return np.mean(widths)

  assert mean_width(40) < 0.65 * mean_width(10)  # ≈ 0.5 for a √n rate


def test_bootstrap_resamples_within_strata():
  # Constant within each stratum: every stratified replicate pools the same numbers, so the
  # interval has no width. Resampling across strata would move the IQM.
  x_SxK = np.tile([0.0, 1.0, 100.0], (6, 1))
  ci = stats.interval("iqm", x_SxK, reps=300)
  assert ci.lo == ci.hi == ci.estimate == stats.iqm(x_SxK)


def test_paired_bootstrap_removes_shared_seed_shift_and_is_deterministic():
  rng = np.random.default_rng(2)
  shift_S1 = 5.0 * rng.normal(size=(12, 1))  # what matched arms share
  x = shift_S1 + 1.0 + 0.1 * rng.normal(size=(12, 2))
  y = shift_S1 + 0.1 * rng.normal(size=(12, 2))
  paired = stats.interval("mean_diff", x, y, reps=500, rng=3)
  unpaired = stats.interval("mean_diff", x, y, reps=500, rng=3, paired=False)
  assert paired.hi - paired.lo < 0.2 * (unpaired.hi - unpaired.lo)
  assert paired.lo > 0.8 and paired.hi < 1.2
  assert stats.interval("mean_diff", x, y, reps=500, rng=3) == paired  # seeded: reproducible


def test_probability_of_improvement_interval():
  x = np.arange(8.0)
  assert stats.interval("prob_improvement", x + 100, x, reps=200) == (1.0, 1.0, 1.0)
  ci = stats.interval("prob_improvement", x, x, reps=500, paired=False)
  assert ci.estimate == 0.5 and ci.lo < 0.5 < ci.hi
  # Paired resampling of one arm against itself draws the same seeds for both: always ½.
  assert stats.interval("prob_improvement", x, x, reps=500) == (0.5, 0.5, 0.5)


def test_undefined_statistic_gives_undefined_interval():
  ci = stats.interval("iqm_ratio", np.ones(6), np.zeros(6), reps=100)
  assert np.isnan(ci.lo) and np.isnan(ci.hi)


# ------------------------------------------------------------------------------------ rules


def _crit(direction, threshold):
  return stats.Criterion(arm="a", metric="m", threshold=threshold, direction=direction)


@pytest.mark.parametrize("direction,threshold,ci,want", [
    ("greater", 0.3, (0.5, 0.4, 0.6), stats.SUPPORTED),
    ("greater", 0.3, (0.1, 0.0, 0.2), stats.REFUTED),
    ("greater", 0.3, (0.3, 0.2, 0.4), stats.INCONCLUSIVE),
    ("greater", 0.3, (0.4, 0.3, 0.5), stats.SUPPORTED),  # the bound may touch the threshold
    ("less", 2.0, (1.0, 0.5, 1.5), stats.SUPPORTED),
    ("less", 2.0, (3.0, 2.5, 3.5), stats.REFUTED),
    ("less", 2.0, (2.0, 1.5, 2.5), stats.INCONCLUSIVE),
    ("within", (-0.5, 0.5), (0.0, -0.2, 0.3), stats.SUPPORTED),
    ("within", (-0.5, 0.5), (1.0, 0.8, 1.2), stats.REFUTED),
    ("within", (-0.5, 0.5), (-1.0, -1.2, -0.8), stats.REFUTED),
    ("within", (-0.5, 0.5), (0.4, 0.2, 0.7), stats.INCONCLUSIVE),
    ("greater", 0.3, (0.5, float("nan"), float("nan")), stats.INCONCLUSIVE),
])
def test_criterion_decide(direction, threshold, ci, want):
  assert _crit(direction, threshold).decide(stats.Interval(*ci)) == want


def test_rules_reject_bad_declarations():
  with pytest.raises(ValueError, match="direction"):
    _crit("bigger", 1.0)
  with pytest.raises(ValueError, match="within"):
    _crit("within", 1.0)
  with pytest.raises(ValueError, match="one threshold"):
    _crit("greater", (0.0, 1.0))
  with pytest.raises(ValueError, match="baseline"):
    stats.Effect(arm="a", metric="m", statistic="iqm_diff")
  with pytest.raises(ValueError, match="unknown statistic"):
    stats.Effect(arm="a", metric="m", statistic="mode")
  with pytest.raises(ValueError, match="positive"):
    stats.Control(kind="sideways", arm="a", metric="m", threshold=0.0)


def test_rules_round_trip_through_json():
  for rule in (stats.Effect(arm="a", metric="m", statistic="prob_improvement", baseline="b"),
               _crit("within", (-1, 2)),
               stats.Control(kind="negative", arm="a", metric="m", statistic="iqm_ratio",
                             baseline_metric="n", threshold=0.8, description="x")):
    assert stats.rule_from_json(json.loads(json.dumps(rule.to_json()))) == rule


@pytest.mark.parametrize("criteria,controls,want", [
    ([stats.SUPPORTED, stats.SUPPORTED], [("positive", "p", stats.SUPPORTED)], stats.SUPPORTED),
    ([stats.SUPPORTED, stats.REFUTED], [("positive", "p", stats.SUPPORTED)], stats.REFUTED),
    ([stats.SUPPORTED, stats.INCONCLUSIVE], [], stats.INCONCLUSIVE),
    ([stats.SUPPORTED], [("positive", "p", stats.INCONCLUSIVE)], stats.INCONCLUSIVE),
    ([stats.REFUTED], [("positive", "p", stats.REFUTED)], stats.INCONCLUSIVE),
    ([stats.SUPPORTED], [("positive", "p", stats.SUPPORTED), ("negative", "n", stats.REFUTED)],
     stats.INCONCLUSIVE),
])
def test_overall_verdict(criteria, controls, want):
  verdict, reason = stats.overall_verdict(criteria, controls)
  assert verdict == want and reason


def _synthetic(effect, positive_effect, seeds=12):
  rng = np.random.default_rng(0)
  base = rng.normal(size=(seeds, 3))
  return {"control": {"score": base},
          "treated": {"score": base + effect + 0.1 * rng.normal(size=(seeds, 3))},
          "positive": {"score": base + positive_effect + 0.1 * rng.normal(size=(seeds, 3))}}


CRITERION = stats.Criterion(arm="treated", metric="score", statistic="iqm_diff",
                            baseline="control", threshold=0.5)
POSITIVE = stats.Control(kind="positive", arm="positive", metric="score", statistic="iqm_diff",
                         baseline="control", threshold=1.0)


@pytest.mark.parametrize("effect,positive_effect,want", [
    (1.0, 3.0, stats.SUPPORTED),
    (-1.0, 3.0, stats.REFUTED),
    (0.5, 3.0, stats.INCONCLUSIVE),  # the interval straddles the threshold
    (1.0, 0.0, stats.INCONCLUSIVE),  # the positive control failed: the effect cannot be read
])
def test_analyse_verdicts_on_synthetic_data(effect, positive_effect, want):
  a = stats.analyse(_synthetic(effect, positive_effect), criteria=[CRITERION], controls=[POSITIVE],
                    reps=500, name="t")
  assert a["verdict"] == want, a
  assert set(a["arms"]["score"]) == {"control", "treated", "positive"}
  if positive_effect == 0.0:
    assert "positive control" in a["reason"] and a["criteria"][0]["verdict"] == stats.SUPPORTED


# ---------------------------------------------------------------------------- harness pieces


def test_vmap_seeds_matches_a_loop_over_split_keys():
  import jax  # pylint: disable=import-outside-toplevel

  fn = lambda k: {"u": jax.random.uniform(k, (3,)), "n": jax.random.normal(k)}
  key = jax.random.PRNGKey(7)
  out = harness.vmap_seeds(fn, key, 5)
  chunked = harness.vmap_seeds(fn, key, 5, batch_size=2)
  for s, k in enumerate(jax.random.split(key, 5)):
    np.testing.assert_allclose(out["u"][s], fn(k)["u"], rtol=1e-6)
    np.testing.assert_allclose(chunked["n"][s], fn(k)["n"], rtol=1e-6)
  assert out["u"].shape == (5, 3)


def _sim(run, **kw):
  args = dict(name="sim_unit", question="q", prediction="p", setup="s",
              arms={"control": "c", "treated": "t", "positive": "p"}, criteria=[CRITERION],
              controls=[POSITIVE], run=run)
  args.update(kw)
  return harness.Simulation(**args)


def test_simulation_validates_its_declaration():
  with pytest.raises(ValueError, match="undeclared arm"):
    _sim(None, arms={"control": "c", "treated": "t"})
  with pytest.raises(ValueError, match="must match"):
    _sim(None, name="Selftest")
  with pytest.raises(ValueError, match="at least one criterion"):
    _sim(None, criteria=[])


def test_run_simulation_records_errors_instead_of_crashing():
  boot = {"reps": 200, "confidence": 0.95, "seed": 0}

  def boom(seeds, quick, key):
    raise RuntimeError("kaput")

  rec = harness.run_simulation(_sim(boom), seeds=4, quick=True, key=None, bootstrap=boot)
  assert rec["verdict"] == stats.ERROR and "kaput" in rec["error"]
  missing_arm = lambda seeds, quick, key: {"control": {"score": np.zeros(seeds)}}
  rec = harness.run_simulation(_sim(missing_arm), seeds=4, quick=True, key=None, bootstrap=boot)
  assert rec["verdict"] == stats.ERROR and "declared" in rec["error"]
  wrong_seeds = lambda seeds, quick, key: _synthetic(1.0, 3.0, seeds=seeds + 1)
  rec = harness.run_simulation(_sim(wrong_seeds), seeds=4, quick=True, key=None, bootstrap=boot)
  assert rec["verdict"] == stats.ERROR and "leading seed axis" in rec["error"]
  text = report.render({"config": {"bootstrap": boot}, "simulations": [rec]})
  assert "## sim_unit: ERROR" in text and "leading seed axis" in text


def test_jsonable_keeps_non_finite_numbers():
  x = {"a": np.array([1.5, np.nan, np.inf, -np.inf], np.float32), "b": (np.int64(3), True)}
  back = json.loads(json.dumps(harness.jsonable(x), allow_nan=False))
  np.testing.assert_array_equal(np.array(back["a"], dtype=float), [1.5, np.nan, np.inf, -np.inf])
  assert back["b"] == [3, True]


def test_select_rejects_unknown_names():
  assert "sim_selftest" in harness.available()
  assert harness.select(["sim_selftest"]) == ["sim_selftest"]
  with pytest.raises(ValueError, match=r"unknown simulation\(s\): nope; available: .*sim_selftest"):
    harness.select(["sim_selftest", "nope"])


# ------------------------------------------------------------------------------ end to end


def _python(*args, cwd=ROOT):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=120)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sims"))
  proc = _python("-m", "sims", "--quick", "--only", "sim_selftest", "--out", out,
                 "--bootstrap_reps", "500")
  assert proc.returncode == 0, proc.stderr
  return out, proc


def test_cli_quick_writes_report_results_and_figure(quick_run):
  out, proc = quick_run
  has_mpl = importlib.util.find_spec("matplotlib") is not None  # the `sims` extra; CI installs `test` only
  for f in ("REPORT.md", "results.json") + (("sim_selftest.png",) if has_mpl else ()):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  assert "1/1" in proc.stderr  # the progress bar
  text = open(os.path.join(out, "REPORT.md")).read()
  assert "## sim_selftest: SUPPORTED" in text and "**Verdict: SUPPORTED**" in text
  assert "Harness self-check, not a prediction" in text
  if has_mpl:
    assert "![sim_selftest](sim_selftest.png)" in text
  else:
    assert "matplotlib is not installed" in text and not os.path.exists(os.path.join(out, "sim_selftest.png"))
  results = report.load(out)
  rec = results["simulations"][0]
  assert rec["seeds"] == 6 and rec["quick"] and results["config"]["bootstrap"]["reps"] == 500
  assert np.shape(rec["data"]["treated"]["score"]) == (6, 3)  # every number, per seed
  assert set(results["versions"]) >= {"jax", "numpy", "python"} and "commit" in results["git"]
  if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # the CLI's --xla_level 1
    assert results["versions"]["xla_flags"].endswith("--xla_backend_optimization_level=1")
    assert "XLA_FLAGS `" in text and "--xla_backend_optimization_level=1`" in text
  assert rec["timing"]["run_s"] > 0 and len(rec["rules_sha256"]) == 64
  assert [c["verdict"] for c in rec["analysis"]["controls"]] == [stats.SUPPORTED] * 2


def test_report_regenerates_identically_from_results_json(quick_run, tmp_path):
  out, _ = quick_run
  written = open(os.path.join(out, "REPORT.md")).read()
  copy = tmp_path / "run"
  copy.mkdir()
  (copy / "results.json").write_text(open(os.path.join(out, "results.json")).read())
  proc = _python("-m", "sims.report", str(copy))
  assert proc.returncode == 0, proc.stderr
  assert "differs" not in proc.stderr  # re-derived analysis == stored analysis
  assert (copy / "REPORT.md").read_text() == written
  rec = report.load(out)["simulations"][0]
  assert report.reanalyse(rec, report.load(out)["config"]["bootstrap"]) == rec["analysis"]


def test_report_says_so_when_matplotlib_is_missing(quick_run, tmp_path, monkeypatch):
  out, _ = quick_run
  results = report.load(out)
  rec = results["simulations"][0]
  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
  rec["figure"], rec["figure_note"] = report.draw_figure(rec, str(tmp_path))
  assert rec["figure"] is None and not os.listdir(tmp_path)
  text = report.render(results)
  assert "matplotlib is not installed" in text and "![sim_selftest]" not in text


def test_cli_unknown_only_name_errors_with_the_available_names(tmp_path):
  proc = _python("-m", "sims", "--only", "sim_selftest,no_such_sim", "--out", str(tmp_path))
  assert proc.returncode != 0
  assert "unknown simulation(s): no_such_sim" in proc.stderr and "sim_selftest" in proc.stderr
  assert not os.listdir(tmp_path)


def test_run_suite_starts_the_costliest_first_and_keeps_the_record_order(tmp_path, monkeypatch):
  started = []

  def make(name, cost):
    def run(seeds, quick, key):
      started.append(name)
      return _synthetic(1.0, 3.0, seeds=seeds)
    return _sim(run, name=name, cost=cost)

  sims = {"sim_a": make("sim_a", 1.0), "sim_b": make("sim_b", 5.0), "sim_c": make("sim_c", 1.0),
          "sim_d": make("sim_d", 7.0)}
  monkeypatch.setattr(harness, "select", lambda only=None: list(only))
  monkeypatch.setattr(harness, "load", lambda name, smoke=False: sims[name])
  out = harness.run_suite(list(sims), out=str(tmp_path), quick=True, seeds=4, reps=200, figures=False,
                          progress=io.StringIO(), jobs=1)
  assert started == ["sim_d", "sim_b", "sim_a", "sim_c"]  # by cost; ties in the given order
  assert [r["name"] for r in out["simulations"]] == list(sims)
  with pytest.raises(ValueError, match="cost must be > 0"):
    _sim(None, cost=0.0)


def test_set_xla_backend_level_validates_keeps_the_users_flag_and_refuses_after_backend_init(monkeypatch):
  with pytest.raises(ValueError, match="0-3"):
    harness.set_xla_backend_level(4)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=2")
  assert harness.set_xla_backend_level(1).endswith("--xla_backend_optimization_level=2")  # the user's wins
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()  # the backend exists now: XLA has read its flags, so a new level cannot apply
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with pytest.raises(RuntimeError, match="before JAX initialises"):
    harness.set_xla_backend_level(1)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"  # left as it was
