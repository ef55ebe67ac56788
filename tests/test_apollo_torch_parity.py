"""Optional parity with the authors' code: apollo-torch 1.0.3 `APOLLOAdamW`, same projections.

Skipped unless torch and apollo-torch are installed (`pip install -e '.[parity]'`); CI never
needs torch. The reference's projector is given our P for each refresh, so any difference is in
the update rule itself.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
apollo_torch = pytest.importorskip("apollo_torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dreamjax import optim  # noqa: E402
from apollo_torch import random_projector  # noqa: E402


@pytest.mark.parametrize(
    "shape,rank,scale_type,scale,wd",
    [((13, 7), 2, "channel", 1.0, 0.0), ((7, 13), 3, "channel", 32.0, 0.1), ((9, 9), 1, "tensor", 128.0, 0.1),
     ((5, 17), 1, "tensor", 128.0, 0.0), ((17, 5), 2, "tensor", 1.0, 0.1)],
)
def test_matches_apollo_torch(shape, rank, scale_type, scale, wd, monkeypatch):
  n_steps, gap, lr, seed = 7, 2, 0.05, 11
  rng = np.random.default_rng(0)
  w0, b0 = rng.normal(size=shape), rng.normal(size=(shape[1],))
  grads = [((1 + 0.6 * t) * rng.normal(size=shape), rng.normal(size=(shape[1],))) for t in range(n_steps)]

  leaf_key = optim.path_key(jax.random.PRNGKey(seed), (jax.tree_util.DictKey("w"),))
  side = optim.projection_side(shape)
  ps = [np.asarray(optim.gaussian_projection(optim.projection_key(leaf_key, k), shape, rank, side))
        for k in range(n_steps // gap + 1)]
  refresh = iter(range(len(ps)))
  monkeypatch.setattr(random_projector.GradientProjector, "get_orthogonal_matrix",
                      lambda self, w, r, type, seed: torch.tensor(ps[next(refresh)], dtype=torch.float64))

  w_t = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
  b_t = torch.nn.Parameter(torch.tensor(b0, dtype=torch.float64))
  opt_t = apollo_torch.APOLLOAdamW(
      [{"params": [w_t], "rank": rank, "proj": "random", "scale_type": scale_type, "scale": scale,
        "update_proj_gap": gap, "proj_type": "std"}, {"params": [b_t]}],
      lr=lr, weight_decay=wd)

  with jax.enable_x64(True):
    params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
    opt = optim.apollo(lr, rank=rank, scale_type=scale_type, scale=scale, update_proj_gap=gap,
                       weight_decay=wd, key=seed)
    state = opt.init(params)
    for gw, gb in grads:
      w_t.grad, b_t.grad = torch.tensor(gw), torch.tensor(gb)
      opt_t.step()
      u, state = opt.update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params)
      params = optax.apply_updates(params, u)
      for got, want, p0 in ((params["w"], w_t, w0), (params["b"], b_t, b0)):
        d_got, d_want = np.asarray(got) - p0, want.detach().numpy() - p0
        assert np.linalg.norm(d_got - d_want) / np.linalg.norm(d_want) <= 1e-6
