"""Every combiner on FSDP-sharded stacked updates over 8 simulated devices: same numbers, same sharding, no parameter gathers."""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import numpy as np
import pytest
from combiner_cases import CASES, extra_args
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mojax.testing import is_shape, stacked_gradients

N = 3
# A LLaMA-like slice (embedding, one block's norm and projections, LM head), every dim divisible by 8.
SHAPES = {
    "embed": (64, 32),
    "layers": [{"attn_norm": (32,), "q": (32, 32), "o": (32, 32), "gate": (32, 64), "down": (64, 32)}],
    "lm_head": (32, 64),
}
# Leaves whose FSDP axis is their second dimension (output projections), as in MaxText-style rules.
SHARDED_ON_SECOND_DIM = {"o", "down"}
COLLECTIVE = re.compile(
    r"=\s*(?P<type>.+?)\s+(?P<op>all-reduce|all-gather|all-to-all|ragged-all-to-all|collective-permute|collective-broadcast|reduce-scatter)(?:-start)?\("
)
ARRAY_TYPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 simulated devices (tests/conftest.py sets XLA_FLAGS)"
)


@functools.cache
def fsdp_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh of 8 devices on the `fsdp` axis, Auto mode."""
    return jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))


def param_spec(path: tuple[Any, ...], shape: tuple[int, ...]) -> P:
    """FSDP spec of one parameter (no objective axis): shard one dimension over `fsdp`."""
    if len(shape) == 1:
        return P("fsdp")
    return P(None, "fsdp") if getattr(path[-1], "key", None) in SHARDED_ON_SECOND_DIM else P("fsdp", None)


def param_specs() -> Any:
    """The parameter PartitionSpec of every leaf of SHAPES."""
    return jax.tree_util.tree_map_with_path(param_spec, SHAPES, is_leaf=is_shape)


def stacked_shardings() -> Any:
    """NamedSharding of the stacked updates: objective axis replicated, parameter dims as in param_specs."""
    return jax.tree.map(
        lambda spec: NamedSharding(fsdp_mesh(), P(None, *spec)), param_specs(), is_leaf=lambda x: isinstance(x, P)
    )


def collectives(hlo_text: str) -> list[tuple[str, list[int]]]:
    """(op, element count of each result array) for every cross-device collective in compiled HLO text."""
    found = []
    for match in COLLECTIVE.finditer(hlo_text):
        sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in ARRAY_TYPE.findall(match["type"])]
        found.append((match["op"], sizes))
    return found


def test_collective_parser_sees_a_parameter_all_gather():
    sharded = jax.device_put(np.ones((8, 64), np.float32), NamedSharding(fsdp_mesh(), P("fsdp", None)))
    replicate = jax.jit(lambda x: x * 2.0, out_shardings=NamedSharding(fsdp_mesh(), P()))
    assert ("all-gather", [512]) in collectives(replicate.lower(sharded).compile().as_text())


def test_collective_parser_sees_a_scalar_all_reduce():
    sharded = jax.device_put(np.ones((8, 64), np.float32), NamedSharding(fsdp_mesh(), P("fsdp", None)))
    assert ("all-reduce", [1]) in collectives(jax.jit(lambda x: x.sum()).lower(sharded).compile().as_text())


def case_param(name: str) -> Any:
    """A pytest parameter for one registry entry, named after it."""
    return pytest.param(name, id=name)


@functools.cache
def sharded_and_plain(name: str) -> tuple[Any, Any, str]:
    """(sharded output, unsharded output, compiled HLO text of the sharded update) for one combiner."""
    tx = CASES[name].make(N)
    grads = stacked_gradients(SHAPES, N, seed=2)
    state = tx.init(jax.tree.map(lambda g: g[0], grads))
    extras = extra_args(CASES[name], N)
    update = jax.jit(lambda g, s, e: tx.update(g, s, None, **e))
    compiled = update.lower(jax.device_put(grads, stacked_shardings()), state, extras).compile()
    sharded = compiled(jax.device_put(grads, stacked_shardings()), state, extras)
    return sharded, update(grads, state, extras), compiled.as_text()


@pytest.mark.parametrize("name", [case_param(name) for name in CASES])
def test_sharded_update_matches_unsharded(name):
    (sharded_update, sharded_state), (plain_update, plain_state), _ = sharded_and_plain(name)
    np.testing.assert_allclose(sharded_state.weights, plain_state.weights, rtol=1e-4, atol=1e-6)
    jax.tree.map(
        lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5), sharded_update, plain_update
    )


@pytest.mark.parametrize("name", [case_param(name) for name in CASES])
def test_output_keeps_the_parameter_sharding(name):
    (sharded_update, _), _, _ = sharded_and_plain(name)
    mesh = fsdp_mesh()
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(sharded_update),
        jax.tree.leaves(param_specs(), is_leaf=lambda x: isinstance(x, P)),
        strict=False,
    ):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (
            jax.tree_util.keystr(path),
            leaf.sharding,
            spec,
        )


@pytest.mark.parametrize("name", [case_param(name) for name in CASES])
def test_only_small_all_reduces_cross_devices(name):
    _, _, hlo = sharded_and_plain(name)
    ops = collectives(hlo)
    assert [op for op, _ in ops if op != "all-reduce"] == [], ops
    oversized = [(op, sizes) for op, sizes in ops if max(sizes, default=0) > N * N]
    assert oversized == [], f"all-reduces larger than n x n = {N * N} elements: {oversized}"
    if CASES[name].uses_gram:
        assert any(N * N in sizes for _, sizes in ops), f"no n x n all-reduce of the Gram matrix in {ops}"


@pytest.mark.parametrize("name", [case_param(name) for name in CASES])
def test_init_on_abstract_sharded_params_and_replicated_weights(name):
    abstract = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(
            shape, np.float32, sharding=NamedSharding(fsdp_mesh(), P(*sharding.spec[1:]))
        ),
        SHAPES,
        stacked_shardings(),
        is_leaf=is_shape,
    )
    assert jax.eval_shape(CASES[name].make(N).init, abstract).weights.shape == (N,)
    (_, sharded_state), _, _ = sharded_and_plain(name)
    assert sharded_state.weights.sharding.is_fully_replicated, sharded_state.weights.sharding
