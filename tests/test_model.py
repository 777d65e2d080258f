"""model.py against the reference implementations' golden outputs, plus the weight I/O and its errors."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import model
from conftest import FIXTURES

MMJIT = os.path.join(FIXTURES, "mmjit_tiny")
T5 = os.path.join(FIXTURES, "t5_tiny")


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def mmjit():
    return model.load_diffusers_mmjit(MMJIT)


def test_mmjit_matches_reference(mmjit):
    cfg, params = mmjit
    io = np.load(os.path.join(MMJIT, "io.npz"))
    # The reference's x_pred is the network evaluated on the clean image `img` (checked: at x_t it differs by
    # O(1)); the last row has an all-zero mask, so the mask_token path is covered too.
    out = jax.jit(model.mmjit_apply, static_argnums=1)(params, cfg, io["img"], io["context"], io["mask"])
    np.testing.assert_allclose(out, io["x_pred"], atol=1e-4, rtol=0)


def test_bfloat16_close_to_float32(mmjit):
    cfg, params = mmjit
    io = np.load(os.path.join(MMJIT, "io.npz"))
    apply = jax.jit(model.mmjit_apply, static_argnums=(1, 5))
    ref = apply(params, cfg, io["img"], io["context"], io["mask"], jnp.float32)
    out = apply(params, cfg, io["img"], io["context"], io["mask"], jnp.bfloat16)
    assert out.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (0.4% per rounding); over 4 blocks the error stays near 0.5% RMS (measured
    # 0.55%). 2% RMS and 0.05 absolute (the output spans about +-2) leave room without hiding a real bug.
    rel_rms = float(jnp.sqrt(jnp.mean((out - ref) ** 2) / jnp.mean(ref**2)))
    assert rel_rms < 0.02 and float(jnp.abs(out - ref).max()) < 0.05, rel_rms


def test_remat_changes_nothing(mmjit):
    cfg, params = mmjit
    io = np.load(os.path.join(MMJIT, "io.npz"))

    def loss(p, remat):
        return jnp.mean(model.mmjit_apply(p, cfg, io["x_t"], io["context"], io["mask"], remat=remat) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g0, g1 = grad(params, False), grad(params, True)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("platform, dtype, head_dim, expected", [
    ("cuda", jnp.bfloat16, 64, "cudnn"), ("cuda", jnp.float16, 52, "cudnn"), ("cuda", jnp.bfloat16, 128, "cudnn"),
    ("cuda", jnp.float32, 64, "xla"), ("cuda", jnp.bfloat16, 136, "xla"), ("rocm", jnp.bfloat16, 64, "xla"),
    ("cpu", jnp.bfloat16, 64, "xla"), ("cpu", jnp.float32, 52, "xla"), ("tpu", jnp.bfloat16, 64, "xla"),
])
def test_attention_implementation(platform, dtype, head_dim, expected):
    assert model.attention_implementation(platform, dtype, head_dim) == expected


@pytest.mark.parametrize("head_dim", [52, 13, 64])
def test_padded_attention_is_exact(head_dim):
    """Zero channels up to a multiple of 8 (cuDNN's rule) change nothing, through XLA's path in float32; on
    this CPU, attention() is XLA's own call, bit for bit."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 7, 3, head_dim)) for i in range(3))
    scale = head_dim**-0.5
    ref = jax.nn.dot_product_attention(q, k, v, scale=scale)
    # The same sums with a few zero terms more: float32 rounding of order-1 outputs, well under 1e-6.
    np.testing.assert_allclose(model.padded_attention(q, k, v, scale, "xla"), ref, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(model.attention(q, k, v, scale), ref)


def test_t5_matches_reference():
    cfg, params = model.load_t5(T5)
    io = np.load(os.path.join(T5, "io.npz"))
    out = jax.jit(model.t5_encode, static_argnums=1)(params, cfg, io["input_ids"], io["attention_mask"])
    np.testing.assert_allclose(out, io["last_hidden_state"], atol=1e-4, rtol=0)


def test_t5_is_frozen():
    cfg = model.T5Config(vocab_size=50, d_model=16, d_kv=8, num_heads=3, d_ff=24, num_layers=2)
    params = model.init_t5(jax.random.key(0), cfg)
    ids = jnp.ones((2, 5), jnp.int32)
    grads = jax.jit(jax.grad(lambda p: model.t5_encode(p, cfg, ids, jnp.ones_like(ids)).sum()))(params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_t5_other_shapes_and_long_text():
    """d_kv x heads != d_model, text past max_distance; padding must not change the real tokens' features."""
    cfg = model.T5Config(vocab_size=50, d_model=24, d_kv=10, num_heads=3, d_ff=40, num_layers=2)
    params = model.init_t5(jax.random.key(1), cfg)
    ids = jax.random.randint(jax.random.key(2), (1, 300), 2, 50)
    encode = jax.jit(model.t5_encode, static_argnums=1)
    full = encode(params, cfg, ids, jnp.ones_like(ids))
    padded_ids = jnp.concatenate([ids, jnp.zeros((1, 20), jnp.int32)], 1)
    padded = encode(params, cfg, padded_ids, (padded_ids != 0).astype(jnp.int32))
    assert full.shape == (1, 300, 24) and bool(jnp.isfinite(full).all())
    np.testing.assert_allclose(padded[:, :300], full, atol=1e-5)


def test_save_t5_round_trip(tmp_path):
    cfg, params = model.load_t5(T5)
    model.save_t5(str(tmp_path), cfg, params)
    cfg2, params2 = model.load_t5(str(tmp_path))
    assert cfg2 == cfg
    on_disk = model.read_safetensors(str(tmp_path / "model.safetensors"))
    ref = model.read_safetensors(os.path.join(T5, "model.safetensors"))
    for k, v in on_disk.items():  # Hugging Face's own layout, so other tools read it too
        np.testing.assert_array_equal(v, ref[k])


def test_relative_buckets():
    b = model.t5_relative_buckets(400, 32, 128)
    assert b[10, 10] == 0 and b[10, 11] == 17 and b[11, 10] == 1  # keys after the query use the upper half
    assert b[0, 7] == 16 + 7 and b[0, 8] > 16 + 7  # exact below num_buckets/4, log-spaced beyond
    assert b[0].max() == 31 and b[:, 0].max() == 15 and b[0, 399] == b[0, 128] == 31  # clamped past max_distance
    assert (np.diff(b[0, 1:]) >= 0).all()


def test_tokenizer_matches_reference():
    with open(os.path.join(FIXTURES, "tokenizer_tiny", "tokens.json")) as f:
        ref = json.load(f)
    tok = model.Tokenizer(os.path.join(FIXTURES, "tokenizer_tiny", "spiece.model"))
    ids, mask = tok.encode(ref["prompts"], max_length=ref["max_length"])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_preset_parameter_counts():
    with open(os.path.join(FIXTURES, "param_counts.json")) as f:
        expected = json.load(f)
    for name, count in expected.items():
        cfg = model.PRESETS[name]
        shapes = jax.eval_shape(lambda k: model.init_mmjit(k, cfg), jax.random.key(0))
        total = sum(x.size for x in jax.tree.leaves(shapes))
        # The reference's published counts leave out the Dt x D txt_embedder projection (the difference is
        # exactly txt_dim * hidden_size for all three presets); every other tensor is counted.
        assert total - cfg.txt_dim * cfg.hidden_size == count, name


def test_init_matches_checkpoint_layout(mmjit):
    cfg, loaded = mmjit
    fresh = model.init_mmjit(jax.random.key(0), cfg)
    assert jax.tree.structure(fresh) == jax.tree.structure(loaded)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(loaded)))
    flat = {k: np.asarray(v) for k, v in model.flatten(fresh).items()}
    assert not flat["final_layer.linear.weight"].any() and not flat["final_layer.linear.bias"].any()
    assert (flat["double_blocks.1.k_norm.weight"] == 1).all() and (flat["txt_preamble_blocks.0.norm2.weight"] == 1).all()
    D, F = cfg.hidden_size, cfg.mlp_hidden
    for key, bound in (("double_blocks.1.img_qkv.weight", D**-0.5), ("double_blocks.1.img_qkv.bias", D**-0.5),
                       ("double_blocks.0.txt_mlp.w2.weight", (6 / (D + F)) ** 0.5), ("txt_embedder.weight", cfg.txt_dim**-0.5)):
        # uniform(-bound, bound): the extremes come within 5% of the bound, the std near bound / sqrt(3)
        v = flat[key]
        assert 0.95 * bound < np.abs(v).max() <= bound and abs(v.std() * 3**0.5 / bound - 1) < 0.15, key
    assert 0.01 < flat["mask_token"].std() < 0.03  # N(0, 0.02) over 16 values
    assert len({float(flat[k].ravel()[0]) for k in ("double_blocks.0.img_qkv.weight", "double_blocks.1.img_qkv.weight")}) == 2


def test_safetensors_round_trip(tmp_path):
    tensors = {
        "a.weight": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
        "b": np.arange(6, dtype=np.float16).reshape(2, 3),
        "c": np.array([1.5, -2.25, 3e-3], dtype=ml_dtypes.bfloat16),
        "scalar": np.array(7, dtype=np.int32),
    }
    path = str(tmp_path / "x.safetensors")
    model.write_safetensors(path, tensors, metadata={"step": "3"})
    back = model.read_safetensors(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    assert isinstance(back["a.weight"].base, np.memmap)  # memory-mapped, not read into RAM
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"] == {"step": "3"}


def test_truncated_safetensors_is_an_error(tmp_path):
    src = os.path.join(MMJIT, "diffusion_pytorch_model.safetensors")
    path = tmp_path / "cut.safetensors"
    path.write_bytes(open(src, "rb").read()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        model.read_safetensors(str(path))
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        model.read_safetensors(str(path))


def _edited_mmjit(tmp_path, edit):
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(os.path.join(MMJIT, "config.json"), folder)
    flat = dict(model.read_safetensors(os.path.join(MMJIT, "diffusion_pytorch_model.safetensors")))
    edit(flat)
    model.write_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), flat)
    return str(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.pop("model.net.double_blocks.1.txt_qkv.bias"), "missing key double_blocks.1.txt_qkv.bias"),
    (lambda f: f.update({"model.net.extra.weight": np.zeros(3, np.float32)}), "unexpected key extra.weight"),
    (lambda f: f.update({"model.net.txt_embedder.weight": np.zeros((64, 17), np.float32)}),
     r"key txt_embedder.weight has shape \(17, 64\), expected \(16, 64\)"),
])
def test_mmjit_loader_errors(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        model.load_diffusers_mmjit(_edited_mmjit(tmp_path, edit))


def test_mmjit_loader_accepts_file_and_bf16(tmp_path, mmjit):
    cfg, params = mmjit

    def to_bf16(flat):
        flat.update({k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()})

    root = _edited_mmjit(tmp_path, to_bf16)
    cfg2, params2 = model.load_diffusers_mmjit(os.path.join(root, "transformer", "diffusion_pytorch_model.safetensors"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=2**-8, atol=1e-30)


def test_t5_loader_sharded_and_errors(tmp_path):
    """The sharded index layout of the large T5s, a tied-embedding name, and a folder that is not a T5."""
    flat = dict(model.read_safetensors(os.path.join(T5, "model.safetensors")))
    flat["encoder.embed_tokens.weight"] = flat.pop("shared.weight")
    flat["decoder.final_layer_norm.weight"] = np.ones(32, np.float32)  # full T5 checkpoints carry a decoder
    names = sorted(flat)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        model.write_safetensors(str(tmp_path / shard), {k: flat[k] for k in keys})
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(os.path.join(T5, "config.json"), tmp_path)
    cfg, params = model.load_t5(str(tmp_path))
    io = np.load(os.path.join(T5, "io.npz"))
    out = model.t5_encode(params, cfg, io["input_ids"], io["attention_mask"])
    np.testing.assert_allclose(out, io["last_hidden_state"], atol=1e-4, rtol=0)

    del flat["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    for shard, keys in shards.items():
        model.write_safetensors(str(tmp_path / shard), {k: flat[k] for k in keys if k in flat})
    with pytest.raises(ValueError, match="missing key encoder.block.1.layer.1.DenseReluDense.wo.weight"):
        model.load_t5(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="expected a gated-gelu T5"):
        model.load_t5(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model.load_t5(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("rows, cols", [(3, 7), (7, 3), (5, 5)])
def test_positions_depend_on_a_tokens_row_and_column_only(mmjit, rows, cols):
    """Token (r, c) of a rows x cols grid gets the RoPE angles and sin-cos embedding of (r, c) in a square grid."""
    cfg, _ = mmjit
    n = max(rows, cols)
    same_cell = (np.arange(rows)[:, None] * n + np.arange(cols)).ravel()  # row-major (r, c) in the n x n grid
    np.testing.assert_array_equal(model.rope_angles_2d(rows, cols, 16), model.rope_angles_2d(n, n, 16)[same_cell])
    np.testing.assert_array_equal(model.sincos_pos_embed(cfg, rows, cols), model.sincos_pos_embed(cfg, n, n)[same_cell])


def test_non_square_input_and_a_bad_size(mmjit):
    cfg, params = mmjit
    io = np.load(os.path.join(MMJIT, "io.npz"))
    wide = np.concatenate([io["img"], io["img"][:, :, :16]], axis=2)  # [B, 32, 48, 3]
    out = jax.jit(model.mmjit_apply, static_argnums=1)(params, cfg, wide, io["context"], io["mask"])
    assert out.shape == wide.shape and bool(jnp.isfinite(out).all())
    with pytest.raises(ValueError, match=f"32x30 is not a multiple of the patch size {cfg.patch_size}"):
        model.mmjit_apply(params, cfg, wide[:, :, :30], io["context"], io["mask"])


def test_transposed_input_gives_transposed_output():
    """Transposing an image swaps each token's row and column. The sin-cos embedding (column first) then swaps
    its two halves of D, 2-D RoPE (row first) the two quarters of each half of a head, and each patch its own
    rows and columns. So the network is transpose-equivariant exactly when its weights commute with those
    swaps, and with a text whose RoPE angles are 0 (one token): generic weights do not (checked last), these
    (random ones averaged with their swapped copies) do by construction."""
    cfg = model.MMJiTConfig(patch_size=2, txt_dim=20, hidden_size=32, depth=2, txt_preamble_depth=1, num_heads=2,
                            head_dim=8, pca_channels=6)  # every dimension its own size: 32, 48, 16, 8, 88, 12
    D, Dh, H, P = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.patch_size
    q = Dh // 4
    in_head = np.concatenate([np.arange(q, 2 * q), np.arange(q), np.arange(3 * q, 4 * q), np.arange(2 * q, 3 * q)])
    heads = (np.arange(3 * H)[:, None] * Dh + in_head).ravel()  # q, k and v of every head
    swaps = {D: np.roll(np.arange(D), D // 2), 3 * H * Dh: heads, H * Dh: heads[:H * Dh], Dh: in_head,
             P * P * 3: np.arange(P * P * 3).reshape(P, P, 3).transpose(1, 0, 2).ravel()}

    def swapped(name, w):
        if name == "img_embedder.proj1.weight":  # a [P, P, 3, pca] kernel: its own transpose
            return w.transpose(1, 0, 2, 3)
        return w[np.ix_(*[swaps.get(n, np.arange(n)) for n in w.shape])]

    rng = np.random.default_rng(0)
    like = jax.eval_shape(functools.partial(model.init_mmjit, cfg=cfg), jax.random.key(0))
    generic = {k: (1 + 0.1 * rng.standard_normal(t.shape) if t.ndim == 1 else rng.standard_normal(t.shape)
                   / np.sqrt(np.prod(t.shape[:-1]))).astype(np.float32) for k, t in model.flatten(like).items()}
    symmetric = {k: (w + swapped(k, w)) / 2 for k, w in generic.items()}
    x = rng.standard_normal((2, 6, 10, 3)).astype(np.float32)  # a 3 x 5 grid of patches
    context, mask = rng.standard_normal((2, 1, cfg.txt_dim)).astype(np.float32), np.ones((2, 1), np.int32)
    apply = jax.jit(model.mmjit_apply, static_argnums=1)
    for weights, equivariant in ((symmetric, True), (generic, False)):
        params = model.unflatten_like(like, weights, "test")
        out = apply(params, cfg, x, context, mask)
        out_t = apply(params, cfg, x.transpose(0, 2, 1, 3), context, mask)
        gap = float(jnp.abs(out_t - out.transpose(0, 2, 1, 3)).max())
        # float32 sums in another order: 1e-6 of outputs near 1; generic weights miss by O(1)
        assert gap < 1e-5 if equivariant else gap > 0.1, gap
