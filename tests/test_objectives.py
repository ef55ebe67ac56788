"""Objectives vs an independent float64 numpy derivation; log1mexp stability; gradients vs finite
differences; masks, weights, bf16 and jit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax import objectives as obj

V = 13
NAMES = ("orpo", "sft", "dpo", "dpop")
N_LOGPROBS = {"sft": 1, "orpo": 2, "dpo": 4, "dpop": 4}  # SeqLogProbs arguments each one takes

# ----------------------------------------------------------------------------------------------
# Independent numpy (float64) derivation: a plain loop over tokens that never reads masked ones,
# log1mexp from its power series, weighted means over the examples with weight > 0.


def np_seq_logps(logits, labels, mask):
  B, T, _ = logits.shape
  s, n = np.zeros(B), np.zeros(B)
  for b in range(B):
    for t in range(T):
      if mask[b, t]:
        row = np.asarray(logits[b, t], np.float64)
        m = row.max()
        s[b] += row[labels[b, t]] - m - math.log(np.exp(row - m).sum())
        n[b] += 1
  return s, n, np.divide(s, n, out=np.zeros(B), where=n > 0)


def np_log1mexp(x):
  """log(1 − e^x): log(−x) + log(Σ_k x^k/(k+1)!) for −1 <= x < 0, log1p(−e^x) below."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  near = x >= -1.0
  xs = x[near]
  term, acc = np.ones_like(xs), np.ones_like(xs)
  for k in range(1, 40):
    term = term * xs / (k + 1)
    acc = acc + term
  with np.errstate(divide="ignore"):
    out[near] = np.log(-xs) + np.log(acc)
  out[~near] = np.log1p(-np.exp(x[~near]))
  return out


def np_logsig(z):
  return -np.logaddexp(0.0, -z)


def np_wmean(x, w):
  on = w > 0
  return (w[on] * x[on]).sum() / w[on].sum()


def np_nll(lp, w):
  on = w > 0
  return -(w[on] * lp[0][on]).sum() / (w[on] * lp[1][on]).sum()


def np_rewards(rc, rr, w):
  return {"rewards/chosen": np_wmean(rc, w), "rewards/rejected": np_wmean(rr, w),
          "rewards/accuracies": np_wmean((rc > rr).astype(float), w), "rewards/margins": np_wmean(rc - rr, w)}


def np_orpo(c, r, w, beta, nll_extra=None):
  lc, lr = c[2], r[2]
  log_odds = (lc - lr) - (np_log1mexp(lc) - np_log1mexp(lr))
  ratio = np_logsig(log_odds)
  nll = np_nll(c if nll_extra is None else nll_extra, w)
  return nll - beta * np_wmean(ratio, w), {
      "nll_loss": nll, "log_odds_ratio": np_wmean(ratio, w), "log_odds_chosen": np_wmean(log_odds, w),
      **np_rewards(beta * lc, beta * lr, w), "logps/chosen": np_wmean(lc, w), "logps/rejected": np_wmean(lr, w)}


def np_sft(c, w):
  nll = np_nll(c, w)
  return nll, {"nll_loss": nll, "logps/chosen": np_wmean(c[2], w)}


def np_dpo(c, r, rc, rr, w, beta, label_smoothing=0.0, lam=None):
  dw, dl = c[0] - rc[0], r[0] - rr[0]
  penalty = np.maximum(0.0, rc[0] - c[0])
  z = beta * ((dw - dl) - (0.0 if lam is None else lam) * penalty)
  loss_B = -(1 - label_smoothing) * np_logsig(z) - label_smoothing * np_logsig(-z)
  metrics = {**np_rewards(beta * dw, beta * dl, w), "logps/chosen": np_wmean(c[0], w),
             "logps/rejected": np_wmean(r[0], w), "nll_loss": np_nll(c, w)}
  if lam is not None:
    metrics["dpop_penalty"] = np_wmean(penalty, w)
  return np_wmean(loss_B, w), metrics


# ----------------------------------------------------------------------------------------------
# Inputs


@pytest.fixture
def x64():
  with jax.enable_x64(True):  # restored on exit
    yield


def random_case(seed, B, T, empty_row=None, garbage=1e30, boost=14.0):
  """Logits/labels/mask with ~30% masked positions holding garbage; some rows are near-certain
  (per-token log-prob close to 0) so both log1mexp branches are exercised."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)) * 3
  labels = rng.integers(0, V, size=(B, T))
  confident = rng.random(B) < 0.5
  np.put_along_axis(logits, labels[..., None], np.take_along_axis(logits, labels[..., None], -1)
                    + boost * confident[:, None, None], -1)
  mask = (rng.random((B, T)) < 0.7).astype(np.float64)
  mask[:, 0] = 1
  if empty_row is not None:
    mask[empty_row] = 0
  logits[mask == 0] = garbage  # padded positions: must be ignored
  labels = np.where(mask > 0, labels, -100)  # TRL's label padding id, out of range
  return logits, labels, mask


_sequence_logprobs = jax.jit(obj.sequence_logprobs)


def to_lp(logits, labels, mask, dtype=None):
  return _sequence_logprobs(jnp.asarray(logits, dtype), jnp.asarray(labels), jnp.asarray(mask))


def call(name, lps, w=None, **kw):
  """Calls objective `name` with as many of `lps` as it takes (policy first, then reference)."""
  keys = ("chosen", "rejected", "ref_chosen", "ref_rejected")[:N_LOGPROBS[name]]
  lp = dict(zip(keys, lps))
  if "nll_extra" in kw:  # ORPO's NLL over other tokens: the Objective reads it as lp['nll']
    lp["nll"] = kw.pop("nll_extra")
  return obj.get(name).loss(lp, w, **kw)


# ----------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("B,T", [(3, 7), (5, 11)])
def test_sequence_logprobs_matches_numpy(x64, B, T):
  logits, labels, mask = random_case(B * T, B, T, empty_row=1)
  want = np_seq_logps(logits, labels, mask)
  # Eager too: XLA's jit happened to hide an out-of-range label gather (NaN) that eager shows.
  for got in (to_lp(logits, labels, mask), obj.sequence_logprobs(*map(jnp.asarray, (logits, labels, mask)))):
    for field, g, w in zip(obj.SeqLogProbs._fields, got, want):
      assert g.shape == (B,) and np.all(np.isfinite(g)), field
      np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12, err_msg=field)
    assert float(got.count_B[1]) == 0.0 and float(got.mean_B[1]) == 0.0  # empty row: mean 0, no NaN


@pytest.mark.parametrize("max_logits", [1 << 26, 3 * 53 * 4, 1], ids=["one-chunk", "chunks-of-4", "chunks-of-1"])
def test_linear_sequence_logprobs_equals_logits_then_logprobs(max_logits):
  """hidden @ head in chunks of tokens (log-sum-exp per chunk) gives sequence_logprobs of the
  whole logits tensor: values vs numpy, gradients (hidden and head) vs the unchunked autodiff path."""
  rng = np.random.default_rng(4)
  b, t, d, v = 3, 29, 7, 53  # 29 tokens: the last chunk is partial
  hidden = rng.normal(size=(b, t, d)).astype(np.float32)
  head = rng.normal(size=(d, v)).astype(np.float32)
  labels = rng.integers(0, v, (b, t))
  mask = (rng.random((b, t)) > 0.3).astype(np.int32)
  mask[1] = 0  # a row with nothing scored
  got = obj.linear_sequence_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(labels), jnp.asarray(mask),
                                     max_logits=max_logits)
  want = np_seq_logps(hidden.astype(np.float64) @ head.astype(np.float64), labels, mask)
  for field, g, w in zip(obj.SeqLogProbs._fields, got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-4, err_msg=field)
  total = lambda fn: lambda h, w: jnp.sum(fn(h, w).sum_B * jnp.arange(1.0, b + 1))
  chunked = total(lambda h, w: obj.linear_sequence_logprobs(h, w, labels, mask, max_logits=max_logits))
  whole = total(lambda h, w: obj.sequence_logprobs(h @ w, labels, mask))
  for a, r in zip(jax.grad(chunked, (0, 1))(hidden, head), jax.grad(whole, (0, 1))(hidden, head)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))


CASES = [  # (objective, kwargs)
    ("orpo", {"beta": 0.25}),
    ("orpo", {"beta": 0.1, "nll_extra": True}),
    ("sft", {}),
    ("dpo", {"beta": 0.3}),
    ("dpo", {"beta": 0.1, "label_smoothing": 0.2}),
    ("dpop", {"beta": 0.3, "lam": 50.0}),
    ("dpop", {"beta": 0.5, "lam": 3.0}),
]


@pytest.mark.parametrize("B,T,weighted", [(3, 7, False), (5, 11, True)])
@pytest.mark.parametrize("name,kw", CASES)
def test_objective_matches_numpy(x64, name, kw, B, T, weighted):
  seed = 10 * B + T
  cases = [random_case(seed + i, B, T) for i in range(5)]
  lps = [to_lp(*c) for c in cases]
  want_lps = [np_seq_logps(*c) for c in cases]
  w = np.random.default_rng(seed).uniform(0.5, 2.0, B) if weighted else np.ones(B)
  if weighted:
    w[1] = 0.0
  kw, want_extra = dict(kw), None
  if kw.pop("nll_extra", False):  # NLL over a different token set (e.g. prompt + response)
    kw["nll_extra"], want_extra = lps[4], want_lps[4]
  loss, metrics = jax.jit(functools.partial(call, name))(lps, jnp.asarray(w) if weighted else None, **kw)
  if name == "orpo":
    want_loss, want_metrics = np_orpo(*want_lps[:2], w, kw["beta"], want_extra)
  elif name == "sft":
    want_loss, want_metrics = np_sft(want_lps[0], w)
  else:
    want_loss, want_metrics = np_dpo(*want_lps[:4], w, **kw)
  assert loss.shape == ()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
  assert set(metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("B,T", [(3, 7), (5, 11)])
def test_cases_cover_both_log1mexp_branches(B, T):
  # Guards the test above: without near-certain rows ORPO would never reach log(−expm1(l)).
  means = np.concatenate([np_seq_logps(*random_case(10 * B + T + i, B, T))[2] for i in (0, 1)])
  assert (means > -math.log(2)).any() and (means < -math.log(2)).any()


# ----------------------------------------------------------------------------------------------
# log1mexp and ORPO near P(y) = 1


def test_log1mexp_matches_series(x64):
  xs = np.array([-1e-25, -1e-12, -1e-9, -1e-5, -1e-3, -0.01, -0.1, -0.3, -math.log(2) + 1e-9, -math.log(2) - 1e-9, -0.9,
                 -1.0, -2.0, -30.0, -700.0])
  want = np_log1mexp(xs)
  log1mexp = jax.jit(obj.log1mexp)
  np.testing.assert_allclose(log1mexp(jnp.asarray(xs)), want, rtol=1e-13)
  grad = jax.jit(jax.vmap(jax.grad(obj.log1mexp)))(jnp.asarray(xs))
  np.testing.assert_allclose(grad, np.exp(xs) / np.expm1(xs), rtol=1e-12)  # d/dx log(1 − e^x)
  # float32 must pick the right branch: log1p(−exp(x)) alone gives −inf at x = −1e-9.
  xs32 = xs[xs > -100].astype(np.float32)
  np.testing.assert_allclose(log1mexp(jnp.asarray(xs32)), np_log1mexp(xs32.astype(np.float64)), rtol=1e-6)


@jax.jit
@jax.value_and_grad
def _orpo_at(lc):
  # 4 chosen tokens with mean log-prob lc, so NLL = −lc; rejected mean −2.
  chosen = obj.SeqLogProbs(lc[None] * 4, jnp.full((1,), 4.0), lc[None])
  rejected = obj.SeqLogProbs(jnp.full((1,), -8.0), jnp.full((1,), 4.0), jnp.full((1,), -2.0))
  return obj.orpo(chosen, rejected, beta=0.1)[0]


@pytest.mark.parametrize("lc", [-1e-12, -1e-9, -1e-5, -0.69, -0.7, -3.0, -50.0])
def test_orpo_float32_near_certain_matches_float64(lc):
  val, grad = _orpo_at(jnp.float32(lc))
  assert val.dtype == jnp.float32
  lc64 = np.float64(np.float32(lc))
  log_odds = (lc64 + 2.0) - (np_log1mexp(lc64) - np_log1mexp(-2.0))
  want = -lc64 - 0.1 * np_logsig(log_odds)
  # d/dlc: −1 − β σ(−log_odds) · d log_odds/dlc, with d log_odds/dlc = 1/(1 − e^lc).
  want_grad = -1.0 - 0.1 * np.exp(np_logsig(-log_odds)) / -np.expm1(lc64)
  np.testing.assert_allclose(val, want, rtol=2e-6, atol=1e-12)
  np.testing.assert_allclose(grad, want_grad, rtol=2e-6)


@pytest.mark.parametrize("lc", [0.0, -0.0, -1e-30, -1e-40])
def test_orpo_float32_at_certainty_is_finite(lc):
  # TRL's log1p(−exp(lc)) gives −inf here; the loss tends to NLL = −lc as log_odds → ∞.
  val, grad = _orpo_at(jnp.float32(lc))
  assert np.isfinite(val) and np.isfinite(grad)
  assert abs(float(val)) < 1e-6 and -2.0 < float(grad) < 0.0


# ----------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("name,kw", [CASES[i] for i in (0, 1, 2, 4, 6)])
def test_gradients_match_finite_differences(x64, name, kw):
  B, T = 3, 7
  rng = np.random.default_rng(NAMES.index(name))
  # boost 8: confident rows sit near −ln 2, not at −1e-5 where float64 differences of
  # log(−expm1(l)) lose too many digits for a finite-difference check.
  cases = [random_case(20 + i, B, T, garbage=0.0, boost=8.0) for i in range(5)]
  labels = [jnp.asarray(c[1]) for c in cases]
  masks = [jnp.asarray(c[2]) for c in cases]
  w = jnp.array([1.5, 0.0, 0.7])
  kw = dict(kw)
  extra = kw.pop("nll_extra", False)

  def loss(l0, l1, l4):
    lps = [obj.sequence_logprobs(lg, labels[i], masks[i]) for i, lg in enumerate([l0, l1])]
    lps += [to_lp(*cases[i]) for i in (2, 3)]  # reference: constants
    nll_extra = {"nll_extra": obj.sequence_logprobs(l4, labels[4], masks[4])} if extra else {}
    return call(name, lps, w, **kw, **nll_extra)[0]

  # One compile: the finite differences reuse the value half.
  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  args = [jnp.asarray(cases[i][0]) for i in (0, 1, 4)]
  _, grads = value_and_grad(*args)
  # Which logits the loss depends on; a zero gradient would pass the comparison trivially.
  used = [True, name != "sft", extra]
  assert [bool(jnp.any(g != 0)) for g in grads] == used
  h = 1e-6
  for _ in range(3):  # central differences along random directions
    dirs = [jnp.asarray(rng.normal(size=a.shape)) for a in args]
    plus = value_and_grad(*(a + h * d for a, d in zip(args, dirs)))[0]
    minus = value_and_grad(*(a - h * d for a, d in zip(args, dirs)))[0]
    fd = (plus - minus) / (2 * h)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(grads, dirs))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Masks, weights, dtypes


@functools.cache
def value_and_grad_fn(name):
  """Returns jit(value_and_grad) of objective `name` w.r.t. its logits; shared so it compiles once."""

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def fn(logits, labels, masks, w):
    return call(name, [obj.sequence_logprobs(*a) for a in zip(logits, labels, masks)], w)

  return fn


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_change_nothing(name):
  B, T = 5, 11
  cases = [random_case(40 + i, B, T, empty_row=4 if i == 1 else None, garbage=0.0) for i in range(4)]
  clean = [np.asarray(c[0], np.float32) for c in cases]
  labels, masks = [c[1] for c in cases], [c[2] for c in cases]
  rng = np.random.default_rng(0)
  junk = []
  for c in cases:
    g = 1e4 * rng.normal(size=c[0].shape)
    g[..., 0], g[..., 1] = np.inf, np.nan  # non-finite padding too
    junk.append(np.where(c[2][..., None] > 0, c[0], g).astype(np.float32))
  junk_labels = [np.where(m > 0, lb, 5 * V) for lb, m in zip(labels, masks)]  # out of range

  (a, ma), ga = value_and_grad_fn(name)(clean, labels, masks, jnp.ones(B))
  (b, mb), gb = value_and_grad_fn(name)(junk, junk_labels, masks, jnp.ones(B))
  assert np.isfinite(a) and a == b
  for k in ma:
    assert ma[k] == mb[k], k
  for gi, gj, m in zip(ga, gb, masks):
    np.testing.assert_array_equal(gi, gj)
    assert np.all(np.isfinite(gi)) and np.all(np.asarray(gi)[m == 0] == 0)
  assert np.any(np.asarray(ga[0]) != 0)


@pytest.mark.parametrize("name", NAMES)
def test_zero_weight_example_is_ignored(name):
  B, T = 5, 11
  cases = [random_case(60 + i, B, T, garbage=0.0) for i in range(4)]
  w = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0])
  clean = [np.asarray(c[0], np.float32) for c in cases]
  junk = [lg.copy() for lg in clean]
  for lg in junk:  # finite garbage in the weight-0 rows
    lg[[1, 4]] = 3e4 * np.random.default_rng(1).normal(size=lg[[1, 4]].shape)
  labels, masks = [c[1] for c in cases], [c[2] for c in cases]
  (got, gm), g_junk = value_and_grad_fn(name)(junk, labels, masks, w)
  (want, wm), g_clean = value_and_grad_fn(name)(clean, labels, masks, w)
  # That weight-0 rows are left out of the means is checked against numpy above.
  assert got == want
  for k in wm:
    assert gm[k] == wm[k], k
  for gj, gc in zip(g_junk, g_clean):
    np.testing.assert_array_equal(gj, gc)
    assert np.all(np.asarray(gj)[[1, 4]] == 0)
  assert np.any(np.asarray(g_junk[0])[[0, 2, 3]] != 0)  # the kept chosen rows do get gradients

  # All-zero weights: loss 0 and zero gradients, not NaN.
  (zero_loss, _), zero_grad = value_and_grad_fn(name)(junk, labels, masks, jnp.zeros(B))
  assert float(zero_loss) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in zero_grad)

  # NaN in a weight-0 example's log-probs is dropped too.
  lps = [obj.SeqLogProbs(*(jnp.asarray(x, jnp.float32) for x in np_seq_logps(*c))) for c in cases]
  poisoned = [obj.SeqLogProbs(*(x.at[1].set(jnp.nan) for x in lp)) for lp in lps]
  loss_of = jax.jit(lambda lps: call(name, lps, w)[0])
  np.testing.assert_allclose(loss_of(poisoned), loss_of(lps), rtol=1e-6)


def test_bf16_logits_are_upcast_before_softmax():
  logits, labels, mask = random_case(5, 5, 11, garbage=0.0)
  lp16 = to_lp(logits * 8, labels, mask, jnp.bfloat16)
  # Same bf16-rounded inputs, upcast by hand: equal up to float32 rounding. A bf16 softmax would
  # be off by ~1e-2 relative.
  lp32 = to_lp(jnp.asarray(logits * 8, jnp.bfloat16).astype(jnp.float32), labels, mask)
  for a, b in zip(lp16, lp32):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-6)
  loss, metrics = jax.jit(obj.orpo)(lp16, lp16)
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())


# ----------------------------------------------------------------------------------------------
# dpop vs dpo


def test_policy_equal_to_reference_gives_log2_and_zero_accuracy(x64):
  # DPO's first step (policy = reference) and ORPO on identical responses: ties count as wrong,
  # as TRL's strict `chosen_rewards > rejected_rewards`.
  c, r = to_lp(*random_case(80, 5, 7)), to_lp(*random_case(81, 5, 7))
  for name in ("dpo", "dpop"):
    loss, m = call(name, [c, r, c, r])
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-15)
    assert float(m["rewards/accuracies"]) == 0.0 and float(m["rewards/margins"]) == 0.0
  loss, m = obj.orpo(c, c, beta=0.5)
  assert float(m["rewards/accuracies"]) == 0.0 and float(m["log_odds_chosen"]) == 0.0
  np.testing.assert_allclose(m["log_odds_ratio"], -math.log(2), rtol=1e-15)
  np.testing.assert_allclose(loss, m["nll_loss"] + 0.5 * math.log(2), rtol=1e-15)


def test_dpop_equals_dpo_until_chosen_falls_below_reference(x64):
  rng = np.random.default_rng(0)
  mk = lambda s: obj.SeqLogProbs(jnp.asarray(s), jnp.full(3, 4.0), jnp.asarray(s) / 4)
  ref_c, ref_r, pol_r = (mk(rng.normal(size=3) - 5) for _ in range(3))
  above = mk(ref_c.sum_B + np.array([0.5, 0.0, 2.0]))  # policy likes chosen at least as much
  below = mk(ref_c.sum_B - np.array([0.5, 0.1, 2.0]))
  for pol_c in (above, below):
    assert obj.dpop(pol_c, pol_r, ref_c, ref_r, lam=0.0)[0] == obj.dpo(pol_c, pol_r, ref_c, ref_r)[0]
  loss_dpop, m = obj.dpop(above, pol_r, ref_c, ref_r, beta=0.2)
  np.testing.assert_allclose(loss_dpop, obj.dpo(above, pol_r, ref_c, ref_r, beta=0.2)[0], rtol=1e-15)
  assert float(m["dpop_penalty"]) == 0.0
  loss_dpop, m = obj.dpop(below, pol_r, ref_c, ref_r, beta=0.2, lam=50.0)
  assert loss_dpop > obj.dpo(below, pol_r, ref_c, ref_r, beta=0.2)[0] + 1.0
  np.testing.assert_allclose(m["dpop_penalty"], np.mean([0.5, 0.1, 2.0]), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# jit and registry


@pytest.mark.parametrize("name", NAMES)
def test_jit_traced_hyperparameters_no_retrace(name):
  traces = []
  hyper = {"orpo": "beta", "sft": None, "dpo": "beta", "dpop": "lam"}[name]

  @jax.jit
  def step(lps, h):
    traces.append(1)
    return call(name, lps, **({} if hyper is None else {hyper: h}))[0]

  for seed, h in ((0, 0.1), (1, 0.3)):  # new values, same shapes: one trace
    lps = [to_lp(*random_case(seed * 4 + i, 3, 7), jnp.float32) for i in range(4)]
    loss = step(lps, jnp.float32(h))
    assert np.isfinite(loss)
  assert len(traces) == 1
  kw = {} if hyper is None else {hyper: 0.3}
  np.testing.assert_allclose(loss, call(name, lps, **kw)[0], rtol=1e-5)


def test_registry():
  assert set(obj.OBJECTIVES) == set(NAMES)
  assert [n for n in NAMES if obj.get(n).needs_reference] == ["dpo", "dpop"]
  assert [n for n in NAMES if not obj.get(n).needs_rejected] == ["sft"]
  assert all(N_LOGPROBS[n] == 1 + obj.get(n).needs_rejected + 2 * obj.get(n).needs_reference for n in NAMES)
  assert obj.get(obj.OBJECTIVES["orpo"]) is obj.OBJECTIVES["orpo"]
  with pytest.raises(ValueError, match="unknown objective 'ipo'"):
    obj.get("ipo")
