"""Value and reward heads (torch-free). HF parity of the reward model is in test_hf.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import random_module

from mojax.models import ModelConfig
from mojax.models.heads import LlamaRewardModel, LlamaValueModel, last_non_pad_index

CFG = ModelConfig.tiny(num_hidden_layers=1)


@pytest.fixture(scope="module")
def value_model():
    return random_module(lambda: LlamaValueModel(CFG, 3, rngs=nnx.Rngs(0)), seed=1)


def test_value_model_shapes_and_cache(value_model):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]])
    h = nnx.eval_shape(lambda m: m.hidden_states(ids)[0], value_model)
    assert h.shape == (2, 6, 64)
    kv = nnx.state(value_model, nnx.Param)["value_head"]
    assert kv["kernel"].shape == (64, 3) and kv["bias"].shape == (3,)
    from mojax.models.llama import init_kv_cache

    run = nnx.jit(lambda m, i, mk, c: m(i, attention_mask=mk, cache=c))
    values, none = run(value_model, ids, mask, None)
    assert values.shape == (2, 6, 3) and values.dtype == jnp.float32 and none is None
    cached, cache = run(value_model, ids, mask, init_kv_cache(CFG, 2, 8))
    assert int(cache.index) == 6
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(values)[real], atol=2e-5)


def test_value_head_partitioning():
    abstract = nnx.eval_shape(lambda: LlamaValueModel(ModelConfig.llama_7b(), 2, rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(abstract))
    assert tuple(specs["value_head"]["kernel"].get_value()) == ("embed", None)
    assert tuple(specs["model"]["layers"]["mlp"]["up_proj"]["kernel"].get_value()) == ("layers", "embed", "mlp")


def test_value_model_rejects_bad_n():
    with pytest.raises(ValueError, match="num_objectives"):
        LlamaValueModel(CFG, 0, rngs=nnx.Rngs(0))


def test_last_non_pad_index_matches_hf_rule():
    ids = jnp.asarray(
        [
            [5, 6, 7, 0, 0],  # right padding -> 2
            [0, 0, 5, 6, 7],  # left padding -> 4
            [0, 0, 0, 0, 0],  # all pad -> 0 (argmax of zeros)
            [5, 0, 6, 0, 0],
        ]
    )  # pad id inside -> rightmost non-pad = 2
    np.testing.assert_array_equal(last_non_pad_index(ids, 0), [2, 4, 0, 2])
    np.testing.assert_array_equal(last_non_pad_index(ids[:1], None), [4])
    with pytest.raises(ValueError, match="no padding token"):
        last_non_pad_index(ids, None)


def test_reward_model_pools_token_scores():
    rm = random_module(lambda: LlamaRewardModel(CFG, 2, rngs=nnx.Rngs(0)), seed=2)
    ids = jnp.asarray([[0, 0, 9, 10, 11], [9, 10, 11, 12, 0]], jnp.int32)
    mask = (ids != 0).astype(jnp.int32)
    scores, tok = nnx.jit(lambda m, i, mk: (m(i, attention_mask=mk), m.token_scores(i, attention_mask=mk)))(
        rm, ids, mask
    )
    assert scores.shape == (2, 2) and tok.shape == (2, 5, 2)
    np.testing.assert_allclose(scores, jnp.stack([tok[0, 4], tok[1, 3]]), atol=1e-6)
    # left-padded row scores the same as the unpadded sequence
    alone = nnx.jit(lambda m, i: m(i))(rm, ids[:1, 2:])
    np.testing.assert_allclose(scores[0], alone[0], atol=2e-5)
    assert rm.score.kernel.shape == (64, 2)
