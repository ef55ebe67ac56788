"""Activation sharding inside the model: the batch axis is split over the mesh's batch axes.

Under `jax.set_mesh(mesh)` (the train step sets it), `batch_sharded` pins an activation's batch
axis to ('data', 'fsdp') and leaves every other axis whole, which is FSDP's layout: weights are
gathered per layer, activations never are. Without such a mesh it returns its input, so the
model runs unchanged on one device, under vmap and in tests.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch is split over (dreamjax.train.mesh)


def batch_sharded(x: jax.Array, axis: int = 0) -> jax.Array:
  """Returns x constrained to be split over BATCH_AXES along `axis` (x itself without such a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  n = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if n == 1 or x.shape[axis] % n:
    return x
  spec = [None] * x.ndim
  spec[axis] = BATCH_AXES
  return jax.lax.with_sharding_constraint(x, P(*spec))
