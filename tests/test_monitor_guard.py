"""Drift monitors, the guard and the logger, checked against independent numpy derivations."""

import functools
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dreamjax import model as M
from dreamjax.model import layout
from dreamjax.train import batch as batch_lib
from dreamjax.train import log as log_lib
from dreamjax.train import diagnostics
from dreamjax.train import evaluation
from dreamjax.train import guard as guard_lib
from dreamjax.train import step as step_lib


@functools.lru_cache(maxsize=None)
def setup(name):
  cfg = M.ModelConfig.preset(name)
  return cfg, M.init_params(cfg, jax.random.PRNGKey(3), std=0.1)


# The toy trees' layer order: 3 layers of two kinds (linear, full, linear), so the per-kind stacks
# (dreamjax.model.layout) must be mapped back to model order.
TOY_CFG = M.ModelConfig.preset("qwen3_5-tiny")


def toy_tree(rng, dtype=np.float32, scale=1.0, stacked=True):
  """A params-shaped tree with prime sizes: 3 layers of (7, 11) / (11, 7) / (7, 5) matrices.

  stacked=False: the same numbers with 'layers' as a list of per-layer dicts (the numpy side).
  """
  d, f, v = 7, 11, 13
  mat = lambda *s: jnp.asarray(rng.normal(size=s) * scale, dtype)
  layer = lambda: {"input_norm": mat(d), "mlp": {"up_proj": mat(d, f), "down_proj": mat(f, d)},
                   "attn": {"q_proj": mat(d, 5), "q_norm": mat(5)}}
  tree = {"embed": mat(v, d), "layers": [layer() for _ in range(3)], "final_norm": mat(d), "lm_head": mat(d, v)}
  return stack(tree) if stacked else tree


def stack(tree):
  return dict(tree, layers=layout.stack(tree["layers"], TOY_CFG))


def np_leaves(tree):
  """Returns [(name, float64 array)] in path order, names joined with '/'."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out.append((name, np.asarray(jnp.asarray(x, jnp.float32), np.float64)))
  return out


# ---------------------------------------------------------------------------------------------
# Weight drift and gradient norms.


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_weight_drift_matches_numpy(dtype):
  rng = np.random.default_rng(0)
  base = toy_tree(rng, dtype, stacked=False)
  delta = toy_tree(rng, dtype, scale=0.05, stacked=False)
  params = jax.tree.map(lambda a, b: (a + b).astype(dtype), base, delta)
  drift = jax.jit(diagnostics.weight_drift, static_argnames="config")
  got = drift(stack(params), stack(base), config=TOY_CFG)
  p, b = dict(np_leaves(params)), dict(np_leaves(base))
  rel = lambda names: np.sqrt(sum(np.sum((p[n] - b[n]) ** 2) for n in names)) / np.sqrt(
      sum(np.sum(b[n] ** 2) for n in names))
  expected = {}
  for i in range(3):
    names = [n for n in p if n.startswith(f"layers/{i}/")]
    expected[f"drift/layer_{i}"] = rel(names)
    for n in names:
      if p[n].ndim == 2:
        expected[f"drift/layer_{i}/{n[len(f'layers/{i}/'):]}"] = rel([n])
  expected["drift/embed"], expected["drift/lm_head"] = rel(["embed"]), rel(["lm_head"])
  expected["drift/max"] = max(expected[f"drift/layer_{i}"] for i in range(3))
  expected["drift/total"] = rel(list(p))
  assert set(got) == set(expected)  # 1-D leaves (norms) get no figure of their own
  for k in expected:
    assert got[k].dtype == jnp.float32
    np.testing.assert_allclose(float(got[k]), expected[k], rtol=2e-5, err_msg=k)
  assert float(drift(stack(base), stack(base), config=TOY_CFG)["drift/max"]) == 0.0


def test_weight_drift_rejects_mismatched_trees():
  rng = np.random.default_rng(1)
  base = toy_tree(rng)
  with pytest.raises(ValueError, match="different structures"):
    diagnostics.weight_drift({k: v for k, v in base.items() if k != "lm_head"}, base, TOY_CFG)
  other = toy_tree(rng)
  other["layers"][M.LINEAR]["mlp"]["up_proj"] = jnp.zeros((2, 7, 13))
  with pytest.raises(ValueError, match="layers/linear_attention/mlp/up_proj has shape"):
    diagnostics.weight_drift(other, base, TOY_CFG)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_layer_grad_norms_match_numpy_row_norms(dtype):
  rng = np.random.default_rng(2)
  grads = toy_tree(rng, dtype, scale=3.0, stacked=False)
  grads["layers"][2]["mlp"]["down_proj"] = grads["layers"][2]["mlp"]["down_proj"].at[4].mul(50.0)  # one hot row
  got = jax.jit(diagnostics.layer_grad_norms, static_argnames="config")(stack(grads), config=TOY_CFG)
  g = dict(np_leaves(grads))
  expected, layer_norms = {}, []
  for i in range(3):
    names = [n for n in g if n.startswith(f"layers/{i}/")]
    rows = []
    for n in names:
      if g[n].ndim == 2:
        r = np.linalg.norm(g[n], axis=1)  # one norm per stored row
        rows.append(r)
        short = n[len(f"layers/{i}/"):]
        expected[f"grad/layer_{i}/{short}/row_max"] = r.max()
        expected[f"grad/layer_{i}/{short}/row_rms"] = np.sqrt(np.mean(r**2))
    all_rows = np.concatenate(rows)
    expected[f"grad/layer_{i}/norm"] = np.sqrt(sum(np.sum(g[n] ** 2) for n in names))
    expected[f"grad/layer_{i}/row_max"] = all_rows.max()
    expected[f"grad/layer_{i}/row_rms"] = np.sqrt(np.mean(all_rows**2))
    layer_norms.append(expected[f"grad/layer_{i}/norm"])
  for n in ("embed", "lm_head"):
    r = np.linalg.norm(g[n], axis=1)
    expected[f"grad/{n}/row_max"], expected[f"grad/{n}/row_rms"] = r.max(), np.sqrt(np.mean(r**2))
    expected[f"grad/{n}/norm"] = np.linalg.norm(g[n])
  expected["grad/norm"] = np.sqrt(sum(np.sum(x**2) for x in g.values()))
  expected["grad/layer_norm_max"] = max(layer_norms)
  assert set(got) == set(expected)
  for k in expected:
    assert got[k].dtype == jnp.float32, k
    np.testing.assert_allclose(float(got[k]), expected[k], rtol=2e-5, err_msg=k)
  # The hot row shows in its layer and matrix, not in the others.
  assert float(got["grad/layer_2/row_max"]) == float(got["grad/layer_2/mlp/down_proj/row_max"])
  assert float(got["grad/layer_2/row_max"]) > 10 * float(got["grad/layer_1/row_max"])
  assert set(diagnostics.layer_grad_norms(stack(grads), TOY_CFG, per_matrix=False)) == {
      k for k in expected if k.count("/") <= 2 or not k.startswith("grad/layer_")}


# ---------------------------------------------------------------------------------------------
# Residual growth and perplexity against the model.


# One model and one padded shape (B, N) = (4, 3 + 13) for every model test: each compiles once.
CFG_NAME, B, C, R = "qwen3-tiny", 4, 3, 13


@functools.lru_cache(maxsize=None)
def reference_forward():
  """Returns the decoder's forward with hidden states, jitted (the reference path's one compile)."""
  cfg, _ = setup(CFG_NAME)
  return jax.jit(lambda p, t, pos, m: M.forward(p, t, pos, m, config=cfg, return_hidden=True))


def test_residual_growth_matches_numpy_from_hidden_states():
  cfg, params = setup(CFG_NAME)
  rng = np.random.default_rng(3)
  tokens = rng.integers(3, cfg.vocab_size, (B, C + R)).astype(np.int32)
  mask = np.ones((B, C + R), np.int32)
  mask[0, :5] = 0  # left pads
  mask[2, 11:] = 0  # right pads
  got = jax.jit(diagnostics.residual_growth, static_argnames="config")(params, tokens, mask, config=cfg)
  hidden = reference_forward()(params, tokens, M.positions_from_mask(mask), mask).hidden
  h = [np.asarray(x, np.float64) for x in hidden]
  np.testing.assert_array_equal(h[0], np.asarray(params["embed"])[tokens])  # h_0 is the embedding
  on = mask.astype(bool)
  norms = [np.linalg.norm(x, axis=-1)[on] for x in h]  # real tokens only
  growth = [np.mean(norms[i + 1] / norms[i]) for i in range(cfg.num_layers)]
  for i in range(cfg.num_layers):
    np.testing.assert_allclose(float(got[f"residual_growth/layer_{i}"]), growth[i], rtol=1e-5)
    np.testing.assert_allclose(float(got[f"residual_norm/layer_{i}"]), np.mean(norms[i]), rtol=1e-5)
  np.testing.assert_allclose(float(got["residual_norm/final"]), np.mean(norms[-1]), rtol=1e-5)
  np.testing.assert_allclose(float(got["residual_growth/max"]), max(growth), rtol=1e-5)
  # Pads are left out: a mean over all positions would differ.
  all_pos = np.mean(np.linalg.norm(h[1], axis=-1) / np.linalg.norm(h[0], axis=-1))
  assert abs(all_pos - growth[0]) > 1e-4
  rel = diagnostics.growth_vs_base(got, {k: 2 * float(v) for k, v in got.items()})
  np.testing.assert_allclose(rel["residual_growth/max_vs_base"], 0.5, rtol=1e-6)


def general_batch(cfg, seed, lens, extra=()):
  """Returns (examples, batch): general examples of the given lengths plus `extra` ones, collated."""
  rng = np.random.default_rng(seed)
  exs = [batch_lib.general_example(rng.integers(3, cfg.vocab_size, n).tolist()) for n in lens] + list(extra)
  return exs, batch_lib.collate(exs, C, R)


def np_nll(cfg, params, examples):
  """Returns [(Σ NLL, count)] of each example's response tokens, from logits of the unpadded text.

  Each row is the example followed by filler tokens, every position real (mask all ones,
  positions 0..N−1): the model is causal, so the filler cannot change the scored logits, and
  no padding logic is involved.
  """
  n = C + R
  seqs = np.full((len(examples), n), 5, np.int32)
  for i, ex in enumerate(examples):
    toks = list(ex.context) + list(ex.chosen)
    seqs[i, : len(toks)] = toks
  pos = np.broadcast_to(np.arange(n, dtype=np.int32), seqs.shape)
  logits = reference_forward()(params, seqs, pos, np.ones_like(seqs)).logits
  lg = np.asarray(logits, np.float64)
  logp = lg - lg.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  out = []
  for i, ex in enumerate(examples):
    c = len(ex.context)
    out.append((-sum(logp[i, c - 1 + j, y] for j, y in enumerate(ex.chosen)), len(ex.chosen)))
  return out


def test_perplexity_is_exp_of_token_pooled_nll():
  cfg, params = setup(CFG_NAME)
  longer = batch_lib.TokenizedExample(context=[5, 7, 11], chosen=[13, 17, 19, 23, 29])
  ex1, b1 = general_batch(cfg, 4, [9, 3, 14], [longer])
  ex2, b2 = general_batch(cfg, 5, [5, 2, 3, 2])
  r1, r2 = np_nll(cfg, params, ex1), np_nll(cfg, params, ex2)
  (s1, n1), (s2, n2) = map(sum, zip(*r1)), map(sum, zip(*r2))
  ppl1 = jax.jit(evaluation.general_perplexity, static_argnames="config")(params, b1, config=cfg)
  np.testing.assert_allclose(float(ppl1), math.exp(s1 / n1), rtol=1e-5)
  # Pooled over batches by tokens (not a mean of the batches' perplexities).
  pooled = math.exp((s1 + s2) / (n1 + n2))
  np.testing.assert_allclose(evaluation.held_out_perplexity(params, [b1, b2], cfg), pooled, rtol=1e-5)
  assert abs(pooled - 0.5 * (math.exp(s1 / n1) + math.exp(s2 / n2))) > 1e-3 * pooled


def test_monitor_figures_against_base_and_step_metrics():
  cfg, base = setup(CFG_NAME)
  _, general = general_batch(cfg, 6, [7, 11, 5, 16])
  rng = np.random.default_rng(7)
  pairs = [batch_lib.TokenizedExample(rng.integers(3, 263, 5).tolist(), rng.integers(3, 263, 3).tolist(),
                                      rng.integers(3, 263, 4).tolist()) for _ in range(3)]
  pref = batch_lib.collate(pairs + [batch_lib.general_example([3, 4, 5, 6])], 7, 5)  # the general row is left out
  monitor = evaluation.Evaluator(base, cfg, [general], [pref])
  at_base = monitor.figures(base)
  assert at_base["perplexity/ratio"] == pytest.approx(1.0, abs=1e-6)
  assert at_base["drift/max"] == 0.0
  assert at_base["residual_growth/max_vs_base"] == pytest.approx(1.0, abs=1e-6)
  # logps/* equal the step's ORPO metrics (per-token means over preference rows), a second code path.
  loss = jax.jit(functools.partial(step_lib.batch_loss, config=cfg, objective="orpo", gradient_mode="full"))
  _, m = loss(base, pref)
  np.testing.assert_allclose(at_base["logps/chosen"], float(m["logps/chosen"]), rtol=1e-5)
  np.testing.assert_allclose(at_base["logps/rejected"], float(m["logps/rejected"]), rtol=1e-5)
  moved = jax.tree.map(lambda x: x * 1.3, base)
  f = monitor.figures(moved)
  np.testing.assert_allclose(f["drift/total"], 0.3, rtol=1e-5)
  np.testing.assert_allclose(f["perplexity/ratio"], f["perplexity"] / at_base["perplexity"], rtol=1e-6)
  assert abs(f["perplexity/ratio"] - 1.0) > 1e-3
  assert all(isinstance(v, float) for v in f.values())


# ---------------------------------------------------------------------------------------------
# The guard.


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_guard_aborts_on_crossed_thresholds_and_only_appends(tmp_path):
  run = str(tmp_path)
  path = os.path.join(run, "monitor.jsonl")
  earlier = '{"step": 0, "kind": "eval", "passed": true, "note": "written by an earlier run"}\n'
  with open(path, "w") as f:
    f.write(earlier)
  cfg = guard_lib.GuardConfig(max_perplexity_ratio=1.3, max_weight_drift=0.2, max_residual_growth_vs_base=1.7)
  guard = guard_lib.Guard(run, cfg, is_main_process=True)
  ok = guard.decide(10, {"perplexity/ratio": 1.1, "drift/max": jnp.float32(0.05),
                         "residual_growth/max_vs_base": 1.2, "drift/layer_0": 0.05})
  assert (ok.action, ok.passed, ok.reasons) == ("continue", True, ())
  assert guard.last_passed_step == 10
  bad = guard.decide(20, {"perplexity/ratio": 1.31, "drift/max": 0.5, "residual_growth/max_vs_base": 1.69})
  assert bad.action == "abort" and not bad.passed
  names = [r.split(":")[0] for r in bad.reasons]
  assert names == ["perplexity", "drift"]
  assert "1.31" in bad.reasons[0] and "max_perplexity_ratio 1.3" in bad.reasons[0]
  assert guard.last_passed_step == 10  # rollback target unchanged
  assert guard.rollback_step([5, 10, 15, 20]) == 10
  assert guard.rollback_step([3, 7, 12]) == 7
  nan = guard.decide(30, {"perplexity/ratio": float("nan"), "drift/max": 0.01})
  assert nan.action == "abort" and {r.split(":")[0] for r in nan.reasons} == {"nonfinite_figure", "perplexity"}
  text = open(path).read()
  assert text.startswith(earlier)
  lines = read_lines(path)
  assert len(lines) == 4
  assert [(x["step"], x["action"], x["passed"]) for x in lines[1:]] == [
      (10, "continue", True), (20, "abort", False), (30, "abort", False)]
  assert lines[2]["reasons"] == list(bad.reasons) and lines[2]["figures"]["drift/max"] == 0.5
  assert lines[3]["figures"]["perplexity/ratio"] == "nan"  # strict JSON: no bare NaN
  # A check whose figure is absent, or whose threshold is None, is not run.
  off = guard_lib.Guard(run, guard_lib.GuardConfig(max_weight_drift=None), is_main_process=True)
  assert off.decide(40, {"drift/max": 99.0}).passed
  assert guard_lib.Guard(str(tmp_path / "other"), is_main_process=False).decide(1, {"drift/max": 9.0}).action == "abort"
  assert not os.path.exists(tmp_path / "other" / "monitor.jsonl")  # only the main process writes


def test_guard_flags_the_falling_preferred_likelihood(tmp_path):
  guard = guard_lib.Guard(str(tmp_path), guard_lib.GuardConfig(max_chosen_logp_fall=0.45, min_chosen_logp_slope=-0.05,
                                                   trend_window=4), is_main_process=True)
  chosen = [-1.0, -1.1, -1.2, -1.3, -1.4, -1.5]  # falls 0.1 per eval; rejected falls faster
  decisions = [guard.decide(s, {"logps/chosen": c, "logps/rejected": c - 0.2 * s / 100})
               for s, c in zip(range(100, 700, 100), chosen)]
  assert [d.action for d in decisions] == ["continue"] * 5 + ["abort"]
  assert not decisions[2].warnings  # fewer than trend_window evals: no slope yet
  assert decisions[3].warnings and decisions[3].warnings[0].startswith("chosen_slope")  # warn-only by default
  assert decisions[5].reasons[0].startswith("chosen_fall")
  lines = read_lines(tmp_path / "monitor.jsonl")
  np.testing.assert_allclose(lines[5]["figures"]["logps/chosen/slope"], np.polyfit(range(4), chosen[-4:], 1)[0])
  np.testing.assert_allclose(lines[5]["figures"]["logps/chosen/fall"], 0.5)
  np.testing.assert_allclose(lines[5]["figures"]["logps/margin"], 0.2 * 6)
  # A noisy but flat likelihood raises nothing.
  flat = guard_lib.Guard(str(tmp_path / "flat"), guard_lib.GuardConfig(trend_window=4), is_main_process=True)
  noise = np.random.default_rng(0).normal(0, 0.01, 9) - 1.0
  ds = [flat.decide(s, {"logps/chosen": c}) for s, c in enumerate(noise)]
  assert all(d.passed and not d.warnings for d in ds)


def test_guard_restore_replays_the_log(tmp_path):
  cfg = guard_lib.GuardConfig(max_weight_drift=0.3, trend_window=3, max_nonfinite_steps=5)
  g = guard_lib.Guard(str(tmp_path), cfg, is_main_process=True)
  g.decide(10, {"drift/max": 0.1, "logps/chosen": -1.0})
  g.skip_nonfinite(15, float("nan"))
  g.decide(20, {"drift/max": 0.2, "logps/chosen": -1.2})
  g.decide(30, {"drift/max": 0.9, "logps/chosen": -1.4})  # fails
  g.skip_nonfinite(35, float("inf"))
  g.decide(40, {"drift/max": 0.1, "logps/chosen": -1.6})  # after the resume point: ignored
  with open(tmp_path / "monitor.jsonl", "a") as f:
    f.write('{"step": 41, "kind": "ev')  # a line cut by a crash
  h = guard_lib.Guard(str(tmp_path), cfg, is_main_process=True)
  with pytest.warns(UserWarning, match="not JSON"):
    h.restore(35)
  assert h.last_passed_step == 20
  assert h.nonfinite.count == 2
  assert h.trend.chosen == [-1.0, -1.2, -1.4] and h.trend.steps == [10, 20, 30]
  lines = read_lines_lenient(tmp_path / "monitor.jsonl")
  assert lines[-1]["kind"] == "resume" and lines[-1]["step"] == 35  # started on a fresh line


def read_lines_lenient(path):
  out = []
  for line in open(path):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return out


def test_nonfinite_steps_are_skipped_and_abort_after_k(tmp_path):
  guard = guard_lib.Guard(str(tmp_path), guard_lib.GuardConfig(max_nonfinite_steps=2), is_main_process=True)
  seq = [(1, 0.7, 1.0), (2, float("nan"), 1.0), (3, 0.6, float("inf")), (4, 0.5, 2.0), (5, float("-inf"), None)]
  ds = [guard.skip_nonfinite(s, jnp.float32(loss), gn) for s, loss, gn in seq]
  assert [(d.action, d.passed, d.kind) for d in ds] == [
      ("continue", True, "step"), ("continue", False, "nonfinite"), ("continue", False, "nonfinite"),
      ("continue", True, "step"), ("abort", False, "nonfinite")]
  assert ds[4].reasons[0].startswith("nonfinite: 3 skipped") and guard.nonfinite.count == 3
  assert guard.nonfinite.consecutive == 1
  lines = read_lines(tmp_path / "monitor.jsonl")  # finite steps are not logged
  assert [(x["step"], x["action"], x["nonfinite_count"]) for x in lines] == [(2, "continue", 1), (3, "continue", 2),
                                                                              (5, "abort", 3)]
  assert lines[1]["figures"] == {"loss": 0.6000000238418579, "grad_norm": "inf"}


# ---------------------------------------------------------------------------------------------
# Logging.


def test_logger_writes_tensorboard_scalars_read_back(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util

  stream = io.StringIO()
  with log_lib.Logger(str(tmp_path), total_steps=13, is_main_process=True, stream=stream, tty=False) as logger:
    logger.log(1, {"loss": jnp.float32(1.5), "rewards": {"margins": np.float32(0.25)}}, lr=1e-5, step_time=0.5,
               tokens=101)
    logger.log(2, {"loss": 1.25}, lr=2e-5)
    figures = {"perplexity/ratio": 1.5, "logps/chosen": -2.0, "drift/layer_0": 0.03,
               "residual_growth": {"per_layer": jnp.array([1.1, 1.3, 0.9])}}
    logger.log(2, evaluation.tb_sections(figures), prefix="")
    logger.progress(2, loss=1.25)
  acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={ea.TENSORS: 0})
  acc.Reload()
  got = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
         for tag in acc.Tags()["tensors"]}
  f32 = lambda x: float(np.float32(x))
  assert got == {
      "train/loss": [(1, 1.5), (2, 1.25)], "train/rewards/margins": [(1, 0.25)],
      "train/lr": [(1, f32(1e-5)), (2, f32(2e-5))], "train/step_time_s": [(1, 0.5)], "train/tokens": [(1, 101.0)],
      "train/tokens_per_s": [(1, 202.0)], "eval/perplexity/ratio": [(2, 1.5)], "eval/logps/chosen": [(2, -2.0)],
      "monitor/drift/layer_0": [(2, f32(0.03))], "monitor/residual_growth/per_layer/0": [(2, f32(1.1))],
      "monitor/residual_growth/per_layer/1": [(2, f32(1.3))], "monitor/residual_growth/per_layer/2": [(2, f32(0.9))]}
  assert "2/13" in stream.getvalue()
  with pytest.raises(ValueError, match="'bad/name'"):
    log_lib.flatten_metrics({"bad": {"name": "text"}})


def test_logger_off_the_main_process_writes_nothing(tmp_path):
  stream = io.StringIO()
  logger = log_lib.Logger(str(tmp_path), 10, is_main_process=False, stream=stream)
  assert logger.log(1, {"loss": 1.0}) == {}
  logger.progress(1)
  logger.close()
  assert not os.path.exists(tmp_path / "tb") and stream.getvalue() == ""


def test_progress_bar_eta_and_plain_lines():
  t = [100.0]
  stream = io.StringIO()
  bar = log_lib.ProgressBar(101, stream=stream, tty=False, line_every_s=4.0, clock=lambda: t[0])
  for step, now in [(1, 100.0), (3, 101.0), (11, 105.0), (12, 105.5), (21, 110.0)]:
    t[0] = now
    bar.update(step, loss=0.123456)
  lines = stream.getvalue().splitlines()
  assert len(lines) == 3  # steps 1, 11, 21: one line per line_every_s when not a TTY
  # From step 1 at t=100 to step 21 at t=110: 2 step/s, 80 steps left -> 40 s.
  assert "21/101" in lines[-1] and "2 step/s" in lines[-1] and "ETA 0:00:40" in lines[-1]
  assert "elapsed 0:00:10" in lines[-1] and "loss=0.1235" in lines[-1]
  tty = io.StringIO()
  bar = log_lib.ProgressBar(3, stream=tty, tty=True, redraw_every_s=0.0, clock=lambda: t[0])
  for s in (1, 2, 3):
    t[0] += 1
    bar.update(s)
  assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("\n") and "3/3 100.0%" in tty.getvalue()
  assert log_lib.format_duration(90061) == "1-1:01:01" and log_lib.format_duration(float("nan")) == "?"
