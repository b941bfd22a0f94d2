"""mojax.xla_cpu: the programs with batched pullbacks compile without XLA:CPU's YNNPACK reduction fusions, and with
those options the fused broadcast reduction that the default fusions get wrong comes out right."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from mojax.rl.config import load_config
from mojax.rl.dpo import DPOTrainer
from mojax.rl.dpo_config import load_dpo_config
from mojax.rl.trainer import Trainer
from mojax.xla_cpu import NO_YNN_REDUCTION_FUSIONS, batched_pullback_options, broadcast_reduce_error

QUIET = ["logging.tensorboard=false", "logging.progress=false", "export=false"]


def ynn_reduction_fusions(compiled_text: str) -> int:
    """How many of a compiled program's YNNPACK fusions contain a reduction."""
    fused = re.findall(r"calls=%([\w.]+), [^\n]*__ynn_fusion", compiled_text)
    bodies = {name: re.search(rf"^%{re.escape(name)} .*?^}}", compiled_text, re.S | re.M).group(0) for name in fused}
    return sum(" reduce(" in body for body in bodies.values())


def test_the_options_keep_the_fused_broadcast_reduction_exact_on_the_cpu():
    assert jax.default_backend() == "cpu"
    assert batched_pullback_options() == NO_YNN_REDUCTION_FUSIONS
    assert broadcast_reduce_error(batched_pullback_options()) < 1e-3


def test_the_reduction_fusion_counter_sees_ynn_reductions_and_the_options_remove_them():
    """The counter can fail: a softmax's backward pass is compiled with XLA's YNNPACK reduction fusions on (they are
    XLA:CPU's defaults, requested here by name) and without them."""
    x = jnp.ones((16, 80, 576), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=-1) ** 2))
    with_reductions = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert ynn_reduction_fusions(jax.jit(grad, compiler_options=with_reductions).lower(x).compile().as_text()) > 0
    without = jax.jit(grad, compiler_options=NO_YNN_REDUCTION_FUSIONS).lower(x).compile().as_text()
    assert ynn_reduction_fusions(without) == 0


def test_the_rl_train_step_with_batched_pullbacks_compiles_without_ynn_reduction_fusions_and_equals_sequential(
    tmp_path,
):
    four = ", ".join(f"{{name: {c}_rate, fn: char_fraction, options: {{chars: {c}}}}}" for c in "abcd")
    overrides = [*QUIET, "eval_steps=0", "combiner.name=mgda", "combiner.mode=full", f"objectives=[{four}]"]
    batched = Trainer(load_config("tiny", [f"output_dir={tmp_path / 'b'}", *overrides, "combiner.pullbacks=batched"]))
    sequential = Trainer(load_config("tiny", [f"output_dir={tmp_path / 's'}", *overrides]))
    assert batched.update_spec.batched_pullbacks and not sequential.update_spec.batched_pullbacks
    batch = batched.prepare(1).batch
    args = (batched.state, batch, jax.random.key(0), jnp.float32(0.1), None)
    assert ynn_reduction_fusions(batched._train_step.lower(*args).compile().as_text()) == 0
    before = [np.array(leaf) for leaf in jax.tree.leaves(sequential.state.params)]
    batched.update(batch, 1)
    sequential.update(batch, 1)
    after = jax.tree.leaves(sequential.state.params)
    moved = [np.abs(np.asarray(leaf) - start).max() for leaf, start in zip(after, before, strict=True)]
    assert max(moved) > 1e-4  # the update moves the parameters, so equal updates mean equal gradients
    for got, want in zip(jax.tree.leaves(batched.state.params), jax.tree.leaves(sequential.state.params), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_dpo_step_compiles_without_ynn_reduction_fusions(tmp_path):
    trainer = DPOTrainer(load_dpo_config("dpo_tiny", [f"output_dir={tmp_path}", *QUIET]))
    with trainer.on_mesh():
        lowered = trainer._step_fn.lower(
            trainer.state, trainer._place(trainer.pairs_for_step(1)), trainer.reference_params
        )
    assert ynn_reduction_fusions(lowered.compile().as_text()) == 0
