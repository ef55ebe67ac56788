"""Main job. For now: the foundation demo (ORPO + APOLLO on a toy task); flags stay small.

    python -m launch.train [--steps 200] [--lr 1e-2] [--seed 0]
"""

from absl import app, flags

from dreamjax import demo

_STEPS = flags.DEFINE_integer("steps", 200, "Training steps per optimizer.")
_LR = flags.DEFINE_float("lr", 1e-2, "Peak learning rate (APOLLO-Mini uses lr/4).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init and data.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  demo.run(steps=_STEPS.value, lr=_LR.value, seed=_SEED.value)


if __name__ == "__main__":
  app.run(main)
