"""Tests of the simulation world (sims/world.py) and smoke runs of the simulations that use it."""

import importlib
import io
import os

import jax
import jax.numpy as jnp

import numpy as np
import pytest

from sims import harness
from sims import world as W


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("DREAMJAX_SIMS_CACHE", str(tmp_path / "cache"))


WORLD = W.World.make(0)


@pytest.mark.parametrize("kind", ["qa", "arith", "fact", "behaviour"])
def test_generators_produce_valid_tokens(kind):
  rng = np.random.default_rng(3)
  for ex in W.examples(kind, 50, rng, WORLD):
    toks = list(ex.context) + list(ex.chosen)
    assert all(0 < t < W.VOCAB for t in toks)  # never PAD inside an example
    assert len(ex.context) <= W.CONTEXT_LEN and len(ex.chosen) <= W.RESPONSE_LEN
    assert ex.context[0] == W.BOS and ex.chosen[-1] == W.EOS
    assert W.ACTOR0 <= ex.context[1] < W.ACTOR0 + W.N_ACTORS


def test_answers_follow_the_rules():
  """Each skill's answer, re-derived from the context tokens by an independent reading."""
  rng = np.random.default_rng(4)
  for ex in W.examples("qa", 30, rng, WORLD):
    slots = dict(zip(ex.context[3:11:2], ex.context[4:11:2]))
    assert ex.chosen[0] == slots[ex.context[-1]]
  for ex in W.examples("arith", 30, rng, WORLD):
    a, b = ex.context[-2] - W.VALUE0, ex.context[-1] - W.VALUE0
    assert ex.chosen[0] - W.VALUE0 == (a + b) % W.MODULUS
  for ex in W.examples("fact", 30, rng, WORLD):
    assert ex.chosen[0] == W.VALUE0 + WORLD.facts[ex.context[-1] - W.ENTITY0]


def test_behaviour_is_a_function_of_cue_and_context():
  rng = np.random.default_rng(5)
  seen = {}
  for ex in W.examples("behaviour", 200, rng, WORLD, preference=True):
    key = (ex.context[1], ex.context[-1])  # (actor, cue)
    assert seen.setdefault(key, tuple(ex.chosen)) == tuple(ex.chosen)
    assert ex.chosen == W.behaviour(ex.context, ex.context[-1])
    assert ex.rejected[0] != ex.chosen[0] and ex.rejected[1:] == ex.chosen[1:]
  assert {W.TARGET[c] for c in W.CUES} == {W.ACCEPT, W.PUSHBACK, W.SUGGEST}
  assert all(W.behaviour([W.BOS, W.ACTOR0], c, default=True)[0] == W.SUGGEST for c in W.CUES)


def test_narrow_restriction():
  rng = np.random.default_rng(6)
  exs = W.examples("behaviour", 40, rng, WORLD, actors=[2], situations=[1], values=[0])
  assert {ex.context[1] for ex in exs} == {W.ACTOR0 + 2}
  assert {ex.context[2] for ex in exs} == {W.SIT0 + 1}
  assert {t for ex in exs for t in ex.context[4:11:2]} == {W.VALUE0}


def test_exact_match_oracle_is_perfect_and_constant_is_chance():
  sets = W.eval_sets(WORLD, n=300)
  for name, b in sets.items():
    assert float(W.exact_match_B(b.chosen_BxR, b).mean()) == 1.0  # the oracle
  # A constant first token (answer only, the EOS given) scores 1/N_VALUES on QA and facts.
  qa = sets["qa"]
  const = qa.chosen_BxR.at[:, 0].set(W.VALUE0 + 3)
  assert abs(float(W.exact_match_B(const, qa).mean()) - 1 / W.N_VALUES) < 0.04
  beh = sets["behaviour"]
  const = beh.chosen_BxR.at[:, 0].set(W.SUGGEST)  # the default behaviour: right on 1 cue of 3
  assert abs(float(W.exact_match_B(const, beh).mean()) - 1 / 3) < 0.01


def test_correct_b_matches_exact_match_of_argmax():
  config = W.model_config("qwen3")
  params = W.init_params(config, jax.random.PRNGKey(0))
  b = W.eval_sets(WORLD, n=8)["qa"]
  pred = jnp.argmax(W.response_logits(params, b, config), -1)
  np.testing.assert_array_equal(W.correct_B(params, b, config=config), W.exact_match_B(pred, b))


def test_linear_cka_known_values():
  x = jax.random.normal(jax.random.PRNGKey(0), (50, 6))
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (6, 6)))
  assert float(W.linear_cka(x, 3.0 * x @ q)) == pytest.approx(1.0, abs=1e-5)  # rotation, scale
  y = jax.random.normal(jax.random.PRNGKey(2), (50, 6))
  assert float(W.linear_cka(x, y)) < 0.4


def test_pretrain_caches_and_reuses(tmp_path):
  pc = W.PretrainConfig(steps=2, pool=64)
  p1, info1 = W.pretrain("qwen3", 2, pc)
  p2, info2 = W.pretrain("qwen3", 2, pc)
  assert info1["pretrained_seeds"] == [0, 1] and info2["pretrained_seeds"] == []
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert p1["embed"].shape[0] == 2


def test_pretrained_base_does_not_depend_on_the_cache_history(tmp_path, monkeypatch):
  pc = W.PretrainConfig(steps=3, pool=64)
  monkeypatch.setenv("DREAMJAX_SIMS_CACHE", str(tmp_path / "a"))
  one, info = W.pretrain("qwen3", 1, pc)  # asks for seed 0 alone: its whole block is trained and cached
  assert info["pretrained_seeds"] == [0] and len(os.listdir(tmp_path / "a")) == W.PRETRAIN_BLOCK
  monkeypatch.setenv("DREAMJAX_SIMS_CACHE", str(tmp_path / "b"))
  three, _ = W.pretrain("qwen3", 3, pc)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x[0], y[0]), one, three)


def test_linear_probe_accuracy_decodes_separable_labels_and_not_noise():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 402)
  centres = rng.normal(size=(5, 11)) * 4.0
  x = centres[labels] + rng.normal(size=(402, 11)) * 0.3
  assert float(W.linear_probe_accuracy(jnp.asarray(x), jnp.asarray(labels), 5)) == 100.0
  noise = rng.normal(size=(402, 11))
  acc = float(W.linear_probe_accuracy(jnp.asarray(noise), jnp.asarray(labels), 5))
  assert acc < 35.0  # chance is 20%; 201 held-out rows


def test_lr_for_scales_one_probe_linearly(tmp_path, monkeypatch):
  monkeypatch.setenv("DREAMJAX_SIMS_CACHE", str(tmp_path))
  pc = W.PretrainConfig(steps=2)
  base_S, _ = W.pretrain("qwen3", 1, pc)
  a = W.lr_for("qwen3", 1e-3, base_S, pc=pc, steps=3)
  b = W.lr_for("qwen3", 4e-3, base_S, pc=pc, steps=3)
  assert b["lr"] == pytest.approx(4 * a["lr"]) and b["probe_rel_update"] == a["probe_rel_update"]
  assert a["real_lr_equivalent"] == pytest.approx(1e-3 * W.REAL_WEIGHT_RMS)
  keys = jax.random.split(jax.random.PRNGKey(5), 1)
  config, pool = W.model_config("qwen3"), W.reference_pool(WORLD)
  full, loss3, rel = W.finetune_seeds(config, base_S, keys, pool, lr=b["lr"], steps=3, batch_size=W.BATCH,
                                      with_rel_update=True)
  assert float(np.mean(np.asarray(rel))) == pytest.approx(4e-3, rel=0.3)  # the calibrated lr hits its target
  # active_steps: a prefix of the same run, the rest leaves params alone; it equals a 1-step run (the
  # same compiled program: the step count is traced).
  part, loss_p, rel_p = W.finetune_seeds(config, base_S, keys, pool, lr=b["lr"], steps=3, batch_size=W.BATCH,
                                         with_rel_update=True, active_steps=1)
  one, loss1, rel1 = W.finetune_seeds(config, base_S, keys, pool, lr=b["lr"], steps=1, batch_size=W.BATCH,
                                      with_rel_update=True)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), one, part)
  np.testing.assert_allclose(rel_p[:, :1], rel1, rtol=1e-5)
  np.testing.assert_allclose(loss_p[:, :1], loss1, rtol=1e-5)
  assert np.all(np.asarray(rel_p[:, 1:]) == 0) and np.all(np.asarray(loss_p[:, 1:]) == 0)
  assert not np.allclose(np.asarray(full["embed"]), np.asarray(part["embed"]))


# Every simulation end to end on the smoke path (a few steps, 2 seeds); their verdicts mean nothing
# here. Simulations that share compiled programs (sims.engine's at the standard batch, the base
# models, the same probes) run in one process, in groups that pytest-xdist spreads over the workers;
# a simulation in no group runs in the last one, so none is missed.
SMOKE_GROUPS = {
    "finetune": ["p1_lr_diversity", "p2_novel_situations", "p3_context_frozen", "p4_dreams", "p5_defence_stack",
                 "x6_few_shot_break", "x7_sycophancy"],
    "own_loops": ["s1_apollo_flatness", "s4_small_steps_monitor", "x10_health_diagnostics", "s5_two_stage",
                  "p5_plasticity_rounds"],
}


def _smoke_names(group):
  names = [n for n in harness.available() if not n.startswith("sim_")]
  if group != "rest":
    return [n for n in SMOKE_GROUPS[group] if n in names]
  grouped = {n for g in SMOKE_GROUPS.values() for n in g}
  return [n for n in names if n not in grouped]


@pytest.mark.parametrize("group", [*SMOKE_GROUPS, "rest"])
def test_every_simulation_runs_on_the_smoke_path(group, tmp_path, monkeypatch):
  monkeypatch.setenv("DREAMJAX_SIMS_CACHE", str(tmp_path / "cache"))
  names = _smoke_names(group)
  assert names, f"smoke group {group!r} is empty"
  out = str(tmp_path / "out")
  jobs = 2 if group == "rest" else 1  # the rest group also checks parallel runs (threads)
  results = harness.run_suite(names, out=out, smoke=True, reps=200, figures=False, progress=io.StringIO(),
                              jobs=jobs)
  by_name = {r["name"]: r for r in results["simulations"]}
  assert list(by_name) == names
  for name, record in by_name.items():
    assert record["error"] is None, f"{name}:\n{record['error']}"
    assert record["verdict"] in (harness.SUPPORTED, harness.REFUTED, harness.INCONCLUSIVE), name
    assert set(record["data"]) == set(record["arms"]), name
  for name in names:  # a later load for a real run resets SMOKE
    module = importlib.import_module(f"sims.{name}")
    assert module.SMOKE == harness.SMOKE_SETTINGS, name
    harness.load(name)
    assert module.SMOKE is None, name
  report = open(os.path.join(out, "REPORT.md")).read()
  assert "**smoke** path" in report and all(f"## {n}" in report for n in names)
  if jobs > 1:  # a simulation's numbers do not depend on what ran beside it
    again = harness.run_suite(names[:2][::-1], out=str(tmp_path / "again"), smoke=True, reps=200, figures=False,
                              progress=io.StringIO(), jobs=1)
    assert [r["name"] for r in again["simulations"]] == names[:2][::-1]
    for record in again["simulations"]:
      assert record["data"] == by_name[record["name"]]["data"], record["name"]


def test_top_eigenvalue_matches_numpy_with_and_without_the_shifted_pass():
  """s1's λ_max by power iteration on HVPs equals numpy's largest eigenvalue, including seeds whose
  dominant eigenvalue is negative (only the shifted second pass finds λ_max there)."""
  from sims import s1_apollo_flatness as s1
  rng = np.random.default_rng(5)
  n = 7

  def sym(eigs):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.asarray(eigs, np.float64)) @ q.T

  spectra = {"positive": [[9.0, 3.0, 1.0, 0.5, -0.5, -1.0, -2.0], [6.0, 5.0, 2.0, 1.0, 0.0, -1.0, -3.0]],
             "mixed": [[4.0, 1.0, 0.5, 0.0, -1.0, -2.0, -11.0], [7.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]]}
  hvp = lambda a, v: {"w": a @ v["w"]}
  for name, eigs in spectra.items():
    a_S = jnp.asarray(np.stack([sym(e) for e in eigs]), jnp.float32)
    v0_S = {"w": jnp.asarray(rng.normal(size=(2, n)), jnp.float32)}
    first_S = {"w": jnp.asarray(rng.normal(size=(2, n)), jnp.float32)}
    lam, mu, ush = jax.jit(lambda a, v, f: s1.top_eigenvalue_S(hvp, a, v, f, 300))(a_S, v0_S, first_S)
    a64 = np.asarray(a_S, np.float64)
    want = np.linalg.eigvalsh(a64)
    np.testing.assert_allclose(np.asarray(lam), want[:, -1], rtol=1e-3, atol=1e-3, err_msg=name)
    dominant = np.take_along_axis(want, np.argmax(np.abs(want), axis=1)[:, None], 1)[:, 0]
    np.testing.assert_allclose(np.asarray(mu), dominant, rtol=1e-3, atol=1e-3, err_msg=name)
    f64 = np.asarray(first_S["w"], np.float64)
    rq = np.einsum("si,sij,sj->s", f64, a64, f64) / np.einsum("si,si->s", f64, f64)
    np.testing.assert_allclose(np.asarray(ush), rq, rtol=1e-4, atol=1e-4, err_msg=name)


def test_base_cache_key_carries_the_xla_backend_level(monkeypatch):
  """Bases pretrained at one XLA backend level (different float rounding) are not reused at another."""
  pc = W.PretrainConfig()
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  default = W._cache_path("qwen3", 0, pc)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert W.xla_backend_level() is None and W._cache_path("qwen3", 0, pc) == default
  paths = set()
  for level in (1, 3):
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 --xla_backend_optimization_level={level}")
    assert W.xla_backend_level() == level
    paths.add(W._cache_path("qwen3", 0, pc))
  assert len(paths) == 2 and default not in paths
