"""Planning past the machines we have: does the real step for Qwen3.5-27B fit 80 GB per device?

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/scale_plan.py \
        [--contexts 8192,32768] [--modes frozen,full] [--optimizers apollo_mini,adamw] [--layers 64]

Lowers and compiles the project's train step (ORPO, remat on, bf16 params, float32 optimizer
moments) for the full-size Qwen3.5-27B text config on a fake 8-device CPU mesh ('data' 1 ×
'fsdp' 8: parameters and optimizer state sharded over 8 devices, one example per device) with
abstract inputs (jax.ShapeDtypeStruct: nothing is allocated), and prints XLA's compiled memory
analysis per device, one JSON line per (mode, optimizer, context), response 512, global batch 8.

per-device bytes = arguments + outputs + temporaries − aliased (donated state) — what the
compiled program needs resident on one device. CPU-compiled memory is a planning estimate: the
GPU/TPU compilers fuse and schedule differently (and XLA:CPU does not model collectives' buffers
the same way), so leave headroom.

`--layers N` compiles a shorter stack of the same layer pattern (for a quick check; the default is
the real 64). Compiling the 64-layer step takes over ten minutes per configuration on a 2-core CPU
(the decoder unrolls its layers), so `--extrapolate 4,8` compiles 4- and 8-layer stacks (one and two
blocks of 3 DeltaNet + 1 attention layer) and extrapolates each memory figure linearly per block to
`--layers` (bytes(L) = bytes(4) + (L − 4)/4 · (bytes(8) − bytes(4))); such lines say
"method": "extrapolated". Check the extrapolation against one compiled 64-layer line.
"""

import argparse
import json
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax

from dreamjax import model as M
from dreamjax import optim
from dreamjax.train import batch as batch_lib
from dreamjax.train import mesh as mesh_lib
from dreamjax.train import step as step_lib

GB = 1e9


def qwen3_5_27b(layers: int = 64) -> M.ModelConfig:
  """Qwen3.5-27B's text config (values of its published config.json, text_config)."""
  interval = 4  # full_attention_interval: every 4th layer is full attention
  return M.ModelConfig(
      model_type="qwen3_5_text", vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_layers=layers,
      num_heads=24, num_kv_heads=4, head_dim=256, rms_norm_eps=1e-6, rope_theta=10_000_000.0,
      partial_rotary_factor=0.25, tie_embeddings=False,
      layer_types=tuple(M.FULL if (i + 1) % interval == 0 else M.LINEAR for i in range(layers)),
      attn_output_gate=True, norm_zero_centered=True, linear_num_key_heads=16, linear_num_value_heads=48,
      linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel=4, chunk_size=64,
      eos_token_ids=(248044,), max_position_embeddings=262144)


def abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def plan(config, mode, opt_name, context, response, batch, mesh):
  params = jax.eval_shape(lambda: M.init_params(config, jax.random.PRNGKey(0), dtype=jnp.bfloat16))
  params32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
  opt = optim.apollo_mini(1e-5) if opt_name == "apollo_mini" else optax.adamw(1e-5)
  opt_state = jax.eval_shape(opt.init, params32)  # float32 moments beside bf16 params
  state = jax.eval_shape(lambda p, o: step_lib.TrainState(p, o, jnp.zeros((), jnp.int32), jax.random.PRNGKey(0)),
                         params, opt_state)
  state = abstract(state, mesh_lib.tree_shardings(state, mesh))
  shapes = jax.eval_shape(lambda: batch_lib.PreferenceBatch(
      jnp.zeros((batch, context), jnp.int32), jnp.zeros((batch, context), jnp.int32),
      jnp.zeros((batch, response), jnp.int32), jnp.zeros((batch, response), jnp.int32),
      jnp.zeros((batch, response), jnp.int32), jnp.zeros((batch, response), jnp.int32), jnp.zeros((batch,))))
  bs = mesh_lib.batch_sharding(mesh)
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bs), shapes)
  step = step_lib.make_train_step(config, "orpo", opt, mode, mesh=mesh, remat=True)
  t0 = time.time()
  lowered = step.lower(state, abstract_batch)
  compiled = lowered.compile()
  m = compiled.memory_analysis()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  per_device = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {
      "bench": "scale_plan", "model": f"Qwen3.5-27B{'' if config.num_layers == 64 else f' ({config.num_layers} layers)'}",
      "params_billion": round(n_params / 1e9, 3), "mode": mode, "optimizer": opt_name, "context": context,
      "response": response, "global_batch": batch, "mesh": dict(mesh.shape), "remat": True,
      "param_dtype": "bfloat16", "moment_dtype": "float32",
      "per_device_gb": round(per_device / GB, 2), "arguments_gb": round(m.argument_size_in_bytes / GB, 2),
      "temp_gb": round(m.temp_size_in_bytes / GB, 2), "outputs_gb": round(m.output_size_in_bytes / GB, 2),
      "aliased_gb": round(m.alias_size_in_bytes / GB, 2), "fits_80gb": per_device <= 80 * GB,
      "compile_s": round(time.time() - t0, 1),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--contexts", default="8192,32768")
  ap.add_argument("--modes", default="frozen,full")
  ap.add_argument("--optimizers", default="apollo_mini,adamw")
  ap.add_argument("--response", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--layers", type=int, default=64)
  ap.add_argument("--extrapolate", default="", help="e.g. '4,8': compile these depths, extrapolate to --layers")
  args = ap.parse_args()
  if jax.device_count() != 8:
    raise SystemExit(f"needs 8 (fake) devices, have {jax.device_count()}; set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts")
  mesh = mesh_lib.make_mesh((1, 8))
  config = qwen3_5_27b(args.layers)
  for context in (int(c) for c in args.contexts.split(",")):
    for opt_name in args.optimizers.split(","):
      for mode in args.modes.split(","):
        if not args.extrapolate:
          print(json.dumps(plan(config, mode, opt_name, context, args.response, args.batch, mesh)), flush=True)
          continue
        l1, l2 = (int(x) for x in args.extrapolate.split(","))
        a, b = (plan(qwen3_5_27b(n), mode, opt_name, context, args.response, args.batch, mesh) for n in (l1, l2))
        out = dict(b, model="Qwen3.5-27B", method=f"extrapolated from {l1} and {l2} compiled layers",
                   compile_s=round(a["compile_s"] + b["compile_s"], 1))
        per_param = (b["params_billion"] - a["params_billion"]) / (l2 - l1)
        out["params_billion"] = round(a["params_billion"] + (args.layers - l1) * per_param, 3)
        for k in ("per_device_gb", "arguments_gb", "temp_gb", "outputs_gb", "aliased_gb"):
          out[k] = round(a[k] + (args.layers - l1) * (b[k] - a[k]) / (l2 - l1), 2)
        out["fits_80gb"] = out["per_device_gb"] <= 80
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
