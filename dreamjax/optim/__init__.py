"""Optimizers: APOLLO and APOLLO-Mini as optax transforms (the parameter-scale defence)."""

from dreamjax.optim.apollo import (
    ScaleByApolloState,
    apollo,
    apollo_mini,
    decoupled_weight_decay_after_step,
    default_label_fn,
    gaussian_projection,
    path_key,
    projection_key,
    projection_side,
    scale_by_adam_reference,
    scale_by_apollo,
    stacked_axes,
)
