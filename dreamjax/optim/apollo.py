"""APOLLO: SGD-like memory, AdamW-level performance, as optax transforms.

Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv 2412.05270 (MLSys 2025).
Numerically follows the authors' reference implementation (`apollo-torch` 1.0.3, `APOLLOAdamW`)
when both are given the same projection matrices, with one deliberate difference: the state never
stores the projection matrix P. P is regenerated from `fold_in(leaf_key, refresh_index)`, so a
projected m×n leaf costs exactly 2·r·max(m, n) numbers of state (the paper's claim) plus O(1)
scalars, and P is identical on every device, every host and after a resume.

For a 2-D gradient G (m×n) at step t (the count before increment):

    side   = 'right' if m >= n else 'left'
    P      = projection_fn(fold_in(key, t // update_proj_gap), (m, n), r, side)
    R      = G Pᵀ  (m×r, right)      or  Pᵀ G  (r×n, left)          P ~ N(0, 1/r)
    M      = b1 M + (1 - b1) R
    V      = b2 V + (1 - b2) R²
    R~     = M / (sqrt(V) + eps)                                     (eps on uncorrected sqrt(V))
    s      = ||R~||₂ / (||R||₂ + 1e-8)   along the rank axis ('channel': one factor per row when
             right, per column when left) or with Frobenius norms ('tensor')
    U      = G ⊙ s                                                   (raw gradient, rescaled)
    limiter (gamma): l = max(||U|| / (prev + 1e-8), gamma) / gamma;  U ← U / l;  prev ← ||U|| / l
    update = sqrt(scale) · sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) · U

`apollo()` then multiplies by -lr and applies the reference's decoupled weight decay *after* the
step: W ← (1 - lr·wd)(W - lr·update).
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

ProjectionFn = Callable[[chex.PRNGKey, tuple[int, int], int, str], chex.Array]

# Substrings of a parameter path that keep a 2-D leaf out of the projected branch: token
# embeddings and the LM head (the paper keeps them in AdamW), norms and convolution kernels.
_DENSE_NAME_PARTS = ("embed", "lm_head", "norm", "conv")
_STACK_KEY = "layers"  # leaves under this key carry a leading stacked (layer) axis


def gaussian_projection(key: chex.PRNGKey, shape: tuple[int, int], rank: int, side: str) -> chex.Array:
  """Returns P ~ N(0, 1/rank) in float32: (rank, n) for side 'right', (m, rank) for 'left'."""
  m, n = shape
  p_shape = (rank, n) if side == "right" else (m, rank)
  return jax.random.normal(key, p_shape, jnp.float32) / math.sqrt(rank)


def projection_side(shape: tuple[int, ...]) -> str:
  """Returns 'right' when m >= n (compress columns), else 'left' — the smaller dim is compressed."""
  m, n = shape
  return "right" if m >= n else "left"


def path_key(base_key: chex.PRNGKey, path: tuple[Any, ...]) -> chex.PRNGKey:
  """Returns the leaf's PRNG key: `fold_in(base_key, crc32(path))`, stable across processes."""
  tag = zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF
  return jax.random.fold_in(base_key, tag)


def projection_key(leaf_key: chex.PRNGKey, refresh_index: chex.Numeric) -> chex.PRNGKey:
  """Returns the key from which the leaf's P for refresh `refresh_index` is drawn."""
  return jax.random.fold_in(leaf_key, refresh_index)


def stacked_axes(path: tuple[Any, ...]) -> int:
  """Returns how many leading axes of a leaf stack independent matrices: 1 under a 'layers' key.

  Scanned models store each layer parameter as one leaf with a leading layer axis (the layout of
  dreamjax.model, flax's nn.scan and MaxText's scan_layers, under 'layers'); an (L, m, n) leaf is
  L matrices of m×n, each with its own projection, moments, scaling and limiter. A list of
  per-layer dicts under 'layers' (`['layers'][3]...`) is not a stack: its leaves are plain matrices.
  """
  for k, nxt in zip(path, path[1:]):
    if getattr(k, "key", None) == _STACK_KEY:
      return int(not isinstance(nxt, jax.tree_util.SequenceKey))
  return 0


def default_label_fn(params: chex.ArrayTree) -> chex.ArrayTree:
  """Returns 'apollo' for weight matrices (2 dims past any stacked axes) and 'adam' for the rest.

  Token embeddings, the LM head, norms and conv kernels go to 'adam' by name (any path entry
  containing 'embed', 'lm_head', 'norm' or 'conv'); so do vectors, stacked or not.
  """

  def label(path, leaf):
    names = jax.tree_util.keystr(path).lower()
    if jnp.ndim(leaf) - stacked_axes(path) == 2 and not any(part in names for part in _DENSE_NAME_PARTS):
      return "apollo"
    return "adam"

  return jax.tree_util.tree_map_with_path(label, params)


def _as_key(key: int | chex.PRNGKey) -> chex.PRNGKey:
  if isinstance(key, int):
    return jax.random.PRNGKey(key)
  return key


class ScaleByApolloState(NamedTuple):
  """State of `scale_by_apollo`; per projected m×n matrix exactly 2·r·max(m, n) moment numbers.

  A stacked leaf (L, m, n) (see `stacked_axes`) holds L matrices: each field below then has the
  leading L axis too, one entry per matrix.
  """

  count: chex.Array  # int32 scalar: steps taken (t before increment).
  mu: optax.Updates  # per matrix: first low-rank moment, (m, r) right / (r, n) left, mu_dtype.
  nu: optax.Updates  # per matrix: second low-rank moment, same shape and dtype as mu.
  key: optax.Updates  # per matrix: raw PRNG key (uint32[2] for threefry) — P is derived from it.
  prev_norm: optax.Updates  # per matrix: float32 scalar, ||U|| after the previous limiter step.


def scale_by_apollo(
    rank: int = 256,
    scale_type: str = "channel",
    scale: float = 1.0,
    update_proj_gap: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    norm_growth_limit: Optional[float] = 1.01,
    key: int | chex.PRNGKey = 0,
    projection_fn: Optional[ProjectionFn] = None,
    mu_dtype: Optional[chex.ArrayDType] = None,
) -> optax.GradientTransformation:
  """Returns APOLLO's gradient scaling (everything but -lr and weight decay); 2-D leaves only.

  Args:
    rank: projection rank r (not clipped to the matrix size, as in the reference).
    scale_type: 'channel' (one factor per row/column) or 'tensor' (one factor per matrix).
    scale: the update is multiplied by sqrt(scale) (APOLLO-Mini uses 128).
    update_proj_gap: P is redrawn when t % update_proj_gap == 0 (so at t = 0).
    b1, b2, eps: Adam coefficients of the low-rank moments; eps is added to uncorrected sqrt(V).
    norm_growth_limit: gamma of the norm-growth limiter, or None to disable it.
    key: int seed or PRNG key; each leaf's key is folded in with a hash of its path.
    projection_fn: `(key, (m, n), rank, side) -> P`; defaults to `gaussian_projection`.
    mu_dtype: dtype of the moments (e.g. jnp.float32 for bf16 params); default: the grad's dtype
      promoted to at least float32.

  Example:
    >>> tx = scale_by_apollo(rank=2, update_proj_gap=10)
    >>> params = {'w': jnp.ones((5, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.full((5, 3), 0.1)}, state)
  """
  if scale_type not in ("channel", "tensor"):
    raise ValueError(f"scale_by_apollo: scale_type must be 'channel' or 'tensor', got {scale_type!r}")
  if rank < 1:
    raise ValueError(f"scale_by_apollo: rank must be >= 1, got {rank}")
  if update_proj_gap < 1:
    raise ValueError(f"scale_by_apollo: update_proj_gap must be >= 1, got {update_proj_gap}")
  projection_fn = projection_fn or gaussian_projection
  base_key = _as_key(key)

  def moment_dtype(leaf):
    return jnp.dtype(mu_dtype) if mu_dtype is not None else jnp.promote_types(leaf.dtype, jnp.float32)

  def split_shape(path, leaf):
    """Returns (stack shape, (m, n)) of a leaf: its stacked axes and the matrix shape."""
    k = stacked_axes(path)
    if jnp.ndim(leaf) - k != 2:
      raise ValueError(
          f"scale_by_apollo: leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; "
          f"only matrices ({'stacked ' * bool(k)}2-D) can be projected (route the others to the AdamW branch)"
      )
    return tuple(leaf.shape[:k]), tuple(leaf.shape[k:])

  def moment_shape(path, leaf):
    stack, (m, n) = split_shape(path, leaf)
    return stack + ((m, rank) if projection_side((m, n)) == "right" else (rank, n))

  def leaf_keys(path, leaf):
    """Returns the leaf's key, or for a stacked leaf one key per matrix: fold_in(leaf key, index)."""
    stack, _ = split_shape(path, leaf)
    key = path_key(base_key, path)
    if not stack:
      return key
    count = math.prod(stack)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(count))
    return keys.reshape(stack + keys.shape[1:])

  def init_fn(params):
    zeros = lambda p, l: jnp.zeros(moment_shape(p, l), moment_dtype(l))
    return ScaleByApolloState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree_util.tree_map_with_path(zeros, params),
        nu=jax.tree_util.tree_map_with_path(zeros, params),
        key=jax.tree_util.tree_map_with_path(leaf_keys, params),
        prev_norm=jax.tree_util.tree_map_with_path(lambda p, l: jnp.zeros(split_shape(p, l)[0], jnp.float32), params),
    )

  def projections(shapes, keys_per_leaf, count):
    """Returns each leaf's P for this step (stacked like the leaf), drawn in one vmapped call per matrix shape.

    A draw per matrix puts one random-number program per matrix in the compiled update, and its
    compile time grows faster than the depth (bench/optim.py, BUILD.md); grouping the matrices
    that share a shape (across leaves and within stacks) keeps it to one per distinct shape.
    Vmapping over the keys draws the same numbers as separate calls.
    """
    refresh = count // update_proj_gap
    groups: dict = {}
    for i, (_, mat) in enumerate(shapes):
      groups.setdefault(mat, []).append(i)
    out = [None] * len(shapes)
    for mat, members in groups.items():
      side = projection_side(mat)
      # One key per matrix, raw (uint32[2]) or typed: flatten the stacked axes only.
      flat = [keys_per_leaf[i].reshape((-1,) + keys_per_leaf[i].shape[len(shapes[i][0]):]) for i in members]
      keys = jax.vmap(projection_key, in_axes=(0, None))(jnp.concatenate(flat), refresh)
      drawn = jax.vmap(lambda k, mat=mat, side=side: projection_fn(k, mat, rank, side))(keys)
      offset = 0
      for i, f in zip(members, flat):
        out[i] = drawn[offset : offset + f.shape[0]].reshape(shapes[i][0] + drawn.shape[1:])
        offset += f.shape[0]
    return out

  def leaf_update(g, p, mu, nu, prev_norm, count):
    cdt = jnp.promote_types(g.dtype, jnp.float32)
    g_c = g.astype(cdt)
    side = projection_side(g.shape)
    p = p.astype(cdt)
    r_low = g_c @ p.T if side == "right" else p.T @ g_c
    mu = (b1 * mu.astype(cdt) + (1.0 - b1) * r_low).astype(mu.dtype)
    nu = (b2 * nu.astype(cdt) + (1.0 - b2) * jnp.square(r_low)).astype(nu.dtype)
    r_tilde = mu.astype(cdt) / (jnp.sqrt(nu.astype(cdt)) + eps)
    if scale_type == "channel":
      axis = 1 if side == "right" else 0  # the rank axis
      s = jnp.linalg.norm(r_tilde, axis=axis, keepdims=True) / (
          jnp.linalg.norm(r_low, axis=axis, keepdims=True) + 1e-8
      )
    else:
      s = jnp.linalg.norm(r_tilde) / (jnp.linalg.norm(r_low) + 1e-8)
    u = g_c * s
    if norm_growth_limit is not None:
      u_norm = jnp.linalg.norm(u)
      limiter = jnp.maximum(u_norm / (prev_norm.astype(cdt) + 1e-8), norm_growth_limit) / norm_growth_limit
      limiter = jnp.where(count == 0, jnp.ones_like(limiter), limiter)
      u = u / limiter
      prev_norm = (u_norm / limiter).astype(jnp.float32)
    t1 = (count + 1).astype(cdt)
    step_scale = math.sqrt(scale) * jnp.sqrt(1.0 - b2**t1) / (1.0 - b1**t1)
    return (u * step_scale).astype(g.dtype), mu, nu, prev_norm

  def update_fn(updates, state, params=None):
    del params
    with_path, treedef = jax.tree_util.tree_flatten_with_path(updates)
    leaves = [g for _, g in with_path]
    shapes = [split_shape(path, g) for path, g in with_path]
    p_leaves = projections(shapes, treedef.flatten_up_to(state.key), state.count)

    def per_matrix(stack_ndim):  # leaf_update vmapped over the stacked axes
      fn = leaf_update
      for _ in range(stack_ndim):
        fn = jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, None))
      return fn

    per_leaf = [
        per_matrix(len(shape[0]))(g, p, m, v, pn, state.count)
        for g, p, m, v, pn, shape in zip(
            leaves,
            p_leaves,
            treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.nu),
            treedef.flatten_up_to(state.prev_norm),
            shapes,
        )
    ]
    unflat = lambda i: treedef.unflatten([x[i] for x in per_leaf])
    new_state = ScaleByApolloState(
        count=optax.safe_increment(state.count),
        mu=unflat(1),
        nu=unflat(2),
        key=state.key,
        prev_norm=unflat(3),
    )
    return unflat(0), new_state

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAdamRefState(NamedTuple):
  """State of `scale_by_adam_reference`."""

  count: chex.Array  # int32 scalar.
  mu: optax.Updates  # first moment, like params, mu_dtype.
  nu: optax.Updates  # second moment, like params, mu_dtype.


def scale_by_adam_reference(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, mu_dtype: Optional[chex.ArrayDType] = None
) -> optax.GradientTransformation:
  """Returns the reference AdamW scaling of APOLLO's non-projected leaves.

  update = sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) · M / (sqrt(V) + eps), i.e. eps is added to the
  *uncorrected* sqrt(V) (as torch's GaLore/APOLLO AdamW), unlike `optax.scale_by_adam`.
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros(
        jnp.shape(p), jnp.dtype(mu_dtype) if mu_dtype else jnp.promote_types(p.dtype, jnp.float32)
    )
    return ScaleByAdamRefState(
        count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
    )

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: (b1 * m + (1 - b1) * g.astype(m.dtype)).astype(m.dtype), updates, state.mu)
    nu = jax.tree.map(
        lambda g, v: (b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype))).astype(v.dtype), updates, state.nu
    )
    def scaled(g, m, v):
      t1 = (state.count + 1).astype(m.dtype)
      bias = jnp.sqrt(1.0 - b2**t1) / (1.0 - b1**t1)
      return (bias * m / (jnp.sqrt(v) + eps)).astype(g.dtype)

    new_updates = jax.tree.map(scaled, updates, mu, nu)
    return new_updates, ScaleByAdamRefState(optax.safe_increment(state.count), mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class DecayAfterStepState(NamedTuple):
  """State of `decoupled_weight_decay_after_step`."""

  count: chex.Array  # int32 scalar, indexes the learning-rate schedule.


def decoupled_weight_decay_after_step(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Returns the reference's decoupled decay applied after the step: W ← (1 - lr·wd)(W + u).

  Given the incoming update u (already multiplied by -lr), the new update is
  u - lr·wd·(W + u). optax's `add_decayed_weights` decays the *old* W instead; the two differ
  by lr²·wd·|u|, which matters for bit-level parity with the torch reference.
  """

  def init_fn(params):
    del params
    return DecayAfterStepState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decoupled_weight_decay_after_step needs params: call update(g, state, params)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    decay = lambda u, w: (u - lr * weight_decay * (w.astype(u.dtype) + u)).astype(u.dtype)
    if mask is None:
      new_updates = jax.tree.map(decay, updates, params)
    else:
      mask_tree = mask(params) if callable(mask) else mask
      new_updates = jax.tree.map(lambda u, w, m: decay(u, w) if m else u, updates, params, mask_tree)
    return new_updates, DecayAfterStepState(optax.safe_increment(state.count))

  if weight_decay == 0.0:
    return optax.identity()
  return optax.GradientTransformation(init_fn, update_fn)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 256,
    scale_type: str = "channel",
    scale: float = 1.0,
    update_proj_gap: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    norm_growth_limit: Optional[float] = 1.01,
    key: int | chex.PRNGKey = 0,
    mask: Optional[Any] = None,
    label_fn: Optional[Callable[[chex.ArrayTree], chex.ArrayTree]] = None,
    projection_fn: Optional[ProjectionFn] = None,
    mu_dtype: Optional[chex.ArrayDType] = None,
) -> optax.GradientTransformation:
  """Returns APOLLO-AdamW: projected 2-D matrices get `scale_by_apollo`, the rest reference AdamW.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay, mask: decoupled decay (applied after the step, as the reference) and an optional
      mask (pytree of bools or a callable of params) of the leaves it applies to.
    label_fn: params -> pytree of 'apollo' | 'adam' labels; default `default_label_fn`.
    Others: see `scale_by_apollo`.

  Example:
    >>> opt = apollo(1e-3, rank=4)
    >>> params = {'w': jnp.ones((7, 5)), 'embed': jnp.ones((11, 5)), 'b': jnp.zeros(5)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
  """
  return optax.chain(
      optax.partition(
          {
              "apollo": scale_by_apollo(
                  rank=rank,
                  scale_type=scale_type,
                  scale=scale,
                  update_proj_gap=update_proj_gap,
                  b1=b1,
                  b2=b2,
                  eps=eps,
                  norm_growth_limit=norm_growth_limit,
                  key=key,
                  projection_fn=projection_fn,
                  mu_dtype=mu_dtype,
              ),
              "adam": scale_by_adam_reference(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
          },
          label_fn or default_label_fn,
      ),
      optax.scale_by_learning_rate(learning_rate),
      decoupled_weight_decay_after_step(learning_rate, weight_decay, mask),
  )


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    scale: float = 128.0,
    update_proj_gap: int = 200,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    norm_growth_limit: Optional[float] = 1.01,
    key: int | chex.PRNGKey = 0,
    mask: Optional[Any] = None,
    label_fn: Optional[Callable[[chex.ArrayTree], chex.ArrayTree]] = None,
    projection_fn: Optional[ProjectionFn] = None,
    mu_dtype: Optional[chex.ArrayDType] = None,
) -> optax.GradientTransformation:
  """Returns APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (the paper's SGD-memory variant)."""
  return apollo(
      learning_rate,
      rank=1,
      scale_type="tensor",
      scale=scale,
      update_proj_gap=update_proj_gap,
      b1=b1,
      b2=b2,
      eps=eps,
      weight_decay=weight_decay,
      norm_growth_limit=norm_growth_limit,
      key=key,
      mask=mask,
      label_fn=label_fn,
      projection_fn=projection_fn,
      mu_dtype=mu_dtype,
  )
