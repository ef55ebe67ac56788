"""The stacked parameter layout: decoder layers grouped by kind, each leaf with a leading layer axis.

    params['layers'] = {'full_attention': {...}, 'linear_attention': {...}}   (the kinds present)

Every leaf of `params['layers'][kind]` is the stack of that leaf over the model's layers of that
kind, in layer order: Qwen3's 36 layers are one stack of 36; Qwen3.5-27B's 48 Gated DeltaNet and
16 attention layers are a stack of 48 and one of 16. The decoder scans over repeats of
`config.block_pattern`, so a 64-layer model compiles as one block, has a handful of parameter
leaves, and Orbax stores the stacks as they are. Layer i of the model is entry j of its kind's
stack, (kind, j) = `kind_index(config, i)`; `unstack` and `stack` convert to and from a list of
per-layer dicts (what HF checkpoints and per-layer monitors speak).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax.model.config import ModelConfig

LAYERS = "layers"  # the params key whose leaves carry a leading layer axis


def kind_index(config: ModelConfig, i: int) -> tuple[str, int]:
  """Returns (kind, j): layer i is entry j of params['layers'][kind]."""
  kind = config.layer_types[i]
  return kind, config.layer_types[:i].count(kind)


def layer_params(params: dict, config: ModelConfig, i: int) -> dict:
  """Returns the params of layer i (a dict of arrays without the layer axis)."""
  kind, j = kind_index(config, i)
  return jax.tree.map(lambda x: x[j], params[LAYERS][kind])


def unstack(params: dict, config: ModelConfig) -> list[dict]:
  """Returns the layers as a list of per-layer dicts, in layer order."""
  return [layer_params(params, config, i) for i in range(config.num_layers)]


def stack(layers: Sequence[dict], config: ModelConfig) -> dict:
  """Returns params['layers'] (per-kind stacks) from a list of per-layer dicts in layer order."""
  if len(layers) != config.num_layers:
    raise ValueError(f"stack: {len(layers)} layers given, the config has {config.num_layers}")
  out = {}
  for kind in config.layer_kinds:
    members = [layer for layer, t in zip(layers, config.layer_types) if t == kind]
    is_np = all(isinstance(x, np.ndarray) for x in jax.tree.leaves(members))
    out[kind] = jax.tree.map(lambda *xs: np.stack(xs) if is_np else jnp.stack(xs), *members)
  return out


def is_per_layer(params: dict) -> bool:
  """Returns True for params in the per-layer layout of dreamjax before 0.2 ('layers' a list of
  per-layer dicts; Orbax may restore a list as a dict keyed '0', '1', …)."""
  layers = params.get(LAYERS)
  return isinstance(layers, (list, tuple)) or (isinstance(layers, dict) and bool(layers)
                                               and all(str(k).isdigit() for k in layers))


def from_per_layer(params: dict, config: ModelConfig) -> dict:
  """Returns params in the stacked layout, from either layout (per-layer params are stacked)."""
  if not is_per_layer(params):
    return params
  layers = params[LAYERS]
  if isinstance(layers, dict):
    layers = [layers[k] for k in sorted(layers, key=int)]
  return dict(params, **{LAYERS: stack(layers, config)})
