"""benchmarks/model_real.py without the SmolLM2 file: its attention piece computes the same attention and gradients
on both sides, and its FLOP count is attention's two contractions, forward and backward."""

import re
from pathlib import Path

import numpy as np
import pytest
from script_module import load_script

from mojax.models.config import ModelConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_real.py"
torch = pytest.importorskip("torch")


def _load():
    return load_script(SCRIPT, "model_real_benchmark")


def test_attention_piece_gives_the_same_outputs_and_gradients_on_both_sides():
    module = _load()
    config = ModelConfig.tiny(num_hidden_layers=3)
    assert config.num_attention_heads > config.num_key_value_heads  # grouped-query attention, as SmolLM2
    ours, theirs = module.attention_pieces(config, batch=2, length=64)  # 4 query blocks of 16
    (piece,) = ours
    assert piece == module.ATTENTION_PIECE and set(theirs) == {piece}
    mine, torchs = ours[piece](), theirs[piece]()
    assert len(mine) == len(torchs) == config.num_hidden_layers
    (out, (dq, dk, dv)), (out_t, (dq_t, dk_t, dv_t)) = mine[0], torchs[0]
    heads_last = lambda a: a.detach().transpose(1, 2).numpy()  # noqa: E731  torch's [B, H, T, hd] -> [B, T, H, hd]
    np.testing.assert_allclose(np.asarray(out), heads_last(out_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dq), heads_last(dq_t), rtol=1e-4, atol=1e-5)
    for grad, grad_t in ((dk, dk_t), (dv, dv_t)):
        np.testing.assert_allclose(np.asarray(grad), grad_t.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(dk)).max() > 0 and np.abs(np.asarray(dv)).max() > 0


def test_attention_piece_flops_are_both_contractions_forward_and_backward():
    module = _load()
    config = ModelConfig.tiny(num_hidden_layers=3)
    batch, length = 2, 7
    tokens, q_width = batch * length, config.num_attention_heads * config.head_dim
    per_token_forward = config.num_hidden_layers * 2 * (2 * q_width * length)  # QK^T and PV, 2 FLOPs per multiply-add
    assert module.piece_flops(config, batch, length)[module.ATTENTION_PIECE] == 3 * tokens * per_token_forward


def test_the_whole_attention_variant_traces_attention_over_all_keys():
    """``with_whole_attention`` swaps the layers' blocked causal attention for one contraction over all 64 keys."""
    import jax
    import jax.numpy as jnp

    from mojax.models import llama

    module = _load()
    q = jnp.ones((2, 64, 4, 8))
    k = v = jnp.ones((2, 2, 64, 8))
    mask = jnp.tril(jnp.ones((64, 64), bool))[None].repeat(2, 0)

    def key_extents(fn):
        text = jax.jit(fn).lower(q, k, v).compile().as_text()
        return {int(m) for m in re.findall(r"= f32\[2,2,\d+,(\d+)\]\{[\d,]*\} dot\(", text)}

    blocked = lambda q, k, v: llama.causal_attention(q, k, v, mask)  # noqa: E731
    assert key_extents(blocked) == {8, 16, 32, 48, 64}  # 4 query blocks; 8 is the outputs' head_dim
    assert key_extents(module.with_whole_attention(blocked)) == {8, 64}
    assert llama.causal_attention is not llama.attention  # put back after tracing


def test_the_layer_loop_variant_computes_the_scan_steps_loss_and_gradients():
    """``dots+layer-loop`` runs the layers over weights held apart per layer: the same loss and gradients as the
    layer scan, and no gradient for the emptied stacked arrays."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mojax.models.llama import LlamaForCausalLM

    module = _load()
    model = LlamaForCausalLM(ModelConfig.tiny(num_hidden_layers=3), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 16)), jnp.int32)
    hidden = jnp.zeros((2, 16, model.config.hidden_size))
    steps = module.mojax_pieces(model, ids, hidden, hidden, ["dots", "dots+layer-loop"])["forward+backward"]
    loss, grads = steps["mojax dots"]()
    loop_loss, (rest_grads, layer_grads) = steps["mojax dots+layer-loop"]()
    assert len(layer_grads) == 3
    np.testing.assert_allclose(float(loop_loss), float(loss), rtol=1e-6)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layer_grads)
    layers = grads["model"]["layers"]
    for mine, scanned in [
        (stacked.gate_proj.kernel, layers["mlp"]["gate_proj"]["kernel"]),
        (stacked.q_proj.kernel, layers["self_attn"]["q_proj"]["kernel"]),
        (stacked.input_layernorm, layers["input_layernorm"]["scale"]),
    ]:
        assert np.abs(np.asarray(scanned[...])).max() > 0
        np.testing.assert_allclose(np.asarray(mine), np.asarray(scanned[...]), rtol=1e-5, atol=1e-7)
    embedding = lambda g: np.asarray(g["model"]["embed_tokens"]["embedding"][...])  # noqa: E731
    np.testing.assert_allclose(embedding(rest_grads), embedding(grads), rtol=1e-5, atol=1e-7)
    assert rest_grads["model"]["layers"]["mlp"]["gate_proj"]["kernel"][...].shape == (0,)


def test_the_head_op_variant_computes_the_dots_steps_loss_and_gradients():
    """``dots+head-op`` (the LM head and cross-entropy through the trainers' op) and the head+CE piece's second
    contender give the plain cross-entropy's loss and gradients."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mojax.models.llama import LlamaForCausalLM

    module = _load()
    model = LlamaForCausalLM(ModelConfig.tiny(num_hidden_layers=2), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(3, 256, (2, 16)), jnp.int32)
    hidden = jnp.asarray(rng.normal(size=(2, 16, model.config.hidden_size)), jnp.float32)
    pieces = module.mojax_pieces(model, ids, hidden, hidden, ["dots", "dots+head-op"])
    for piece, (plain, head_op) in [
        ("forward+backward", ("mojax dots", "mojax dots+head-op")),
        ("head+CE forward+backward", ("mojax", "mojax head-op")),
    ]:
        (loss, grads), (op_loss, op_grads) = pieces[piece][plain](), pieces[piece][head_op]()
        np.testing.assert_allclose(float(op_loss), float(loss), rtol=1e-6)
        leaves, op_leaves = jax.tree.leaves(grads), jax.tree.leaves(op_grads)
        assert len(leaves) == len(op_leaves) and any(np.abs(np.asarray(g)).max() > 0 for g in leaves)
        for g, op_g in zip(leaves, op_leaves, strict=True):
            np.testing.assert_allclose(np.asarray(op_g), np.asarray(g), rtol=1e-4, atol=1e-6)
