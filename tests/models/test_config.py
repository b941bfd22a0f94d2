"""ModelConfig: presets, HF dict round trip, allow-list errors (torch-free)."""

import dataclasses
import json

import jax.numpy as jnp
import pytest

from mojax.models.config import ModelConfig

HF_DICT = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "transformers_version": "5.23.0",
    "dtype": "float32",
    "use_cache": True,
    "initializer_range": 0.02,
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
    "pad_token_id": 0,
}


def test_from_hf_dict_fields():
    c = ModelConfig.from_hf(HF_DICT, dtype="bfloat16")
    assert (c.vocab_size, c.hidden_size, c.num_key_value_heads, c.head_dim) == (128, 32, 2, 8)
    assert c.rope_theta == 5000.0 and c.rope_scaling is None and c.tie_word_embeddings
    assert c.eos_token_id == (2, 3) and c.eos_token_ids == (2, 3) and c.pad_token_id == 0
    assert c.dtype == jnp.bfloat16 and c.param_dtype == jnp.float32
    hash(c)  # static under jit / as NNX module metadata


def test_roundtrip_hf_dict_and_json(tmp_path):
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    c = ModelConfig.from_hf({**HF_DICT, "rope_parameters": llama3})
    assert dict(c.rope_scaling) == {k: v for k, v in llama3.items() if k not in ("rope_type", "rope_theta")}
    hash(c)
    d = c.to_hf_dict()
    assert d["rope_parameters"] == llama3
    assert ModelConfig.from_hf(d) == c
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ModelConfig.from_pretrained_dir(tmp_path) == c
    assert ModelConfig.from_json_file(tmp_path / "config.json", param_dtype="bfloat16").param_dtype == jnp.bfloat16


def test_legacy_v4_rope_fields():
    d = {k: v for k, v in HF_DICT.items() if k != "rope_parameters"}
    d.update(
        rope_theta=123.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 2.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    c = ModelConfig.from_hf(d)
    assert c.rope_theta == 123.0 and c.rope_scaling["factor"] == 2.0
    d["rope_scaling"] = None
    assert ModelConfig.from_hf(d).rope_scaling is None


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("attention_bias", "yes", "attention_bias"),
        ("mlp_bias", True, "mlp_bias=True"),
        ("hidden_act", "gelu", "hidden_act='gelu'.*'silu'"),
        ("model_type", "mistral", "model_type='mistral'"),
        ("sliding_window", 4096, "unknown field sliding_window"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type='yarn'.*'llama3'"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 2.0}, "missing"),
        (
            "rope_parameters",
            {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
            "unexpected keys",
        ),
        ("auto_map", {"AutoModel": "x.Y"}, "remote"),
    ],
)
def test_allow_list_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**HF_DICT, field: value})


def test_errors_are_collected():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf({**HF_DICT, "hidden_act": "gelu", "mlp_bias": True, "foo": 1})
    msg = str(e.value)
    assert "hidden_act" in msg and "mlp_bias" in msg and "foo" in msg


def test_invalid_shapes():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="positive int"):
        ModelConfig.tiny(num_hidden_layers=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig.tiny().hidden_size = 3


def test_presets():
    tiny = ModelConfig.tiny()
    assert 90_000 <= tiny.num_params() <= 120_000
    assert ModelConfig.llama_7b().num_params() == pytest.approx(6.74e9, rel=0.01)
    assert ModelConfig.llama_13b().num_params() == pytest.approx(13.0e9, rel=0.01)
    c70 = ModelConfig.llama_70b()
    assert c70.num_params() == pytest.approx(70.6e9, rel=0.01)
    assert (c70.num_key_value_heads, c70.num_query_groups, c70.head_dim) == (8, 8, 128)


def test_to_hf_llamaconfig():
    pytest.importorskip("transformers")
    c = ModelConfig.tiny(
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
        rope_theta=5e5,
    )
    hf = c.to_hf()
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["rope_theta"] == 5e5
    assert hf.num_key_value_heads == 2 and hf.head_dim == 16
    assert ModelConfig.from_hf(hf) == c


# The published config.json of HuggingFaceTB/SmolLM2-135M-Instruct, field for field.
SMOLLM2_135M_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "is_llama_config": True,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_interleaved": False,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
    "transformers_version": "4.42.3",
    "use_cache": True,
    "vocab_size": 49152,
}


def test_smollm2_config_loads_with_its_metadata():
    c = ModelConfig.from_hf(SMOLLM2_135M_INSTRUCT)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.head_dim, c.max_position_embeddings) == (1536, 49152, 64, 8192)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.rope_scaling is None and c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id, c.unk_token_id) == (1, (2,), 2, None)
    assert c.param_dtype == jnp.float32  # torch_dtype is metadata: the caller picks the JAX dtypes
    assert 134e6 < c.num_params() < 135e6


@pytest.mark.parametrize(
    "metadata",
    [
        {"unk_token_id": 0},
        {"quantization_config": {"quant_method": "gguf", "source": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    ],
)
def test_token_ids_and_a_dequantized_gguf_note_are_accepted(metadata):
    c = ModelConfig.from_hf({**SMOLLM2_135M_INSTRUCT, **metadata})
    assert c == ModelConfig.from_hf(SMOLLM2_135M_INSTRUCT).replace(unk_token_id=metadata.get("unk_token_id"))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rope_interleaved", True, "rope_interleaved=True.*supported: False"),
        ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
        ("quantization_config", {"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
        ("quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
        ("quantization_config", "int8", "quant_method=None"),
    ],
)
def test_fields_that_change_the_maths_stay_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**SMOLLM2_135M_INSTRUCT, field: value})


def test_token_ids_round_trip_through_the_hf_dict():
    c = ModelConfig.tiny(eos_token_id=[2, 5], unk_token_id=3)
    assert c.eos_token_id == (2, 5) and c.unk_token_id == 3
    d = c.to_hf_dict()
    assert (d["eos_token_id"], d["unk_token_id"]) == ([2, 5], 3)
    assert ModelConfig.from_hf(d) == c
    assert "unk_token_id" not in ModelConfig.tiny().to_hf_dict()


def test_forward_flops_counts_every_matmul_of_smollm2():
    """A loop over SmolLM2-135M's matmuls, per token: 2 FLOPs per weight, then attention over the context."""
    c = ModelConfig.from_hf(SMOLLM2_135M_INSTRUCT)
    d, f, q, kv = 576, 1536, 9 * 64, 3 * 64
    layer_matrices = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # q k v o gate up down
    tokens, context = 4 * 128, 128
    per_token = sum(2 * fan_in * fan_out for fan_in, fan_out in layer_matrices) * 30
    per_token += 2 * 576 * 49152  # the tied LM head
    per_token += 30 * 9 * (2 * 64 * context + 2 * context * 64)  # scores q.k and the mix p.v, every head
    assert c.forward_flops(tokens, context) == tokens * per_token == 142_237_237_248
    untied = c.replace(tie_word_embeddings=False)  # the input embedding is a lookup: the count is unchanged
    assert untied.forward_flops(tokens, context) == c.forward_flops(tokens, context)
    assert c.forward_flops(16, 72) - c.forward_flops(16, 71) == 16 * 30 * 4 * 576
    assert (
        c.forward_flops(tokens, context) - c.forward_flops(tokens, context, lm_head=False) == tokens * 2 * 576 * 49152
    )


def test_forward_flops_rejects_negative_sizes():
    with pytest.raises(ValueError, match="tokens and context must be >= 0"):
        ModelConfig.tiny().forward_flops(-1, 8)
