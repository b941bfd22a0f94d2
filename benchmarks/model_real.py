"""SmolLM2-135M-Instruct (real weights, fp32): mojax against HF transformers + torch eager, whole and by piece.

Both sides run the same weights: the GGUF file is loaded with ``mojax.models.hf.load_causal_lm`` (dequantized to fp32)
and exported with ``save_pretrained`` for ``transformers.LlamaForCausalLM``. On a [B, T] batch of random token ids:

* ``forward``: the logits (torch under ``inference_mode``);
* ``forward+backward``: next-token cross-entropy (HF's ``labels=input_ids`` loss) and its gradient w.r.t. every
  parameter (no optimizer); mojax's loss is logsumexp minus the one-hot inner product (``benchmarks/model.py``);
* ``trunk forward+backward``: embedding + decoder layers + final norm, loss <hidden, R> with a fixed random R, so the
  LM head and cross-entropy are out;
* ``head+CE forward+backward``: the tied LM head and the cross-entropy on fixed random hidden states, gradients w.r.t.
  the embedding and the hidden states;
* ``trunk forward``: the hidden states alone;
* ``GEMM 2048x2048x2048``: one fp32 square matmul alone, what this machine's matmuls can do on each side;
* ``decode MLP matmuls``: the matmuls of a greedy decode step's MLPs at batch 16 alone (16-row activations through
  the 30 layers' up and down projections), the skinny matmuls a decode step is made of;
* ``attention forward+backward``: the causal attention of the 30 layers alone (random q, k, v at the batch's shapes),
  mojax's ``causal_attention`` against the ``scaled_dot_product_attention`` call HF's LLaMA makes in training.

The pieces say where the whole step's time goes on each side. Every row also gives the FLOP rate of both sides,
from the matmul FLOPs of the piece (``ModelConfig.forward_flops``; a backward pass costs twice its forward), and,
when the square GEMM ran in the same run, the share of the best rate either side reached on it: how much room a
piece leaves, and what rate a target ratio against torch would need. mojax's variants of the whole step (``--variants``)
are the layer scan under each rematerialisation policy of ``mojax.models.llama.checkpointed`` (``dots``, the
default: matmul outputs kept, the rest recomputed; ``none``: every intermediate kept; ``full``: each layer
recomputed), ``unrolled`` (policy ``none`` with the layer scan fully unrolled), ``dots+whole-attention`` (policy
``dots`` with each layer's attention over all T keys instead of ``causal_attention``'s query blocks), ``dots+ynn``
(policy ``dots`` compiled with XLA:CPU's experimental YNNPACK dot fusion, :data:`YNN_DOT_FUSION`),
``dots+layer-loop`` (policy ``dots`` with the decoder layers a Python loop over weights held apart per layer, as a
model that did not stack its layers would run them: :func:`layer_loop`) and ``dots+head-op`` (policy ``dots``, the
LM head and cross-entropy through the trainers' op: :func:`trainers_next_token_loss`; also a second mojax contender
of the head+CE piece).

Timing: compile and warm up first; then ``--rounds`` rounds, each calling every contender of a piece ``--repeats``
times in turn; a ratio is torch's median over mojax's median in the same round (> 1: mojax faster), and the table
gives the median over rounds and the min-max spread. The machine these figures come from is a shared, loaded 2-core
CPU: only same-run ratios are meaningful. Both sides run with freed host memory kept for the next call
(``mojax.host_memory``, as ``benchmarks/rl_step.py``; ``MOJAX_RELEASE_HOST_MEMORY=1``: glibc's defaults).

    MOJAX_CACHE=/tmp/mojax-data-cache python benchmarks/model_real.py
    python benchmarks/model_real.py --pieces forward --rounds 1 --repeats 1 --out /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import next_token_loss  # noqa: E402

from mojax._numerics import columns_matmul  # noqa: E402
from mojax.data import smollm2_gguf  # noqa: E402
from mojax.host_memory import keep_freed_host_memory  # noqa: E402
from mojax.models.hf import load_causal_lm, save_pretrained  # noqa: E402
from mojax.testing import benchmark_command, cpu_summary, interleaved_timings, same_round_ratios, write_report  # noqa: E402

TORCH_THREADS = 2
MODEL_PIECES = ("forward", "forward+backward", "trunk forward+backward", "head+CE forward+backward", "trunk forward")
PEAK_PIECE, PEAK_SIZE = "GEMM 2048x2048x2048", 2048
DECODE_PIECE, DECODE_ROWS = "decode MLP matmuls 16 rows", 16
"""Lone matmuls timed as pieces: the square one gives the peak rate; the decode one is the up and down projections of
SmolLM2's 30 MLPs on 16 rows, one after the other (each layer's output is the next one's input), with the weights
output-major [out, in] as both sides' decode steps hold them."""
ATTENTION_PIECE = "attention forward+backward"
"""Every layer's causal attention alone, forward and backward: mojax's ``causal_attention`` against the SDPA call HF's
LLaMA makes in training."""
PIECES = MODEL_PIECES + (PEAK_PIECE, DECODE_PIECE, ATTENTION_PIECE)
VARIANTS = ("dots", "none", "full", "unrolled", "dots+whole-attention", "dots+ynn", "dots+layer-loop", "dots+head-op")
YNN_DOT_FUSION = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
"""XLA:CPU option (``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot``): matmuls and their operand layouts as
one YNNPACK fusion."""


def traced_with(fn: Callable, owner: object, name: str, replacement: object) -> Callable:
    """``fn`` traced with ``owner.name`` replaced by ``replacement`` (put back after each call)."""

    def wrapped(*args):
        original = getattr(owner, name)
        setattr(owner, name, replacement)
        try:
            return fn(*args)
        finally:
            setattr(owner, name, original)

    return wrapped


def with_unrolled_scan(fn: Callable) -> Callable:
    """``fn`` traced with every ``lax.scan`` fully unrolled (the layer scan becomes straight-line code)."""
    scan = jax.lax.scan

    def unrolled_scan(f, init, xs=None, length=None, **kwargs):
        return scan(f, init, xs, length, **{**kwargs, "unroll": True})

    return traced_with(fn, jax.lax, "scan", unrolled_scan)


def with_whole_attention(fn: Callable) -> Callable:
    """``fn`` traced with the layers' blocked causal attention replaced by attention over all T keys."""
    from mojax.models import llama

    return traced_with(fn, llama, "causal_attention", llama.attention)


def layer_loop(per_layer: list) -> Callable:
    """A stand-in for ``llama.run_layers`` without a cache or dropout: the decoder layers as a Python loop over
    ``per_layer``'s weights (each layer's arrays its own), as a model that stored its layers apart would run them. No
    layer scan, so no stacked residuals or stacked gradients to zero-fill, write and read back."""
    from mojax.models import llama

    def run(_stacked, x, inputs, _past, eps, lora, _keys, remat, _last=None, _prefix=None, rows=None):
        layer = llama.checkpointed(lambda w, h: llama.decoder_layer(w, h, inputs, None, eps, lora)[0], remat)
        for w in per_layer:
            x = layer(w, x)
        return (x, (None, None)) if rows is None else (x[:, rows], None)

    return run


def layers_apart(model) -> tuple[list, object]:
    """(each decoder layer's weights as arrays of its own, the model's state with the stacked layer arrays emptied):
    the layer-loop step's two arguments, so that it computes no gradient for the stacked arrays it does not read."""
    stacked = model.model.layers.weights(True)
    per_layer = [jax.tree.map(lambda a, i=i: jnp.array(a[i]), stacked) for i in range(model.config.num_hidden_layers)]
    in_layers = lambda path: any(getattr(key, "key", None) == "layers" for key in path)  # noqa: E731
    empty = lambda path, a: jnp.zeros((0,), a.dtype) if in_layers(path) else a  # noqa: E731
    return per_layer, jax.tree_util.tree_map_with_path(empty, nnx.state(model))


def mojax_pieces(model, ids, hidden, probe, variants: list[str]) -> dict[str, dict[str, Callable[[], object]]]:
    """piece -> {contender label -> zero-argument call}, every call jitted and blocking."""
    graphdef, state = nnx.split(model)
    graphdefs = {policy: nnx.split(with_remat(model, policy))[0] for policy in ("dots", "none", "full")}

    def whole_loss(graph):
        return lambda s, i: next_token_loss(nnx.merge(graph, s)(i)[0], i)

    def trunk_loss(s, i, r):
        return jnp.sum(nnx.merge(graphdef, s).hidden_states(i)[0] * r)

    def head_loss(s, h, i):
        return next_token_loss(nnx.merge(graphdef, s).logits(h), i)

    def head_op_loss(graph):
        def loss(s, i):
            model = nnx.merge(graph, s)
            return trainers_next_token_loss(model, model.hidden_states(i)[0], i)

        return loss

    step = {policy: jax.jit(jax.value_and_grad(whole_loss(g))) for policy, g in graphdefs.items()}
    step["unrolled"] = jax.jit(with_unrolled_scan(jax.value_and_grad(whole_loss(graphdefs["none"]))))
    step["dots+whole-attention"] = jax.jit(with_whole_attention(jax.value_and_grad(whole_loss(graphdefs["dots"]))))
    step["dots+ynn"] = jax.jit(jax.value_and_grad(whole_loss(graphdefs["dots"])), compiler_options=YNN_DOT_FUSION)
    step["dots+head-op"] = jax.jit(jax.value_and_grad(head_op_loss(graphdefs["dots"])))
    block = jax.block_until_ready
    calls = {variant: (lambda f=f: block(f(state, ids))) for variant, f in step.items()}
    if "dots+layer-loop" in variants:  # only then: it holds a second copy of the layers' weights
        from mojax.models import llama

        per_layer, emptied = layers_apart(model)

        def loop_loss(s, layers, i):
            return traced_with(whole_loss(graphdefs["dots"]), llama, "run_layers", layer_loop(layers))(s, i)

        loop_step = jax.jit(jax.value_and_grad(loop_loss, argnums=(0, 1)))
        calls["dots+layer-loop"] = lambda: block(loop_step(emptied, per_layer, ids))
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)[0])
    trunk = jax.jit(jax.value_and_grad(trunk_loss))
    head = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1)))
    head_op = jax.jit(
        jax.value_and_grad(lambda s, h, i: trainers_next_token_loss(nnx.merge(graphdef, s), h, i), argnums=(0, 1))
    )
    trunk_forward = jax.jit(lambda s, i: nnx.merge(graphdef, s).hidden_states(i)[0])
    return {
        "forward": {"mojax": lambda: block(forward(state, ids))},
        "forward+backward": {f"mojax {v}": calls[v] for v in variants},
        "trunk forward+backward": {"mojax": lambda: block(trunk(state, ids, probe))},
        "head+CE forward+backward": {
            "mojax": lambda: block(head(state, hidden, ids)),
            "mojax head-op": lambda: block(head_op(state, hidden, ids)),
        },
        "trunk forward": {"mojax": lambda: block(trunk_forward(state, ids))},
    }


def trainers_next_token_loss(model, hidden, ids):
    """The next-token cross-entropy as mojax's RL and DPO trainers differentiate it: the final hidden states through
    :func:`mojax.rl.losses.head_logprobs_and_entropy` (the LM head and the targets' log-probabilities, with its own
    backward pass), the positions' predictions of the next tokens only."""
    from mojax.rl.losses import head_logprobs_and_entropy
    from mojax.rl.trainer import lm_head

    return -jnp.mean(head_logprobs_and_entropy(hidden[:, :-1], lm_head(model), ids[:, 1:])[0])


def with_remat(model, policy: str):
    """The same model with rematerialisation policy ``policy`` (shares the arrays: only the graph differs)."""
    from mojax.models.llama import LlamaForCausalLM

    twin = nnx.eval_shape(lambda: LlamaForCausalLM(model.config, remat=policy, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(twin)
    return nnx.merge(graphdef, nnx.state(model))


def torch_pieces(torch_model, ids, hidden, probe) -> dict[str, Callable[[], object]]:
    """piece -> the torch call (eager, fp32, parameters' .grad reset before each backward)."""
    import torch

    ids_t = torch.from_numpy(ids.astype(np.int64))
    hidden_t = torch.from_numpy(hidden).requires_grad_(True)
    probe_t = torch.from_numpy(probe)

    def forward():
        with torch.inference_mode():
            return torch_model(input_ids=ids_t).logits

    def forward_backward():
        torch_model.zero_grad(set_to_none=True)
        loss = torch_model(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        return loss

    def trunk():
        torch_model.zero_grad(set_to_none=True)
        loss = (torch_model.model(input_ids=ids_t).last_hidden_state * probe_t).sum()
        loss.backward()
        return loss

    def head():
        torch_model.zero_grad(set_to_none=True)
        hidden_t.grad = None
        logits = torch_model.lm_head(hidden_t)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1))
        loss.backward()
        return loss

    def trunk_forward():
        with torch.inference_mode():
            return torch_model.model(input_ids=ids_t).last_hidden_state

    return dict(zip(MODEL_PIECES, (forward, forward_backward, trunk, head, trunk_forward), strict=True))


def matmul_pieces(config, seed: int = 0) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """({piece: mojax call}, {piece: torch call}) of :data:`PEAK_PIECE` and :data:`DECODE_PIECE` on the same random
    data (fp32; ``jnp.matmul`` jitted against ``torch.mm``; the decode chain as one program over per-layer [out, in]
    arrays through :func:`mojax._numerics.columns_matmul`, as ``generate``'s decode steps, against
    ``torch.nn.functional.linear``, as HF's)."""
    import torch

    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
    square = normal(PEAK_SIZE, PEAK_SIZE)
    x = normal(DECODE_ROWS, config.hidden_size)
    layers = [
        (normal(config.intermediate_size, config.hidden_size), normal(config.hidden_size, config.intermediate_size))
        for _ in range(config.num_hidden_layers)
    ]

    @jax.jit
    def mlp_chain(x, layers):
        for up, down in layers:
            x = columns_matmul(columns_matmul(x, up), down)
        return x

    def torch_chain(x, layers):
        for up, down in layers:
            x = torch.nn.functional.linear(torch.nn.functional.linear(x, up), down)
        return x

    matmul, square_j, square_t = jax.jit(jnp.matmul), jnp.asarray(square), torch.from_numpy(square)
    x_j, layers_j = jnp.asarray(x), jax.tree.map(jnp.asarray, layers)
    x_t, layers_t = torch.from_numpy(x), jax.tree.map(torch.from_numpy, layers)
    ours = {
        PEAK_PIECE: lambda: jax.block_until_ready(matmul(square_j, square_j)),
        DECODE_PIECE: lambda: jax.block_until_ready(mlp_chain(x_j, layers_j)),
    }
    theirs = {PEAK_PIECE: lambda: torch.mm(square_t, square_t), DECODE_PIECE: lambda: torch_chain(x_t, layers_t)}
    return ours, theirs


def attention_pieces(
    config, batch: int, length: int, seed: int = 0
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """({:data:`ATTENTION_PIECE`: mojax call}, {...: torch call}): the causal attention of every layer, forward and
    backward (gradients w.r.t. q, k and v for a random output cotangent) on random [batch, length] inputs, one call
    per layer. mojax: ``mojax.models.llama.causal_attention`` (what its layers run without a cache: explicit causal
    mask, fp32 softmax, the queries in blocks that skip the masked future) jitted with its VJP;
    torch: what HF's LLaMA runs in training without padding, ``scaled_dot_product_attention(q, k, v, is_causal=True,
    enable_gqa=True)`` and its autograd."""
    import torch

    from mojax.models.llama import causal_attention, causal_mask

    rng = np.random.default_rng(seed)
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, out_grad = (rng.normal(size=(batch, length, heads, hd)).astype(np.float32) for _ in range(2))
    k, v = (rng.normal(size=(batch, kv, length, hd)).astype(np.float32) for _ in range(2))
    mask = causal_mask(jnp.ones((batch, length), bool), jnp.arange(length, dtype=jnp.int32))

    @jax.jit
    def ours(q, k, v, out_grad):
        out, pullback = jax.vjp(lambda q, k, v: causal_attention(q, k, v, mask), q, k, v)
        return out, pullback(out_grad)

    def theirs(q, k, v, out_grad):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out, torch.autograd.grad(out, (q, k, v), out_grad)

    ours_args = [jnp.asarray(a) for a in (q, k, v, out_grad)]
    heads_first = lambda a: torch.from_numpy(a).transpose(1, 2).contiguous()  # noqa: E731  [B, H, T, hd]
    theirs_args = [heads_first(q).requires_grad_(True), torch.from_numpy(k).requires_grad_(True)]
    theirs_args += [torch.from_numpy(v).requires_grad_(True), heads_first(out_grad)]
    layers = range(config.num_hidden_layers)
    return (
        {ATTENTION_PIECE: lambda: [jax.block_until_ready(ours(*ours_args)) for _ in layers]},
        {ATTENTION_PIECE: lambda: [theirs(*theirs_args) for _ in layers]},
    )


def piece_flops(config, batch: int, length: int) -> dict[str, int]:
    """Matmul FLOPs of one call of each piece on a [batch, length] batch (backward passes at twice the forward)."""
    tokens = batch * length
    forward = config.forward_flops(tokens, length)
    trunk = config.forward_flops(tokens, length, lm_head=False)
    return {
        "forward": forward,
        "forward+backward": 3 * forward,
        "trunk forward+backward": 3 * trunk,
        "head+CE forward+backward": 3 * (forward - trunk),
        "trunk forward": trunk,
        PEAK_PIECE: 2 * PEAK_SIZE**3,
        DECODE_PIECE: config.num_hidden_layers * 2 * (2 * DECODE_ROWS * config.hidden_size * config.intermediate_size),
        ATTENTION_PIECE: 3 * (trunk - config.forward_flops(tokens, 0, lm_head=False)),
    }


def rows_for(piece: str, timing: dict, flops: int) -> list[dict]:
    """One row per mojax contender of a piece: median ms and GFLOP/s of both sides (``flops`` per call) and the
    torch/mojax ratio (median, min, max)."""
    medians = timing["round_medians_s"]
    torch_s = medians["torch"]
    rows = []
    for name, values in medians.items():
        if name == "torch":
            continue
        ratio, ratio_min, ratio_max = same_round_ratios(timing, "torch", name)
        rows.append(
            {
                "piece": piece,
                "contender": name,
                "mojax_ms": 1e3 * statistics.median(values),
                "torch_ms": 1e3 * statistics.median(torch_s),
                "ratio": ratio,
                "ratio_min": ratio_min,
                "ratio_max": ratio_max,
                "mojax_gflops": flops / statistics.median(values) / 1e9,
                "torch_gflops": flops / statistics.median(torch_s) / 1e9,
                "mojax_first_call_s": timing["first_call_s"][name],
            }
        )
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# SmolLM2-135M-Instruct, fp32 CPU: mojax against transformers + torch eager, whole step and pieces",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; batch: {report['batch']} tokens; torch threads {TORCH_THREADS}; "
        f"jax {jax.__version__}  ",
        f"Load average (1/5/15 min) before: {report['load_before']}, after: {report['load_after']} (shared machine: "
        "only same-run ratios are meaningful)  ",
        f"{report['rounds']} rounds of {report['repeats']} interleaved calls; ratio = torch median / mojax median in "
        "the same round (> 1: mojax faster), median over rounds and min-max. Parity: max |logits difference| "
        f"{report['max_abs_logits_diff']:.2e}, loss mojax {report['loss_mojax']:.6f} / torch {report['loss_torch']:.6f}.",
        "",
        "| piece | mojax | mojax ms | torch ms | ratio torch/mojax | spread | mojax GFLOP/s | torch GFLOP/s | "
        "mojax / torch, % of peak | mojax first call s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peak = peak_gflops(report["rows"])
    for r in report["rows"]:
        share = f"{r['mojax_gflops'] / peak:.0%} / {r['torch_gflops'] / peak:.0%}" if peak else "n/a"
        lines.append(
            f"| {r['piece']} | {r['contender']} | {r['mojax_ms']:.1f} | {r['torch_ms']:.1f} | {r['ratio']:.2f} | "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['mojax_gflops']:.0f} | {r['torch_gflops']:.0f} | "
            f"{share} | {r['mojax_first_call_s']:.1f} |"
        )
    if peak:
        lines += [
            "",
            f"Peak: {peak:.0f} GFLOP/s, the faster side's median on the {PEAK_PIECE} piece in this run. GFLOP/s count "
            "the matmul FLOPs of a piece (`ModelConfig.forward_flops`; backward = 2 x forward).",
        ]
    return "\n".join(lines + [""])


def peak_gflops(rows: list[dict]) -> float | None:
    """The faster side's rate on the square GEMM (:data:`PEAK_PIECE`), None when that piece did not run."""
    rates = [max(r["mojax_gflops"], r["torch_gflops"]) for r in rows if r["piece"] == PEAK_PIECE]
    return max(rates) if rates else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="4x128", help="B x T tokens")
    parser.add_argument("--pieces", default=",".join(PIECES), help=f"comma-separated subset of {PIECES}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"mojax forward+backward variants {VARIANTS}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.shape = tuple(int(v) for v in args.batch.lower().split("x"))
    args.pieces = args.pieces.split(",")
    args.variants = args.variants.split(",")
    if set(args.pieces) - set(PIECES) or set(args.variants) - set(VARIANTS) or len(args.shape) != 2:
        parser.error(f"--pieces in {PIECES}, --variants in {VARIANTS}, --batch as BxT; got {args}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import LlamaForCausalLM as TorchLlama
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(TORCH_THREADS)
    hf_logging.disable_progress_bar()
    report = {
        "command": benchmark_command("benchmarks/model_real.py", sys.argv[1:] if argv is None else argv),
        "machine": cpu_summary(),
        "batch": args.batch,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "rows": [],
    }
    model = load_causal_lm(smollm2_gguf())  # fetched into $MOJAX_CACHE on first use
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        torch_model = TorchLlama.from_pretrained(tmp, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    batch, length = args.shape
    ids = rng.integers(3, model.config.vocab_size, size=(batch, length)).astype(np.int32)
    hidden = rng.normal(size=(batch, length, model.config.hidden_size)).astype(np.float32)
    probe = rng.normal(size=hidden.shape).astype(np.float32)
    ours = mojax_pieces(model, jnp.asarray(ids), jnp.asarray(hidden), jnp.asarray(probe), args.variants)
    theirs = torch_pieces(torch_model, ids, hidden, probe)
    extras = [matmul_pieces(model.config)]
    if ATTENTION_PIECE in args.pieces:  # only then: older mojax versions, timed through PYTHONPATH, lack it
        extras.append(attention_pieces(model.config, batch, length))
    for extra_ours, extra_theirs in extras:
        ours.update({piece: {"mojax": call} for piece, call in extra_ours.items()})
        theirs.update(extra_theirs)
    flops = piece_flops(model.config, batch, length)
    logits = np.asarray(ours["forward"]["mojax"]())
    report["max_abs_logits_diff"] = float(np.abs(logits - theirs["forward"]().numpy()).max())
    report["loss_mojax"] = float(next_token_loss(jnp.asarray(logits), jnp.asarray(ids)))
    report["loss_torch"] = float(theirs["forward+backward"]().detach())
    for piece in args.pieces:
        timing = interleaved_timings({**ours[piece], "torch": theirs[piece]}, args.rounds, args.repeats)
        report["rows"] += rows_for(piece, timing, flops[piece])
        report["load_after"] = [round(x, 2) for x in os.getloadavg()]
        print(markdown(report), flush=True)
    write_report(args.out, "model_real", report, markdown(report))
    return report


if __name__ == "__main__":
    keep_freed_host_memory()
    main()
