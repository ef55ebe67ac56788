"""Generate the committed golden fixtures under tests/fixtures/ from the Hugging Face
`transformers` reference implementations of Qwen3 and Qwen3.5 (text).

Needs torch + transformers, which are NOT dependencies of dreamjax; run it from a
separate venv (see tests/fixtures/README.md):

    /work/venv-parity/bin/python tests/make_fixtures.py

Deterministic: fixed torch / numpy seeds, float32, CPU. Every fixture is checked by
(1) reloading the saved folder with AutoModelForCausalLM.from_pretrained and comparing
logits, (2) an independent float64 numpy re-implementation written from
tests/fixtures/NOTES_qwen3_5.md (so the notes are verified too), (3) for the padded
golden, that the left-padded row reproduces the unpadded logits on its real tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import torch

import transformers
from transformers import (
    AutoModelForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
VOCAB = 97
N_PAD = 5  # left pad tokens in row 0 of the padded golden
PAD_ID = 0  # "<|endoftext|>" in the tiny tokenizer

# --------------------------------------------------------------------------------------
# Fixture definitions
# --------------------------------------------------------------------------------------

QWEN3_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    eos_token_id=2,
)

QWEN3_TIED = dict(
    vocab_size=VOCAB,
    hidden_size=36,
    intermediate_size=68,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=10,  # Nq*D = 60 != hidden 36
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    eos_token_id=2,
)

QWEN3_5_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=5,
    # real family pattern (L, L, L, F) plus one linear layer after the full one
    layer_types=[
        "linear_attention",
        "linear_attention",
        "linear_attention",
        "full_attention",
        "linear_attention",
    ],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # rotary dim = int(24 * 0.25) = 6 (3 frequencies); Nq*D = 96 != hidden 48
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
    },
    linear_conv_kernel_dim=4,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=12,  # dk != dv on purpose
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    eos_token_id=2,
)

FIXTURE_SPECS = [
    # name, config class, model class, config kwargs, seed, T
    ("qwen3_tiny", Qwen3Config, Qwen3ForCausalLM, QWEN3_TINY, 1234, 23),
    ("qwen3_tied", Qwen3Config, Qwen3ForCausalLM, QWEN3_TIED, 2345, 21),
    # T = 100 > one chunk of 64 (the DeltaNet chunk size), not a multiple of 64
    ("qwen3_5_tiny", Qwen3_5TextConfig, Qwen3_5ForCausalLM, QWEN3_5_TINY, 3456, 100),
]


# --------------------------------------------------------------------------------------
# Random weights: every parameter gets a non-trivial value so that a wrong weight use
# (transpose, head order, missing 1+w, ...) changes the logits visibly.
# --------------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, zero_centred_norm: bool, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if name.endswith("A_log"):
                # A in [0.02, 0.3]: slow decay so state is carried across chunk boundaries
                a = torch.empty(shape).uniform_(0.02, 0.3, generator=gen)
                p.copy_(torch.log(a))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(shape, generator=gen) * 0.5)
            elif name.endswith("linear_attn.norm.weight"):
                # gated RMSNorm: plain w * rms(x), around 1
                p.copy_(1.0 + 0.2 * torch.randn(shape, generator=gen))
            elif "norm" in name and p.ndim == 1:
                if zero_centred_norm:  # Qwen3.5: rms(x) * (1 + w)
                    p.copy_(0.2 * torch.randn(shape, generator=gen))
                else:  # Qwen3: w * rms(x)
                    p.copy_(1.0 + 0.2 * torch.randn(shape, generator=gen))
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(shape, generator=gen) * 0.4)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(shape, generator=gen))
            elif p.ndim == 2:
                fan_in = shape[1]
                p.copy_(torch.randn(shape, generator=gen) / math.sqrt(fan_in))
            else:
                raise RuntimeError(f"unhandled parameter {name} {tuple(shape)}")


def build_model(cfg_cls, model_cls, cfg_kwargs, seed):
    torch.manual_seed(seed)
    cfg = cfg_cls(**cfg_kwargs)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_(model, zero_centred_norm=cfg.model_type == "qwen3_5_text", gen=gen)
    model = model.float().eval()
    return model


# --------------------------------------------------------------------------------------
# Independent float64 numpy reference written from NOTES_qwen3_5.md
# --------------------------------------------------------------------------------------


def _rms(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _rope(x, pos, theta, rd):
    # x: (B,T,N,D); rotate the first rd dims, rotate_half layout
    inv = 1.0 / theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
    ang = pos[:, :, None].astype(np.float64) * inv[None, None, :]  # (B,T,rd/2)
    cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, :, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, :, None, :]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = np.concatenate([-xr[..., half:], xr[..., :half]], -1)
    return np.concatenate([xr * cos + rot * sin, xp], -1)


def _attention(q, k, v, mask):
    # q (B,T,Nq,D), k/v (B,T,Nkv,D), mask (B,T) of 0/1 keys
    B, T, Nq, D = q.shape
    G = Nq // k.shape[2]
    k = np.repeat(k, G, axis=2)
    v = np.repeat(v, G, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    allowed = np.tril(np.ones((T, T), bool))[None, None] & (mask[:, None, None, :] > 0)
    allowed = allowed | np.eye(T, dtype=bool)[None, None]  # keep fully-masked (pad) query rows finite
    s = np.where(allowed, s, -np.inf)
    s = s - np.max(s, -1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def numpy_reference(sd: dict, cfg, ids, mask, pos):
    """Logits (B,T,V) for Qwen3 / Qwen3.5-text from a state dict of float64 arrays."""
    W = {k: v.detach().double().numpy() for k, v in sd.items()}
    is35 = cfg.model_type == "qwen3_5_text"
    eps = cfg.rms_norm_eps

    def norm(x, w):
        return _rms(x, eps) * ((1.0 + w) if is35 else w)

    def lin(x, name):
        return x @ W[name].T

    B, T = ids.shape
    D = cfg.head_dim
    rp = cfg.rope_parameters
    theta = rp["rope_theta"]
    rd = int(D * rp.get("partial_rotary_factor", 1.0)) if is35 else D
    mask = mask.astype(np.float64)
    has_pad = bool((mask == 0).any())
    h = W["model.embed_tokens.weight"][ids]
    types = cfg.layer_types if is35 else ["full_attention"] * cfg.num_hidden_layers
    for n, kind in enumerate(types):
        p = f"model.layers.{n}."
        x = norm(h, W[p + "input_layernorm.weight"])
        if kind == "full_attention":
            a = p + "self_attn."
            Nq, Nkv = cfg.num_attention_heads, cfg.num_key_value_heads
            if is35:
                qg = lin(x, a + "q_proj.weight").reshape(B, T, Nq, 2 * D)
                q, gate = qg[..., :D], qg[..., D:].reshape(B, T, Nq * D)
            else:
                q = lin(x, a + "q_proj.weight").reshape(B, T, Nq, D)
            q = norm(q, W[a + "q_norm.weight"])
            k = norm(lin(x, a + "k_proj.weight").reshape(B, T, Nkv, D), W[a + "k_norm.weight"])
            v = lin(x, a + "v_proj.weight").reshape(B, T, Nkv, D)
            q, k = _rope(q, pos, theta, rd), _rope(k, pos, theta, rd)
            o = _attention(q, k, v, mask).reshape(B, T, Nq * D)
            if is35:
                o = o * _sigmoid(gate)
            y = lin(o, a + "o_proj.weight")
        else:
            a = p + "linear_attn."
            Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
            dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
            K = cfg.linear_conv_kernel_dim
            if has_pad:
                x = x * mask[:, :, None]
            qkv = lin(x, a + "in_proj_qkv.weight")  # (B,T,C)
            w = W[a + "conv1d.weight"][:, 0, :]  # (C,K)
            xp = np.concatenate([np.zeros((B, K - 1, qkv.shape[-1])), qkv], 1)
            conv = sum(w[None, None, :, j] * xp[:, j : j + T, :] for j in range(K))
            qkv = _silu(conv)
            q = qkv[..., : Hk * dk].reshape(B, T, Hk, dk)
            k = qkv[..., Hk * dk : 2 * Hk * dk].reshape(B, T, Hk, dk)
            v = qkv[..., 2 * Hk * dk :].reshape(B, T, Hv, dv)
            z = lin(x, a + "in_proj_z.weight").reshape(B, T, Hv, dv)
            beta = _sigmoid(lin(x, a + "in_proj_b.weight"))
            g = -np.exp(W[a + "A_log"]) * _softplus(lin(x, a + "in_proj_a.weight") + W[a + "dt_bias"])
            r = Hv // Hk
            q = np.repeat(q, r, axis=2)
            k = np.repeat(k, r, axis=2)
            q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / math.sqrt(dk)
            k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
            S = np.zeros((B, Hv, dk, dv))
            out = np.zeros((B, T, Hv, dv))
            for t in range(T):
                S = S * np.exp(g[:, t])[:, :, None, None]
                kt = k[:, t]
                pred = np.einsum("bhkv,bhk->bhv", S, kt)
                u = beta[:, t][:, :, None] * (v[:, t] - pred)
                S = S + kt[:, :, :, None] * u[:, :, None, :]
                out[:, t] = np.einsum("bhkv,bhk->bhv", S, q[:, t])
            o = W[a + "norm.weight"] * _rms(out, eps) * _silu(z)
            y = lin(o.reshape(B, T, Hv * dv), a + "out_proj.weight")
        h = h + y
        x = norm(h, W[p + "post_attention_layernorm.weight"])
        mlp = p + "mlp."
        h = h + lin(_silu(lin(x, mlp + "gate_proj.weight")) * lin(x, mlp + "up_proj.weight"), mlp + "down_proj.weight")
    h = norm(h, W["model.norm.weight"])
    head = W["model.embed_tokens.weight"] if cfg.tie_word_embeddings else W["lm_head.weight"]
    return h @ head.T


# --------------------------------------------------------------------------------------
# Goldens
# --------------------------------------------------------------------------------------


@torch.no_grad()
def forward(model, ids, mask, pos=None, hidden=False):
    kw = dict(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long))
    if pos is not None:
        kw["position_ids"] = torch.as_tensor(pos, dtype=torch.long)
    out = model(**kw, output_hidden_states=hidden, use_cache=False)
    logits = out.logits.float().numpy()
    if hidden:
        return logits, np.stack([h.float().numpy() for h in out.hidden_states])
    return logits


def check_close(name, a, b, atol, rtol=0.0):
    err = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    ok = np.allclose(a, b, atol=atol, rtol=rtol)
    print(f"  {'OK ' if ok else 'FAIL'} {name}: max|diff|={err:.3e} (max|ref|={scale:.3f}, atol={atol})")
    if not ok:
        raise SystemExit(f"check failed: {name}")
    return err


def make_fixture(name, cfg_cls, model_cls, cfg_kwargs, seed, T):
    print(f"== {name}")
    folder = os.path.join(FIXTURES, name)
    keep = {}
    if os.path.isdir(folder):  # keep tokenizer files written by make_tokenizer()
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer_golden.json"):
            fp = os.path.join(folder, f)
            if os.path.exists(fp):
                keep[f] = open(fp, "rb").read()
        shutil.rmtree(folder)
    model = build_model(cfg_cls, model_cls, cfg_kwargs, seed)
    model.save_pretrained(folder, safe_serialization=True)
    for f, data in keep.items():
        with open(os.path.join(folder, f), "wb") as fh:
            fh.write(data)
    cfg = model.config

    rng = np.random.default_rng(seed)
    B = 2
    ids = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    logits, hidden = forward(model, ids, mask, hidden=True)

    # left-padded batch: row 0 = N_PAD pad tokens + the first T-N_PAD tokens of ids[0]
    ids_pad = ids.copy()
    ids_pad[0, N_PAD:] = ids[0, : T - N_PAD]
    ids_pad[0, :N_PAD] = PAD_ID
    mask_pad = np.ones((B, T), np.int32)
    mask_pad[0, :N_PAD] = 0
    pos_pad = np.clip(np.cumsum(mask_pad, axis=1) - 1, 0, None).astype(np.int32)
    logits_pad = forward(model, ids_pad, mask_pad, pos=pos_pad)

    # ---- checks ----------------------------------------------------------------------
    # 1. padded row 0 real tokens == unpadded run of the same tokens; row 1 unchanged
    ref0 = forward(model, ids[:1, : T - N_PAD], np.ones((1, T - N_PAD), np.int32))
    check_close("left-pad row0 (real tokens) == unpadded", logits_pad[0, N_PAD:], ref0[0], atol=1e-4)
    check_close("left-pad row1 == unpadded row1", logits_pad[1], logits[1], atol=1e-4)
    assert np.isfinite(logits_pad).all(), "non-finite logits in padded golden"
    # 2. numpy float64 re-implementation of NOTES_qwen3_5.md
    sd = model.state_dict()
    np_logits = numpy_reference(sd, cfg, ids, mask, pos)
    check_close("numpy reference (notes) vs HF logits", logits, np_logits, atol=2e-4)
    np_pad = numpy_reference(sd, cfg, ids_pad, mask_pad, pos_pad)
    check_close("numpy reference (notes) vs HF padded logits, real tokens",
                logits_pad[mask_pad.astype(bool)], np_pad[mask_pad.astype(bool)], atol=2e-4)
    # 3. reload from disk
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(reloaded) is model_cls, type(reloaded)
    check_close("reloaded from_pretrained logits", forward(reloaded, ids, mask), logits, atol=0.0)
    check_close("reloaded padded logits", forward(reloaded, ids_pad, mask_pad, pos=pos_pad), logits_pad, atol=0.0)
    # 4. Qwen3.5: chunked path (prefill) vs per-token recurrent path (cached decode)
    if cfg.model_type == "qwen3_5_text":
        check_decode_consistency(model, ids, logits)

    np.savez_compressed(
        os.path.join(folder, "golden.npz"),
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        logits=logits.astype(np.float32),
        hidden_states_row0=hidden[:, 0].astype(np.float32),  # (L+1, T, H), batch row 0 only
        input_ids_pad=ids_pad,
        attention_mask_pad=mask_pad,
        position_ids_pad=pos_pad,
        logits_pad=logits_pad.astype(np.float32),
    )
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    print(f"  wrote {folder} ({size / 1024:.1f} KiB)")
    return cfg


@torch.no_grad()
def check_decode_consistency(model, ids, logits):
    """Prefill 70 tokens (chunked kernel, > 1 chunk), then decode token by token with the
    cache (recurrent kernel + conv_state), and compare with the full-sequence logits."""
    from transformers import DynamicCache

    T = ids.shape[1]
    P = 70
    tids = torch.as_tensor(ids, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=tids[:, :P], past_key_values=cache, use_cache=True)
    steps = [out.logits.numpy()]
    for t in range(P, T):
        out = model(input_ids=tids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits.numpy())
    inc = np.concatenate(steps, axis=1)
    check_close("cached prefill+decode (recurrent path) vs full forward", inc, logits, atol=1e-4)


# --------------------------------------------------------------------------------------
# Tiny tokenizer (+ chat template) for qwen3_tiny
# --------------------------------------------------------------------------------------

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model learns to fine tune on small data",
    "hello world this is a test of the tokenizer",
    "the user asks and the assistant answers",
    "jax is fast and the model runs on the accelerator",
] * 4

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # golden encodings + rendered chat, produced through transformers' AutoTokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    texts = ["hello world", "the quick brown fox", "jax model xyz", ""]
    messages = [
        {"role": "system", "content": "you are a tiny model"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the answer"},
    ]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    rendered_gen = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    golden = {
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": {s: tok.token_to_id(s) for s in SPECIALS},
        "encode": [{"text": t, "ids": hf(t, add_special_tokens=True)["input_ids"]} for t in texts],
        "chat_messages": messages,
        "chat_rendered": rendered,
        "chat_rendered_ids": hf(rendered, add_special_tokens=False)["input_ids"],
        "chat_rendered_generation_prompt": rendered_gen,
    }
    for e in golden["encode"]:
        assert hf.decode(e["ids"]) == e["text"] or "xyz" in e["text"], e
    with open(os.path.join(folder, "tokenizer_golden.json"), "w") as f:
        json.dump(golden, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"  tokenizer: vocab {tok.get_vocab_size()}, chat render {rendered!r}")


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    for spec in FIXTURE_SPECS:
        make_fixture(*spec)
    make_tokenizer(os.path.join(FIXTURES, "qwen3_tiny"))
    total = 0
    for name, *_ in FIXTURE_SPECS:
        folder = os.path.join(FIXTURES, name)
        for f in sorted(os.listdir(folder)):
            s = os.path.getsize(os.path.join(folder, f))
            total += s
            print(f"  {name}/{f}: {s} B")
    print(f"total {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
