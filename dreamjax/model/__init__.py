"""Qwen3 / Qwen3.5 decoders with a frozen-context cache (functional core: params are a pytree)."""

from dreamjax.model.cache import AttentionCache, Cache, DeltaNetCache, broadcast_cache, init_cache
from dreamjax.model.config import FULL, LINEAR, ConfigError, ModelConfig
from dreamjax.model.decoder import Output, forward, init_params, lm_head, positions_from_mask, prefill
from dreamjax.model.sample import Generation, generate
