"""Attention biases: HF LLaMA ``attention_bias=True`` (q, k, v, o) and Qwen2 (q, k, v): config, params, HF parity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import TINY_HF_KWARGS, _randomize_torch, hf_llama_config, random_llama

from mojax.models import LlamaForCausalLM, ModelConfig
from mojax.models.hf import load_causal_lm, save_pretrained
from mojax.models.llama import BIAS_LOGICAL_AXES, LOGICAL_AXES

ATOL = 1e-5
_fwd = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask)[0])
_step = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))


def _qwen2_config(**overrides):
    """A tiny `transformers.Qwen2Config` (no head_dim field: hidden_size / heads = 8)."""
    from transformers import Qwen2Config

    kw = {k: v for k, v in TINY_HF_KWARGS.items() if k != "head_dim"}
    kw.update(use_sliding_window=False, sliding_window=64, max_window_layers=1, **overrides)
    return Qwen2Config(**kw)


def _save_torch(model, path, seed):
    _randomize_torch(model.eval(), seed)
    model.save_pretrained(os.fspath(path))
    return model


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_biased(torch, tmp_path_factory):
    """name -> (folder, torch model): a LLaMA with attention_bias=True and a Qwen2."""
    from transformers import LlamaForCausalLM as TorchLlama
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    llama_dir, qwen_dir = tmp_path_factory.mktemp("llama_bias"), tmp_path_factory.mktemp("qwen2")
    return {
        "llama_bias": (llama_dir, _save_torch(TorchLlama(hf_llama_config(attention_bias=True)), llama_dir, 1)),
        "qwen2": (qwen_dir, _save_torch(Qwen2ForCausalLM(_qwen2_config()), qwen_dir, 2)),
    }


def _batch(seed, B=3, T=9, pad_left=(0, 2, 5)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 128, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b, n in enumerate(pad_left):
        ids[b, :n], mask[b, :n] = 0, 0
    return ids, mask


def _torch_logits(torch, model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("name", ["llama_bias", "qwen2"])
def test_biased_logits_match_torch(torch, hf_biased, name):
    path, tm = hf_biased[name]
    model = load_causal_lm(path)
    attn = model.model.layers.self_attn
    assert hasattr(attn.q_proj, "bias") and hasattr(attn.o_proj, "bias") == (name == "llama_bias")
    assert float(jnp.abs(attn.k_proj.bias[...]).max()) > 0  # the random biases were read
    ids, mask = _batch(seed=len(name))
    real = mask.astype(bool)
    got = np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.max(np.abs(got[real] - _torch_logits(torch, tm, ids, mask)[real])) < ATOL


@pytest.mark.parity
def test_biased_cache_decode_matches_the_full_forward(hf_biased):
    model = load_causal_lm(hf_biased["qwen2"][0])
    ids, mask = _batch(seed=3, B=2, T=8, pad_left=(0, 3))
    full = np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))
    cache = model.init_cache(2, 8)
    outs, _ = [], None
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8)):
        logits, cache = _step(model, jnp.asarray(ids[:, start:stop]), jnp.asarray(mask[:, start:stop]), cache)
        outs.append(np.asarray(logits))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(outs, 1)[real], full[real], atol=2e-5)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["llama_bias", "qwen2"])
def test_biased_export_round_trips_through_transformers(torch, hf_biased, name, tmp_path):
    from transformers import AutoModelForCausalLM

    path, tm = hf_biased[name]
    model = load_causal_lm(path)
    save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == ("qwen2" if name == "qwen2" else "llama")
    assert saved["architectures"] == ["Qwen2ForCausalLM" if name == "qwen2" else "LlamaForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == type(tm).__name__
    ids, mask = _batch(seed=4)
    np.testing.assert_allclose(
        _torch_logits(torch, reloaded, ids, mask), _torch_logits(torch, tm, ids, mask), atol=1e-6
    )
    again = load_causal_lm(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "config, biased",
    [
        (ModelConfig.tiny(attention_bias=True), ("q_proj", "k_proj", "v_proj", "o_proj")),
        (ModelConfig.tiny(model_type="qwen2"), ("q_proj", "k_proj", "v_proj")),
        (ModelConfig.tiny(), ()),
    ],
)
def test_bias_parameters_shapes_axes_and_count(config, biased):
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    flat = {".".join(map(str, k)): tuple(v.get_value()) for k, v in nnx.to_flat_state(specs)}
    expected_biases = {f"model.layers.self_attn.{p}.bias" for p in biased}
    assert flat == {**LOGICAL_AXES, **{k: BIAS_LOGICAL_AXES[k] for k in expected_biases}}
    assert abstract.model.layers.self_attn.k_proj.kernel.shape == (2, 64, 2, 16)
    if "k_proj" in biased:
        assert abstract.model.layers.self_attn.k_proj.bias.shape == (2, 2, 16)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == config.num_params()


def test_real_init_biases_are_zero():
    model = LlamaForCausalLM(ModelConfig.tiny(num_hidden_layers=1, attention_bias=True), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(model.model.layers.self_attn.o_proj.bias[...], 0.0)


def test_a_value_bias_adds_a_constant_to_the_attention_output():
    """Softmax weights sum to 1, so a v bias b adds exactly o_proj(b) to every attention output: the same
    logits as folding W_o b into an o_proj bias (a numpy identity, no HF needed)."""
    model = random_llama(ModelConfig.tiny(num_hidden_layers=1, attention_bias=True), seed=1)
    attn = model.model.layers.self_attn
    v_bias, w_o = np.asarray(attn.v_proj.bias[...]), np.asarray(attn.o_proj.kernel[...])  # [1, KV, hd], [1, H, hd, D]
    heads_per_kv = w_o.shape[1] // v_bias.shape[1]
    folded = np.einsum("nh,nhd->d", np.repeat(v_bias[0], heads_per_kv, axis=0), w_o[0])
    ids, mask = _batch(seed=5, pad_left=(0, 0, 0))
    ids, mask = jnp.asarray(ids) % 256, jnp.asarray(mask)
    before = _fwd(model, ids, mask)
    attn.v_proj.bias[...] = jnp.zeros_like(attn.v_proj.bias[...])
    attn.o_proj.bias[...] = attn.o_proj.bias[...] + folded[None]
    np.testing.assert_allclose(_fwd(model, ids, mask), before, atol=2e-5)


def test_config_families_from_hf_and_back():
    qwen = {**ModelConfig.tiny().to_hf_dict(), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    for key in ("attention_bias", "mlp_bias"):
        qwen.pop(key)
    qwen.update(
        use_sliding_window=False,
        sliding_window=131072,
        max_window_layers=28,
        use_mrope=False,
        layer_types=["full_attention"] * 2,
    )
    config = ModelConfig.from_hf(qwen)
    assert config.model_type == "qwen2" and config.qkv_bias and not config.o_bias and not config.attention_bias
    assert ModelConfig.from_hf(config.to_hf_dict()) == config
    llama = ModelConfig.from_hf({**ModelConfig.tiny().to_hf_dict(), "attention_bias": True})
    assert llama.qkv_bias and llama.o_bias and llama.to_hf_dict()["attention_bias"] is True


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(use_sliding_window=True), "use_sliding_window=True"),
        (dict(use_mrope=True), "use_mrope=True"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ],
)
def test_qwen2_sliding_window_is_rejected(changes, match):
    qwen = {**ModelConfig.tiny(model_type="qwen2").to_hf_dict(), **changes}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(qwen)


def test_bad_family_settings_are_rejected():
    with pytest.raises(ValueError, match="attention_bias must be False for qwen2"):
        ModelConfig.tiny(model_type="qwen2", attention_bias=True)
    with pytest.raises(ValueError, match="model_type must be one of"):
        ModelConfig.tiny(model_type="mistral")
    with pytest.raises(ValueError, match="unknown field sliding_window"):  # LLaMA has no sliding window
        ModelConfig.from_hf({**ModelConfig.tiny().to_hf_dict(), "sliding_window": 64})
