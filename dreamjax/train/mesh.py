"""Device mesh and sharding: axes ('data', 'fsdp'); a declarative table for parameters.

Batches shard their leading axis over both axes (every device holds B / n_devices examples),
and so do the model's activations inside the step (dreamjax.model.shard, under `jax.set_mesh`).
Parameters (and optimizer state) shard one dimension over 'fsdp': the table below names, per
parameter role, which dimensions may take it, in order of preference, counted from the end so
that a stacked layer leaf (L, in, out) (dreamjax.model.layout) reads like its (in, out) layer;
anything not in the table takes the largest dimension divisible by the fsdp size. The layer axis
of a stack is never sharded (the layer scan slices it). Vectors and keys stay replicated.
No pmap: a mesh with fsdp = 1 is plain data parallelism.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dreamjax.model.layout import LAYERS
from dreamjax.model.shard import BATCH_AXES

AXES = ("data", "fsdp")
BATCH = P(BATCH_AXES)

# (regex on the parameter path, dims that may carry 'fsdp', in order of preference, from the end).
# Matrices are stored (in, out): the wide side of the vocabulary matrices is the vocab.
PARAM_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"\['embed'\]$", (-1, -2)),  # (V, D): shard the model dim: a lookup stays on its own rows
    (r"\['lm_head'\]$", (-1, -2)),  # (D, V): shard the vocabulary
    (r"\['(q|k|v)_proj'\]$|\['in_proj_\w+'\]$|\['(gate|up)_proj'\]$", (-1, -2)),  # (D, out)
    (r"\['(o_proj|out_proj|down_proj)'\]$", (-2, -1)),  # (in, D)
    (r"\['conv_weight'\]$", (-1,)),  # (K, channels)
)


def make_mesh(shape: Sequence[int] = (-1, 1), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Returns a ('data', 'fsdp') mesh; -1 in `shape` takes the remaining devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
  # Auto axes: XLA propagates shardings inside the step (GSPMD); in/out shardings are explicit.
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(tuple(shape), AXES, devices=devices, axis_types=auto)


def parse_mesh_flag(text: str) -> tuple[int, int]:
  """Returns (data, fsdp) from a flag like '8,1' or '2x4' (-1 allowed once)."""
  parts = re.split(r"[x,]", text.strip())
  try:
    vals = tuple(int(p) for p in parts)
  except ValueError:
    vals = ()
  if len(vals) != 2:
    raise ValueError(f"--mesh: expected 'DATA,FSDP' such as '8,1' or '2,4', got {text!r}")
  return vals


def leaf_spec(path: str, shape: tuple[int, ...], fsdp: int) -> P:
  """Returns the PartitionSpec of one array given its path and shape (see the module docstring)."""
  if len(shape) < 2 or fsdp == 1:
    return P()
  first = 1 if f"['{LAYERS}']" in path else 0  # a stack's layer axis stays whole
  if len(shape) - first < 2:  # a (stacked) vector
    return P()
  preferred = None
  for pattern, dims in PARAM_RULES:
    if re.search(pattern, path):
      preferred = [d % len(shape) for d in dims if -len(shape) <= d]
      break
  if preferred is None:
    preferred = sorted(range(len(shape)), key=lambda d: -shape[d])
  preferred = [d for d in preferred if d >= first]
  for d in preferred:
    if shape[d] % fsdp == 0 and shape[d] >= fsdp:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh):
  """Returns NamedShardings for every array leaf of `tree` (params or optimizer state)."""
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    return NamedSharding(mesh, leaf_spec(jax.tree_util.keystr(path), tuple(np.shape(leaf)), fsdp))

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def initialize_distributed() -> None:
  """Initialises multi-host JAX (TPU pods, multi-node GPU) when more than one process is launched.

  Uses the environment the cluster provides (TPU metadata, SLURM, or the JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); a no-op for a single process.
  """
  import os

  multi = any(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
  if multi and not jax.distributed.is_initialized():
    jax.distributed.initialize()
