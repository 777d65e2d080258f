"""MiniT2I in plain JAX: the MM-JiT denoiser, the frozen FLAN-T5 encoder, its tokenizer, weight I/O.

Parameters are nested dicts (and lists, for repeated blocks) of arrays whose paths, joined by ".",
are the module names of the released checkpoints ("double_blocks.3.img_qkv.weight"). Linear weights
are stored [in, out] so that a layer is `x @ w`; the importers transpose PyTorch's [out, in].

Read from the top: configs, primitives, the MM-JiT forward pass (mmjit_apply), the MeanFlow student
and initialisation make the model; the T5 encoder, tokenizer and weight files follow.
"""
import dataclasses
import functools
import json
import math
import os
import struct

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# ------------------------------------------------------------------------------------------ configs

@dataclasses.dataclass(frozen=True)
class MMJiTConfig:
    image_size: int = 32  # the training size, sampling's default (any multiple of patch_size runs)
    patch_size: int = 8
    in_channels: int = 3
    txt_dim: int = 128  # width of the text encoder's features (T5 d_model)
    hidden_size: int = 96
    depth: int = 4  # double-stream blocks
    txt_preamble_depth: int = 2  # text-only blocks: the "adapter"
    num_heads: int = 3
    head_dim: int = 32
    mlp_ratio: float = 8 / 3
    pca_channels: int = 32  # bottleneck width of the patch embedding
    mean_flow: bool = False  # a MeanFlow student: it takes a jump length and a guidance scale

    @property
    def mlp_hidden(self):
        return -(-int(self.hidden_size * self.mlp_ratio) // 8) * 8

PRESETS = {
    "tiny": MMJiTConfig(),
    "tiny/4": MMJiTConfig(patch_size=4),  # finer textures, fewer steps a second (README: Recipes)
    "B/32": MMJiTConfig(512, 32, 3, 1024, 768, 17, 2, 12, 64, 8 / 3, 128),
    "B/16": MMJiTConfig(512, 16, 3, 1024, 768, 17, 2, 12, 64, 8 / 3, 128),
    "L/16": MMJiTConfig(512, 16, 3, 1024, 1248, 23, 2, 24, 52, 2.7, 128),
}

@dataclasses.dataclass(frozen=True)
class T5Config:  # defaults: google/flan-t5-large's encoder
    vocab_size: int = 32128
    d_model: int = 1024
    d_kv: int = 64
    num_heads: int = 16
    d_ff: int = 2816
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

# --------------------------------------------------------------------------------------- primitives

def matmul(x, w):
    """x [..., in] @ w [in, out] as one 2-D matmul: XLA's CPU backend is much faster on 2-D dots."""
    return (x.reshape(-1, x.shape[-1]) @ w.astype(x.dtype)).reshape(*x.shape[:-1], w.shape[-1])

def linear(p, x):
    y = matmul(x, p["weight"])
    return y + p["bias"].astype(x.dtype) if "bias" in p else y

def rms_norm(scale, x, eps=1e-6):
    """x / rms(x) * scale, with the statistics in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)

def gated_mlp(x, w_gate, w_up, w_down, act):
    """SwiGLU (act = silu) in MM-JiT, gated-GELU in T5: w_down(act(x w_gate) * x w_up)."""
    return matmul(act(matmul(x, w_gate)) * matmul(x, w_up), w_down)

def swiglu(p, x):
    return gated_mlp(x, p["w1"]["weight"], p["w3"]["weight"], p["w2"]["weight"], jax.nn.silu)

# Positions are static, so RoPE tables and position embeddings are computed in NumPy at trace time:
# they enter the compiled program as constants, instead of sines recomputed inside every fused
# kernel that uses them (that cost 5% of a CPU training step at B width).

def rope_angles_1d(length, dim, theta=10000.0):
    inv_freq = theta ** (-np.arange(0, dim, 2) / dim)
    return np.arange(length)[:, None] * inv_freq  # [L, dim/2]

def rope_angles_2d(rows, cols, dim, theta=10000.0):
    """Half the rotary frequencies follow the row, half the column, of each token of a row-major
    rows x cols grid: a token's angles depend on its own (row, column) only, whatever the grid."""
    inv_freq = theta ** (-np.arange(0, dim // 2, 2) / (dim // 2))
    rows, cols = np.divmod(np.arange(rows * cols), cols)
    return np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], -1)  # [N, dim/2]

def rope_tables(angles):
    """cos and sin, [T, 1, Dh] each, of angles [T, Dh/2] for rotate-half RoPE."""
    angles = np.concatenate([angles, angles], axis=-1)[:, None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

def apply_rope(x, rope):
    """Rotate-half RoPE. x: [B, T, H, Dh], rope: rope_tables for T positions."""
    cos, sin = rope
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)

def attention(q, k, v, scale):
    """Softmax attention of q, k, v [B, T, H, Dh] by the kernel attention_implementation picks."""
    platform = jax.extend.backend.get_backend().platform_version  # "cuda ..." on NVIDIA GPUs only
    platform = "cuda" if "cuda" in platform.lower() else jax.default_backend()
    if attention_implementation(platform, q.dtype, q.shape[-1]) == "xla":
        return jax.nn.dot_product_attention(q, k, v, scale=scale)
    return padded_attention(q, k, v, scale, "cudnn")

def attention_implementation(platform, dtype, head_dim):
    """cuDNN's fused kernel where it runs (NVIDIA GPUs, bf16/fp16, head size <= 128): it never
    holds the [T, T] scores in memory (issue 17, one H200: a B/16 512 px step of batch 32 went from
    84 to 25 GiB and from 23% to 46% MFU). XLA's materialising path elsewhere (CPU, TPU, fp32)."""
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if platform == "cuda" and half and head_dim <= 128 else "xla"

def padded_attention(q, k, v, scale, implementation):
    """Attention with the head size padded by zero channels to a multiple of 8 (cuDNN's rule; L/16's
    52 -> 56), the output sliced back. Exact: zero channels add nothing to q.k and come out zero."""
    Dh = q.shape[-1]
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -Dh % 8)])
    attend = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    return attend(pad(q), pad(k), pad(v), scale=scale)[..., :Dh]

# ------------------------------------------------------------------------------------------- MM-JiT

def mmjit_apply(params, cfg, x, context, mask, dtype=jnp.float32, remat=False):
    """Predict the clean image x0 from the noisy image x [B, H, W, C], T5 features context
    [B, L, Dt] and their mask [B, L]. No timestep input: the noise level is read off the image."""
    txt = text_adapter(params, cfg, context, mask, dtype, remat)
    return denoise(params, cfg, x, txt, dtype, remat)

def text_adapter(params, cfg, context, mask, dtype=jnp.float32, remat=False):
    """T5 features [B, L, Dt] and mask [B, L] -> text tokens [B, L, D]. It does not see the image,
    so a sampler computes it once for all its steps."""
    context = jnp.where(mask[..., None] > 0, context, params["mask_token"])  # padding: mask_token
    txt = linear(params["txt_embedder"], context.astype(dtype))
    rope = rope_tables(rope_angles_1d(context.shape[1], cfg.head_dim))
    for p in params["txt_preamble_blocks"]:
        (txt,) = _blocks(cfg, remat)(p, [txt], rope, ("",))
    return txt

def denoise(params, cfg, x, txt, dtype=jnp.float32, remat=False):
    """The double blocks: noisy image x [B, H, W, C] and adapted text tokens [B, L, D] -> x0
    [B, H, W, C]. H and W: any multiples of the patch size (each shape compiles once)."""
    rows, cols = patch_grid(cfg, x)
    img = patch_embed(params["img_embedder"], cfg, x.astype(dtype))  # [B, N, D]
    img = img + sincos_pos_embed(cfg, rows, cols).astype(dtype)
    rope = rope_tables(np.concatenate([rope_angles_1d(txt.shape[1], cfg.head_dim),
                                       rope_angles_2d(rows, cols, cfg.head_dim)]))
    for p in params["double_blocks"]:
        txt, img = _blocks(cfg, remat)(p, [txt, img], rope, ("txt_", "img_"))
    f = params["final_layer"]
    out = linear(f["linear"], rms_norm(f["norm_final"]["weight"], img))  # [B, N, P*P*C]
    return unpatchify(cfg, out.astype(jnp.float32), rows, cols)

def _blocks(cfg, remat):
    block = functools.partial(joint_block, num_heads=cfg.num_heads)
    return jax.checkpoint(block, static_argnums=(3,)) if remat else block

def joint_block(p, streams, rope, prefixes, num_heads):
    """Pre-norm attention + SwiGLU over streams that attend jointly to their concatenation.

    A text preamble block is the one-stream case (prefixes ("",)); a double block the two-stream
    case (("txt_", "img_")): each stream has its own norms, qkv, output projection and SwiGLU, while
    q_norm and k_norm are shared. streams: list of [B, T_s, D]; rope: rope_tables of all the tokens.
    """
    qs, ks, vs = [], [], []
    for x, s in zip(streams, prefixes):
        qkv = linear(p[s + "qkv"], rms_norm(p[s + "norm1"]["weight"], x))
        qkv = qkv.reshape(*x.shape[:2], 3, num_heads, -1)  # [B, T, 3, H, Dh]
        qs.append(qkv[:, :, 0]), ks.append(qkv[:, :, 1]), vs.append(qkv[:, :, 2])
    q = apply_rope(rms_norm(p["q_norm"]["weight"], jnp.concatenate(qs, 1)), rope)  # [B, T, H, Dh]
    k = apply_rope(rms_norm(p["k_norm"]["weight"], jnp.concatenate(ks, 1)), rope)
    out = attention(q, k, jnp.concatenate(vs, 1), q.shape[-1] ** -0.5)
    out = jnp.split(out, np.cumsum([x.shape[1] for x in streams])[:-1], axis=1)
    new = []
    for x, o, s in zip(streams, out, prefixes):
        x = x + linear(p[s + "attn_proj"], o.reshape(x.shape[0], x.shape[1], -1))
        new.append(x + swiglu(p[s + "mlp"], rms_norm(p[s + "norm2"]["weight"], x)))
    return new

def patch_grid(cfg, x):
    """(rows, cols) of patches of images x [B, H, W, C]: H and W, multiples of the patch size."""
    (H, W), P = x.shape[1:3], cfg.patch_size
    if H % P or W % P:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {P}")
    return H // P, W // P

def patch_embed(p, cfg, x):
    """BottleneckPatchEmbed: a p x p stride-p conv to pca channels, a 1x1 conv to D, as matmuls."""
    (B, P), (rows, cols) = (x.shape[0], cfg.patch_size), patch_grid(cfg, x)
    patches = x.reshape(B, rows, P, cols, P, cfg.in_channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(B, rows * cols, -1)  # [B, N, (row, col, channel)]
    w1 = p["proj1"]["weight"].reshape(-1, cfg.pca_channels)  # HWIO kernel -> [P*P*C, pca]
    w2 = p["proj2"]["weight"].reshape(cfg.pca_channels, -1)
    return matmul(matmul(patches, w1), w2) + p["proj2"]["bias"].astype(x.dtype)

def sincos_pos_embed(cfg, rows, cols):
    """MAE's fixed 2-D embedding of a row-major rows x cols grid: first D/2 channels encode the
    column, last D/2 the row (of each token itself: the grid's shape changes nothing else)."""
    quarter = cfg.hidden_size // 4
    omega = 10000.0 ** (-np.arange(quarter) / quarter)
    rows, cols = np.divmod(np.arange(rows * cols), cols)
    angles = (cols[:, None] * omega, rows[:, None] * omega)  # [N, D/4] each
    return np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], -1).astype(np.float32)

def unpatchify(cfg, tokens, rows, cols):
    B, P, C = tokens.shape[0], cfg.patch_size, cfg.in_channels
    x = tokens.reshape(B, rows, cols, P, P, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, rows * P, cols * P, C)

def aspect_buckets(size, patch, count=5, budget=0.1):
    """The image shapes of multi-aspect training: (height, width) multiples of `patch` nearest
    `count` ratios from 1:2 to 2:1 within `budget` of size^2 pixels (at 32 px, patch 4: 24x44
    (1.83:1), 28x40, 32x32 and transposes): about the same number of tokens each."""
    g = size // patch
    grids = [(r, c) for r in range(1, 2 * g + 1) for c in range(r // 2 + (r % 2), 2 * r + 1)
             if abs(r * c - g * g) <= budget * g * g]
    distance = lambda k: lambda rc: (abs(np.log2(rc[1] / rc[0]) - k), abs(rc[0] * rc[1] - g * g))
    nearest = [min(grids, key=distance(k)) for k in np.linspace(-1, 1, count)]
    return list(dict.fromkeys((r * patch, c * patch) for r, c in nearest))

# --------------------------------------------------------------------------------- MeanFlow student

MF_FEATURES = 256  # sinusoid channels of each scalar input

def mean_flow_apply(params, cfg, x, txt, h, w, dtype=jnp.float32, remat=False):
    """A student's x0 [B, H, W, C] for a jump of length h [B] at guidance w [B] from the noisy
    image x: its two input tokens join the adapted text tokens txt [B, L, D] in the double
    blocks."""
    tokens = mean_flow_tokens(params["mf_embedder"], h, w, dtype)
    return denoise(params, cfg, x, jnp.concatenate([txt, tokens], 1), dtype, remat)

def mean_flow_tokens(p, h, w, dtype=jnp.float32):
    """The student's inputs, jump length h [B] and guidance scale w [B], as two tokens [B, 2, D]:
    each a sinusoid embedding of the scalar through its own two-layer MLP. Frequencies 1 to 100
    radians per unit, not DiT's 1000: the MeanFlow target differentiates the student in h, and a
    fast sinusoid makes that derivative large and rough."""
    freqs = 100.0 ** (np.arange(MF_FEATURES // 2) / (MF_FEATURES // 2 - 1))
    angles = jnp.stack([h, w], 1)[..., None] * freqs  # [B, 2, F/2]
    x = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1).astype(dtype)  # [B, 2, F]
    for name, act in (("fc1", jax.nn.silu), ("fc2", lambda y: y)):  # per token k: its own weights
        w_k, b_k = p[name]["weight"].astype(dtype), p[name]["bias"].astype(dtype)
        x = act(jnp.einsum("bki,kio->bko", x, w_k) + b_k)
    return x

# --------------------------------------------------------------------------------- initialisation

@dataclasses.dataclass(frozen=True)
class Noise:
    """A parameter drawn as `scale` times unit noise (a dataclass is no pytree: a spec's leaf)."""
    shape: tuple
    scale: float

def draw(key, specs, dist):
    """Each spec, a tree of Noise leaves and fixed arrays, with its Noise leaves drawn from `dist`.

    One random kernel per spec, its noise sliced among the leaves: XLA compiles it in a fraction of
    the time of one per tensor (tiny: 3 s against 13-17 s). A spec is a block, so the temporary
    noise is one block's (L/16: 150 MB), not the model's (3.6 GB), if each draw ends before the next
    begins: the barrier makes the next key wait for this draw (left free, XLA's CPU scheduler began
    every draw first and held all their random bits at once)."""
    out = []
    for spec in specs:
        leaves, tree = jax.tree.flatten(spec)
        sizes = [math.prod(x.shape) if isinstance(x, Noise) else 0 for x in leaves]
        key, k = jax.random.split(key)
        noise = jnp.split(dist(k, (sum(sizes),)), np.cumsum(sizes)[:-1])
        leaves = [x.scale * n.reshape(x.shape) if isinstance(x, Noise) else x
                  for x, n in zip(leaves, noise)]
        drawn, key = jax.lax.optimization_barrier((jax.tree.unflatten(tree, leaves), key))
        out.append(drawn)
    return out

def init_mmjit(key, cfg):
    """The original initialisation: PyTorch-default Linear (uniform +-1/sqrt(fan_in), bias too),
    xavier-uniform SwiGLU and patch convs, zero final layer, unit norms, mask_token N(0, 0.02)."""
    D, H, F, Dt = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.mlp_hidden, cfg.txt_dim
    P, C, pca = cfg.patch_size, cfg.in_channels, cfg.pca_channels
    ones = lambda n: {"weight": jnp.ones(n)}
    dense = lambda i, o: {"weight": Noise((i, o), i**-0.5), "bias": Noise((o,), i**-0.5)}
    xavier = lambda shape, fan_in, fan_out: {"weight": Noise(shape, (6 / (fan_in + fan_out))**0.5)}

    def stream(s):
        mlp = {"w1": xavier((D, F), D, F), "w2": xavier((F, D), F, D), "w3": xavier((D, F), D, F)}
        return {s + "norm1": ones(D), s + "qkv": dense(D, 3 * H), s + "attn_proj": dense(H, D),
                s + "norm2": ones(D), s + "mlp": mlp}

    qk_norms = {"q_norm": ones(cfg.head_dim), "k_norm": ones(cfg.head_dim)}
    rest = {"txt_embedder": {"weight": Noise((Dt, D), Dt**-0.5)},
            "img_embedder": {"proj1": xavier((P, P, C, pca), P * P * C, P * P * pca),
                             "proj2": xavier((1, 1, pca, D), pca, D) | {"bias": jnp.zeros(D)}},
            "final_layer": {"norm_final": ones(D), "linear": {"weight": jnp.zeros((D, P * P * C)),
                                                              "bias": jnp.zeros(P * P * C)}}}
    if cfg.mean_flow:  # last layer zero: a new student's tokens are constants, its inputs learnt
        rest["mf_embedder"] = {"fc1": {"weight": Noise((2, MF_FEATURES, D), MF_FEATURES**-0.5),
                                       "bias": jnp.zeros((2, D))},
                               "fc2": {"weight": jnp.zeros((2, D, D)), "bias": jnp.zeros((2, D))}}
    n = cfg.txt_preamble_depth
    blocks = [stream("") | qk_norms] * n + [stream("txt_") | stream("img_") | qk_norms] * cfg.depth
    k_draw, k_mask = jax.random.split(key)  # split or drawn from, never both
    uniform = functools.partial(jax.random.uniform, minval=-1.0, maxval=1.0)
    rest, *blocks = draw(k_draw, [rest] + blocks, uniform)
    return rest | {"txt_preamble_blocks": blocks[:n], "double_blocks": blocks[n:],
                   "mask_token": 0.02 * jax.random.normal(k_mask, (Dt,))}

# ---------------------------------------------------------------------------------- FLAN-T5 encoder

def t5_encode(params, cfg, input_ids, attention_mask, dtype=jnp.float32):
    """Last hidden state [B, L, d_model] of the T5 encoder. Frozen: no gradient flows into it."""
    params = jax.lax.stop_gradient(params)
    enc, (B, L) = params["encoder"], input_ids.shape
    x = params["shared"]["weight"][input_ids].astype(dtype)
    buckets = t5_relative_buckets(L, cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance)
    rel_bias = enc["block"][0]["layer"][0]["SelfAttention"]["relative_attention_bias"]["weight"]
    bias = rel_bias[buckets].transpose(2, 0, 1)[None].astype(dtype)  # [1, H, L, L], for every block
    keep = attention_mask[:, None, None, :].astype(bool)  # padded keys are never attended to
    heads = lambda t: t.reshape(B, L, cfg.num_heads, cfg.d_kv)
    norm = lambda p, x: rms_norm(p["layer_norm"]["weight"], x, cfg.layer_norm_epsilon)
    gelu = functools.partial(jax.nn.gelu, approximate=True)
    for blk in enc["block"]:
        att, ff = blk["layer"]
        a, h = att["SelfAttention"], norm(att, x)
        q, k, v = (heads(linear(a[n], h)) for n in "qkv")
        o = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=keep, scale=1.0)
        x = x + linear(a["o"], o.reshape(B, L, -1))
        d = {n: w["weight"] for n, w in ff["DenseReluDense"].items()}
        x = x + gated_mlp(norm(ff, x), d["wi_0"], d["wi_1"], d["wo"], gelu)
    x = rms_norm(enc["final_layer_norm"]["weight"], x, cfg.layer_norm_epsilon)
    return x.astype(jnp.float32)

def t5_relative_buckets(length, num_buckets, max_distance):
    """T5's bidirectional buckets of key - query offsets: exact near 0, log-spaced further out."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # [Lq, Lk]
    half = num_buckets // 2
    exact = half // 2
    n = np.abs(rel)
    log_ratio = np.log(np.maximum(n, 1) / exact) / math.log(max_distance / exact)
    far = np.minimum(exact + (log_ratio * (half - exact)).astype(np.int32), half - 1)
    return (rel > 0) * half + np.where(n < exact, n, far)

def init_t5(key, cfg):
    """A random T5 encoder with Hugging Face's initialisation scales (tests, the default run)."""
    D, inner, F = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    w = lambda shape, std: {"weight": Noise(shape, std)}
    ln = {"layer_norm": {"weight": jnp.ones(D)}}
    att = {"q": w((D, inner), (D * cfg.d_kv) ** -0.5), "k": w((D, inner), D**-0.5),
           "v": w((D, inner), D**-0.5), "o": w((inner, D), inner**-0.5)}
    ff = {"wi_0": w((D, F), D**-0.5), "wi_1": w((D, F), D**-0.5), "wo": w((F, D), F**-0.5)}
    buckets = w((cfg.relative_attention_num_buckets, cfg.num_heads), D**-0.5)  # block 0's, for all
    blocks = [{"layer": [{"SelfAttention": a} | ln, {"DenseReluDense": ff} | ln]}
              for a in [att | {"relative_attention_bias": buckets}] + [att] * (cfg.num_layers - 1)]
    shared, *blocks = draw(key, [w((cfg.vocab_size, D), 1.0)] + blocks, jax.random.normal)
    return {"shared": shared, "encoder": {"block": blocks, "final_layer_norm": ln["layer_norm"]}}

# ---------------------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """T5's rule: sentencepiece pieces, then </s> (id 1), cut with </s> kept last, padded with 0."""

    def __init__(self, path):
        import sentencepiece

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no sentencepiece model (spiece.model) there")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, prompts, max_length=256):
        ids = np.zeros((len(prompts), max_length), np.int32)
        for row, pieces in zip(ids, self.sp.encode(list(prompts))):
            seq = pieces[: max_length - 1] + [1]
            row[: len(seq)] = seq
        return ids, (ids != 0).astype(np.int32)

    def lengths(self, texts):
        """Tokens of each text with its </s>, before truncation."""
        return np.array([len(pieces) + 1 for pieces in self.sp.encode(list(texts))], np.int64)

    def coverage(self, texts, max_length):
        """How well this tokenizer reads `texts`: their number, the share of pieces that are <unk>
        (words the model cannot tell apart), the share cut at max_length, the median length."""
        pieces = self.sp.encode(list(texts))
        lengths = np.array([len(p) + 1 for p in pieces])
        unknown = sum(p.count(self.sp.unk_id()) for p in pieces) / max(1, sum(map(len, pieces)))
        return {"captions": len(pieces), "unknown": unknown,
                "cut": float(np.mean(lengths > max_length)),
                "median_tokens": float(np.median(lengths))}

# ------------------------------------------------------------------------------------------ weights

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

def read_safetensors(path):
    """{name: array}, memory-mapped: nothing is copied until an array is used."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else size
        if not 2 <= n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, size {size})")
        header = json.loads(f.read(n))
    data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        if end > data.size or end - start != dtype.itemsize * math.prod(info["shape"]):
            raise ValueError(f"{path}: tensor {name} lies outside the file (truncated?)")
        out[name] = data[start:end].view(dtype).reshape(tuple(info["shape"]))
    return out

def safetensors_layout(tensors, metadata=None):
    """The start of a safetensors file of `tensors` (anything with a shape and a dtype), up to the
    data, and where in the file each tensor's data begins, in the order given."""
    header, offset, starts = {"__metadata__": metadata or {}}, 0, {}
    for k, v in tensors.items():
        nbytes = math.prod(v.shape) * np.dtype(v.dtype).itemsize
        header[k] = {"dtype": _NAMES[np.dtype(v.dtype)], "shape": list(v.shape),
                     "data_offsets": [offset, offset + nbytes]}
        starts[k], offset = offset, offset + nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    head = struct.pack("<Q", len(blob)) + blob
    return head, {k: len(head) + start for k, start in starts.items()}

def write_safetensors(path, tensors, metadata=None):
    """Write {name: array} atomically (temporary file, then rename)."""
    tensors = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    with open(path + ".tmp", "wb") as f:
        f.write(safetensors_layout(tensors, metadata)[0])
        for v in tensors.values():
            f.write(v.tobytes())
    os.replace(path + ".tmp", path)

def flatten(tree):
    """Nested dicts, lists, namedtuples -> {"a.0.b": leaf} in jax's leaf order: checkpoint names."""
    part = lambda k: getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
    name = lambda path: ".".join(str(part(k)) for k in path)
    return {name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

def unflatten_like(template, flat, source, put=lambda x, t: jnp.asarray(x, t.dtype)):
    """Arrange flat {name: array} in the structure of `template`, checking every name and shape;
    each array becomes put(array, its template leaf)."""
    expected = flatten(template)
    for k in flat.keys() - expected.keys():
        raise ValueError(f"{source}: unexpected key {k}")
    for k, t in expected.items():
        if k not in flat:
            raise ValueError(f"{source}: missing key {k}")
        if tuple(flat[k].shape) != tuple(t.shape):
            raise ValueError(f"{source}: key {k} has shape {tuple(flat[k].shape)}, "
                             f"expected {tuple(t.shape)}")
    leaves = [put(flat[k], t) for k, t in expected.items()]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)

def load_params(path, like):
    """Parameters saved by write_safetensors(path, flatten(params)), in the structure of `like`."""
    return unflatten_like(like, read_safetensors(path), path)

def read_weights(folder, stem):
    """All tensors of `stem`.safetensors or of the shards named by `stem`.safetensors.index.json."""
    index = os.path.join(folder, stem + ".safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for s in shards for k, v in read_safetensors(os.path.join(folder, s)).items()}
    path = os.path.join(folder, stem + ".safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {stem}.safetensors (nor its .index.json) there")
    return read_safetensors(path)

def read_json(path):
    """A JSON file's contents; a missing one is named in one line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)}")
    with open(path) as f:
        return json.load(f)

_T5_LINEAR = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")  # stored [out, in] by Hugging Face

def load_t5(path):
    """(T5Config, params) from a Hugging Face T5 / FLAN-T5 folder; a decoder there is ignored."""
    hf = read_json(os.path.join(path, "config.json"))
    if hf.get("model_type") != "t5" or hf.get("feed_forward_proj") != "gated-gelu":
        raise ValueError(f"{path}/config.json: expected a gated-gelu T5 (FLAN-T5, T5 v1.1), got "
                         f"model_type={hf.get('model_type')!r} "
                         f"feed_forward_proj={hf.get('feed_forward_proj')!r}")
    cfg = T5Config(**{f.name: hf[f.name] for f in dataclasses.fields(T5Config) if f.name in hf})
    flat = read_weights(path, "model")
    flat = {k: v for k, v in flat.items() if k.startswith(("encoder.", "shared."))}
    if "shared.weight" not in flat and "encoder.embed_tokens.weight" in flat:
        flat["shared.weight"] = flat["encoder.embed_tokens.weight"]
    flat.pop("encoder.embed_tokens.weight", None)
    flat = {k: v.T if k.split(".")[-2] in _T5_LINEAR else v for k, v in flat.items()}
    template = jax.eval_shape(functools.partial(init_t5, cfg=cfg), jax.random.key(0))
    return cfg, unflatten_like(template, flat, os.path.join(path, "model.safetensors"))

def save_t5(path, cfg, params):
    """Write a T5 encoder as a Hugging Face folder (config.json, model.safetensors): load_t5's."""
    os.makedirs(path, exist_ok=True)
    hf = dataclasses.asdict(cfg) | {"model_type": "t5", "feed_forward_proj": "gated-gelu",
                                    "is_gated_act": True, "dense_act_fn": "gelu_new",
                                    "architectures": ["T5EncoderModel"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    flat = {k: v.T if k.split(".")[-2] in _T5_LINEAR else v for k, v in flat.items()}
    write_safetensors(os.path.join(path, "model.safetensors"), flat)

def diffusers_folder(path):
    """(folder, weights stem) of a released model given its `transformer/` folder, that folder's
    parent, or the safetensors file inside it."""
    if os.path.isfile(path):
        return os.path.dirname(path), os.path.basename(path).removesuffix(".safetensors")
    inner = os.path.join(path, "transformer")
    return inner if os.path.isdir(inner) else path, "diffusion_pytorch_model"

# The released Diffusers layout against ours, one table for the importer and the exporter. Config:
# our field names that differ from its keys. Tensors: keys "model.net." + our name; PyTorch's axes
# as a permutation of ours, by rank (Linear [in, out] -> [out, in], conv HWIO -> OIHW); mask_token
# [Dt] -> [1, 1, Dt]; and the port's modules that feed nothing (shapes by D and Dt; 256 sinusoid
# channels), zeros in an export.
DIFFUSERS_CONFIG_NAMES = {"txt_dim": "txt_input_size", "depth": "depth_double"}
DIFFUSERS_PREFIX = "model.net."
TORCH_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}
TORCH_SHAPES = {"mask_token": (1, 1, -1)}
UNUSED_TORCH_MODULES = {"t_embedder.mlp.0.weight": ("D", 256), "t_embedder.mlp.0.bias": ("D",),
                        "t_embedder.mlp.2.weight": ("D", "D"), "t_embedder.mlp.2.bias": ("D",),
                        "pooled_embedder.weight": ("D", "Dt")}

def torch_layout(name, x, back=False):
    """Our array `name` in PyTorch's layout, or (back) PyTorch's in ours."""
    if name in TORCH_SHAPES:
        return x.reshape(-1 if back else TORCH_SHAPES[name])
    axes = TORCH_AXES.get(x.ndim)
    return x if axes is None else x.transpose(np.argsort(axes) if back else axes)

def load_diffusers_mmjit(path):
    """(MMJiTConfig, params) from a released MiniT2I Diffusers `transformer/` folder (or its parent,
    or the safetensors file inside it). That port's timestep and pooled embedders feed nothing."""
    folder, stem = diffusers_folder(path)
    c = {"mean_flow": False} | read_json(os.path.join(folder, "config.json"))  # said by students
    if c.get("txt_hidden_size", c.get("hidden_size")) != c.get("hidden_size"):
        raise ValueError(f"{folder}/config.json: txt_hidden_size {c['txt_hidden_size']} != "
                         "hidden_size")
    fields = [f.name for f in dataclasses.fields(MMJiTConfig)]
    try:
        cfg = MMJiTConfig(**{k: c[DIFFUSERS_CONFIG_NAMES.get(k, k)] for k in fields})
    except KeyError as e:
        raise ValueError(f"{folder}/config.json: missing key {e.args[0]}") from None
    unused = tuple({k.split(".")[0] + "." for k in UNUSED_TORCH_MODULES})
    flat = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in read_weights(folder, stem).items()}
    flat = {k: torch_layout(k, v, back=True) for k, v in flat.items() if not k.startswith(unused)}
    template = jax.eval_shape(functools.partial(init_mmjit, cfg=cfg), jax.random.key(0))
    return cfg, unflatten_like(template, flat, os.path.join(folder, stem + ".safetensors"))

def save_diffusers_mmjit(path, cfg, params, prompt_length, extra_config=None):
    """Write params as a released-layout folder, path/transformer/{config.json,
    diffusion_pytorch_model.safetensors}, that load_diffusers_mmjit and the PyTorch port read.
    extra_config: more config keys (the run's text encoder)."""
    folder = os.path.join(path, "transformer")
    os.makedirs(folder, exist_ok=True)
    names = DIFFUSERS_CONFIG_NAMES
    config = {names.get(k, k): v for k, v in dataclasses.asdict(cfg).items()
              if k != "mean_flow" or v}  # said by students only: released configs unchanged
    config |= {"txt_hidden_size": cfg.hidden_size, "prompt_length": prompt_length}
    config |= extra_config or {}
    dims = {"D": cfg.hidden_size, "Dt": cfg.txt_dim}
    flat = {k: torch_layout(k, np.asarray(v, np.float32)) for k, v in flatten(params).items()}
    flat |= {k: np.zeros([dims.get(d, d) for d in shape], np.float32)
             for k, shape in UNUSED_TORCH_MODULES.items()}
    write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                      {DIFFUSERS_PREFIX + k: v for k, v in sorted(flat.items())})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
