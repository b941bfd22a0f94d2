"""HF interop: parity with transformers' torch LLaMA, sharded load, export round trip, errors.

Torch-backed tests are marked ``parity`` and skip cleanly without torch. Every HF model is a tiny
random config saved locally to ``tmp_path``; nothing touches the hub.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import LLAMA3_ROPE, save_hf_causal_lm, save_hf_reward_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mojax.models.hf import load_causal_lm, load_reward_model, load_value_model, save_pretrained

ATOL = 1e-5

_fwd = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask)[0])
_step = nnx.jit(lambda m, ids, mask, cache: m(ids, attention_mask=mask, cache=cache))

VARIANTS = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_llama3": dict(num_key_value_heads=1, rope_parameters=LLAMA3_ROPE, max_position_embeddings=512),
}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_lms(torch, tmp_path_factory):
    """name -> (folder, torch LlamaForCausalLM)."""
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        d = tmp_path_factory.mktemp(name)
        out[name] = (d, save_hf_causal_lm(d, seed=i, **kw))
    d = tmp_path_factory.mktemp("sharded")
    out["sharded"] = (d, save_hf_causal_lm(d, seed=7, max_shard_size="20KB"))
    return out


@pytest.fixture(scope="module")
def hf_rm(torch, tmp_path_factory):
    d = tmp_path_factory.mktemp("reward")
    return d, save_hf_reward_model(d, seed=3, num_labels=2)


def _batch(seed=0, B=3, T=10, pad_left=(0, 3, 6), vocab=128):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b, n in enumerate(pad_left):
        ids[b, :n] = 0
        mask[b, :n] = 0
    return ids, mask


def _torch_logits(torch, model, ids, mask=None, **kw):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(mask),
            **kw,
        )
    return out.logits.float().numpy()


@pytest.mark.parity
@pytest.mark.parametrize("name", [*VARIANTS, "sharded"])
def test_causal_lm_logits_match_torch(torch, hf_lms, name):
    path, tm = hf_lms[name]
    if name == "sharded":
        assert os.path.exists(path / "model.safetensors.index.json")
        assert len(list(path.glob("model-*.safetensors"))) > 1
    model = load_causal_lm(path)
    ids, mask = _batch(seed=len(name))
    ref = _torch_logits(torch, tm, ids, mask)
    got = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    assert np.max(np.abs(np.asarray(got)[real] - ref[real])) < ATOL
    # row 0 has no padding: equals HF without any mask
    ref_full = _torch_logits(torch, tm, ids[:1])
    assert np.max(np.abs(np.asarray(got[0]) - ref_full[0])) < ATOL


@pytest.mark.parity
def test_rope_inv_freq_equals_hf(torch, hf_lms):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mojax.models.config import ModelConfig
    from mojax.models.llama import rope_inv_freq

    tm = hf_lms["mqa_llama3"][1]
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](tm.config, "cpu")
    ours = rope_inv_freq(ModelConfig.from_hf(tm.config))
    np.testing.assert_array_equal(ours, ref.numpy())
    # the test config exercises all three llama3 bands (kept, smoothed, divided by factor)
    plain = 1.0 / 500000.0 ** (np.arange(0, 8, 2) / 8)
    ratio = ours / plain
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / 8).any()
    assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()


@pytest.mark.parity
def test_cache_decode_matches_torch(torch, hf_lms):
    path, tm = hf_lms["gqa_untied"]
    model = load_causal_lm(path)
    ids, mask = _batch(seed=11, B=2, T=9, pad_left=(0, 2))
    # HF reference for left-padded rows with explicit positions cumsum(mask) - 1
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = _torch_logits(torch, tm, ids, mask, position_ids=torch.tensor(pos, dtype=torch.long))
    cache = model.init_cache(2, 12)
    pre, cache = _step(model, jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), cache)
    outs = [pre]
    for t in range(6, 9):
        lg, cache = _step(model, jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), cache)
        outs.append(lg)
    got = np.asarray(jnp.concatenate(outs, 1))
    real = mask.astype(bool)
    assert np.max(np.abs(got[real] - ref[real])) < ATOL


@pytest.mark.parity
def test_reward_model_matches_torch(torch, hf_rm):
    path, tm = hf_rm
    rm = load_reward_model(path)
    assert rm.num_labels == 2 and rm.score.kernel.shape == (32, 2)
    ids, mask = _batch(seed=5, pad_left=(0, 2, 5))
    # right padding on the last row as well: HF picks the rightmost non-pad token
    ids[2, -2:] = 0
    mask[2, -2:] = 0
    ref = _torch_logits(torch, tm, ids, mask)
    got = nnx.jit(lambda m, i, mk: m(i, attention_mask=mk))(rm, jnp.asarray(ids), jnp.asarray(mask))
    assert got.shape == (3, 2) and got.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(got) - ref)) < ATOL


@pytest.mark.parity
def test_value_model_from_reward_model(torch, hf_rm, hf_lms):
    path, _ = hf_rm
    rm = load_reward_model(path)
    vm = load_value_model(path, num_objectives=2)
    ids, mask = _batch(seed=6, B=2, T=7, pad_left=(0, 2))
    both = nnx.jit(lambda vm, rm, i, mk: (vm(i, attention_mask=mk)[0], rm(i, attention_mask=mk)))
    values, scores = both(vm, rm, jnp.asarray(ids), jnp.asarray(mask))
    assert values.shape == (2, 7, 2) and values.dtype == jnp.float32
    np.testing.assert_allclose(values[:, -1], scores, atol=1e-6)
    # from a causal LM folder: trunk loaded, head freshly initialised, lm_head ignored
    lm_path, _ = hf_lms["gqa_untied"]
    vm1 = load_value_model(lm_path, num_objectives=3)
    lm = load_causal_lm(lm_path)
    np.testing.assert_array_equal(vm1.model.layers.mlp.up_proj.kernel[...], lm.model.layers.mlp.up_proj.kernel[...])
    assert vm1.value_head.kernel.shape == (32, 3)
    np.testing.assert_array_equal(vm1.value_head.bias[...], 0.0)


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["causal", "reward"])
def test_export_roundtrip_transformers(torch, hf_lms, hf_rm, tmp_path, kind):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    if kind == "causal":
        src, tm = hf_lms["mqa_llama3"]
        model, cls = load_causal_lm(src), LlamaForCausalLM
    else:
        src, tm = hf_rm
        model, cls = load_reward_model(src), LlamaForSequenceClassification
    save_pretrained(model, tmp_path / "out")
    reloaded = cls.from_pretrained(tmp_path / "out").eval()
    ids, mask = _batch(seed=9)
    np.testing.assert_allclose(
        _torch_logits(torch, reloaded, ids, mask), _torch_logits(torch, tm, ids, mask), atol=1e-6
    )
    # and back into mojax, sharded into several files
    save_pretrained(model, tmp_path / "out2", max_shard_size="16KB")
    assert (tmp_path / "out2" / "model.safetensors.index.json").exists()
    again = (load_causal_lm if kind == "causal" else load_reward_model)(tmp_path / "out2")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=False):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parity
def test_tied_export_has_no_lm_head(hf_lms, tmp_path):
    from safetensors import safe_open

    model = load_causal_lm(hf_lms["mha_tied"][0])
    save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True


def _mesh_shardings(abstract_state, mesh, rules):
    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, P(*(rules.get(n) for n in s))), specs, is_leaf=lambda x: isinstance(x, P)
    )


@pytest.mark.parity
@pytest.mark.parametrize(
    "rules",
    [
        "fsdp_tp",  # the preset of mojax.models.sharding, through its state_shardings
        {"layers": "tensor", "head_dim": "fsdp", "norm": "fsdp", "vocab": "fsdp"},  # odd slices
    ],
)
def test_sharded_load(hf_lms, rules):
    from mojax.models.llama import LlamaForCausalLM

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    path, _ = hf_lms["sharded"]
    ref = load_causal_lm(path)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(ref.config, rngs=nnx.Rngs(0)))
    if isinstance(rules, str):
        from mojax.models.sharding import make_mesh, state_shardings

        mesh = make_mesh(fsdp=4, tensor=2)
        shardings = state_shardings(nnx.state(abstract), mesh, rules)
    else:
        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        shardings = _mesh_shardings(nnx.state(abstract), mesh, rules)
    model = load_causal_lm(path, shardings=shardings)
    flat_ref = dict(nnx.to_flat_state(nnx.state(ref)))
    flat_sh = dict(nnx.to_flat_state(shardings))
    for key, var in nnx.to_flat_state(nnx.state(model)):
        arr = var.get_value()
        np.testing.assert_array_equal(arr, flat_ref[key].get_value())
        assert arr.sharding == flat_sh[key].get_value(), key
    q = model.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.shard_shape(q.shape) != q.shape  # really split, not replicated
    if isinstance(rules, str):  # one forward on the sharded weights (jit follows the placements)
        ids, mask = _batch(seed=2)
        np.testing.assert_allclose(
            _fwd(model, jnp.asarray(ids), jnp.asarray(mask)), _fwd(ref, jnp.asarray(ids), jnp.asarray(mask)), atol=1e-5
        )


@pytest.mark.parity
def test_bf16_load(torch, hf_lms):
    path, tm = hf_lms["gqa_untied"]
    model = load_causal_lm(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.model.layers.mlp.down_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = _batch(seed=4)
    got = _fwd(model, jnp.asarray(ids), jnp.asarray(mask))
    ref = _torch_logits(torch, tm, ids, mask)
    real = mask.astype(bool)
    assert got.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(got)[real] - ref[real])) < 0.05


@pytest.mark.parity
def test_missing_and_unexpected_tensors(hf_lms, tmp_path):
    from safetensors.numpy import load_file, save_file

    src, _ = hf_lms["gqa_untied"]
    shutil.copy(src / "config.json", tmp_path / "config.json")
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*"
        r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]",
    ):
        load_causal_lm(tmp_path)
    # wrong shape
    sd = load_file(str(src / "model.safetensors"))
    sd["model.norm.weight"] = np.ones(31, np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(31,\)"):
        load_causal_lm(tmp_path)


def test_pickle_only_folder_is_rejected(tmp_path):
    from mojax.models.config import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-real-pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize(
    ("where", "found"),
    [
        ("missing.gguf", "the path does not exist"),
        ("empty", "the folder holds no config.json"),
        ("weights.bin", "it is a file of no known model format"),
    ],
)
def test_a_path_without_a_model_says_what_it_found_and_what_was_expected(tmp_path, where, found):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    said = f"no model at .*{where}.*: {found}; expected an HF folder \\(config.json and"
    with pytest.raises(FileNotFoundError, match=said + ".*a .gguf file, or a folder holding one .gguf file"):
        load_causal_lm(tmp_path / where)
    for load in (load_reward_model, lambda path: load_value_model(path, 2)):
        with pytest.raises(FileNotFoundError, match=said + r" safetensors\)$"):
            load(tmp_path / where)


def test_unsupported_config_is_rejected(tmp_path):
    from mojax.models.config import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps({**ModelConfig.tiny().to_hf_dict(), "mlp_bias": True}))
    with pytest.raises(ValueError, match="mlp_bias"):
        load_causal_lm(tmp_path)


def test_save_without_torch_roundtrip(tmp_path):
    from hf_fixtures import random_llama

    from mojax.models.config import ModelConfig

    model = random_llama(ModelConfig.tiny(num_hidden_layers=1, tie_word_embeddings=True), seed=1)
    save_pretrained(model, tmp_path)
    again = load_causal_lm(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=False):
        np.testing.assert_array_equal(a, b)
