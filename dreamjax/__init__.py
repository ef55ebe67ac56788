"""dreamjax: behavioural fine-tuning without forgetting, in JAX."""

__version__ = "0.1.0"
