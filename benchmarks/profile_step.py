"""Where a training step's time goes: mojax (XLA:CPU) and transformers + torch eager, by kind of operation.

One forward+backward of the next-token cross-entropy (every parameter's gradient, no optimizer) on SmolLM2-135M's
shapes (vocabulary 49152, d 576, 30 layers, 9/3 heads, MLP 1536, tied embeddings; random weights, so nothing is
downloaded), batch 4 x 128 tokens, fp32, 2 threads on both sides.

* mojax: ``jax.profiler`` traces ``--calls`` steps under each ``--remat`` policy; every XLA operation's time is
  summed per kind (the kinds come from XLA's fusion names: library matmuls ``ynn_fusion`` and Eigen ``dot``;
  ``copy``/``transpose`` fusions, which lay an operand out for a matmul; ``dynamic-update-slice`` writes of the layer
  scan's stacked residuals and gradients, ``dynamic-slice`` reads of them; a lone ``broadcast``, the zeroing of
  those stacked buffers (a fusion whose name merely starts with a broadcast, such as ``broadcast_divide_fusion``, is
  elementwise work); the rest, elementwise work). XLA runs independent operations on its two threads at once, so
  the per-kind sums can exceed the wall time. The step's scratch memory is its compiled temporaries
  (``memory_analysis().temp_size_in_bytes``).
* torch: ``torch.profiler`` self CPU time per operator over the same number of steps; matmuls are ``aten::mm``,
  ``addmm``, ``bmm`` and the fused attention kernel, the rest is elementwise work and bookkeeping.

    python benchmarks/profile_step.py
    python benchmarks/profile_step.py --layers 1 --vocab 2048 --calls 1 --remat dots --out /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import next_token_loss  # noqa: E402

from mojax.host_memory import keep_freed_host_memory  # noqa: E402
from mojax.models import LlamaForCausalLM, ModelConfig  # noqa: E402
from mojax.models.hf import save_pretrained  # noqa: E402
from mojax.models.llama import REMAT_POLICIES  # noqa: E402
from mojax.testing import benchmark_command, cpu_summary, write_report  # noqa: E402

XLA_KINDS = (
    ("matmul (library)", r"^ynn_fusion|^xnn_fusion|^onednn"),
    ("matmul (Eigen dot)", r"^dot(\.\d+)?$|^dot_"),
    ("stacked writes (dynamic-update-slice)", r"dynamic-update-slice"),
    ("stacked reads (dynamic-slice)", r"dynamic-slice"),
    ("layout copies / transposes", r"^copy|transpose"),
    ("zeroing stacked buffers (broadcast)", r"^wrapped_broadcast|^broadcast(\.\d+)?$"),
)
TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def smollm2_shapes(layers: int, vocab: int = 49152) -> ModelConfig:
    """SmolLM2-135M's architecture with ``layers`` decoder layers (and ``vocab`` tokens, for smoke runs)."""
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )


def xla_kind(op_name: str) -> str:
    """The kind of an XLA:CPU operation from its (fusion) name; elementwise work when no pattern matches."""
    for kind, pattern in XLA_KINDS:
        if re.search(pattern, op_name):
            return kind
    return "elementwise and other"


def ms_by_kind(operations: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{kind: ms per call} of :func:`xla_operation_times`' operations, summed per :func:`xla_kind`, largest first."""
    by_kind: collections.Counter = collections.Counter()
    for name, (ms, _) in operations.items():
        by_kind[xla_kind(name)] += ms
    return dict(by_kind.most_common())


def xla_operation_times(run: Callable[[], None], calls: int) -> tuple[float, dict[str, tuple[float, float]]]:
    """(wall s per call, {XLA operation name: (ms per call, executions per call)}) of ``calls`` traced calls of
    ``run`` (already compiled), from ``jax.profiler``'s events on XLA:CPU's threads (its worker pool and the client
    thread that also runs operations): successive executions of one operation may land on different threads."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        wall = (time.perf_counter() - start) / calls
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    ms: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient")):  # the threads running XLA operations
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "end:", "SlinkyThreadPool")):
                    ms[event.name] += event.duration_ns / 1e6 / calls
                    count[event.name] += 1 / calls
    return wall, {name: (ms[name], count[name]) for name in ms}


def profile_mojax(model, ids: jax.Array, remat: str, calls: int) -> dict:
    """Wall time per step and XLA operation time per kind (ms per step) of the step under policy ``remat``."""
    twin = nnx.eval_shape(lambda: LlamaForCausalLM(model.config, remat=remat, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(twin)[0], nnx.state(model)
    step = jax.jit(jax.value_and_grad(lambda s, i: next_token_loss(nnx.merge(graphdef, s)(i)[0], i)))
    scratch = step.lower(state, ids).compile().memory_analysis().temp_size_in_bytes
    for _ in range(2):
        jax.block_until_ready(step(state, ids))
    wall, operations = xla_operation_times(lambda: jax.block_until_ready(step(state, ids)), calls)
    return {
        "side": f"mojax remat={remat}",
        "wall_ms": wall * 1e3,
        "scratch_mb": scratch / 2**20,
        "kinds_ms": ms_by_kind(operations),
    }


def profile_torch(model, ids: np.ndarray, calls: int) -> dict:
    """Wall time per step and self CPU time per kind (ms per step) of transformers' step on the same weights."""
    import torch
    from transformers import LlamaForCausalLM as TorchLlama

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        torch_model = TorchLlama.from_pretrained(tmp, dtype=torch.float32)
    ids_t = torch.from_numpy(ids.astype(np.int64))

    def step():
        torch_model.zero_grad(set_to_none=True)
        torch_model(input_ids=ids_t, labels=ids_t).loss.backward()

    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        wall = (time.perf_counter() - start) / calls
    by_kind: collections.Counter = collections.Counter()
    for event in prof.key_averages():
        kind = "matmul (library)" if event.key in TORCH_MATMULS else "elementwise and other"
        by_kind[kind] += event.self_cpu_time_total / 1e3 / calls
    return {"side": "torch eager", "wall_ms": wall * 1e3, "kinds_ms": dict(by_kind.most_common())}


def markdown(report: dict) -> str:
    kinds = list(dict.fromkeys(kind for row in report["rows"] for kind in row["kinds_ms"]))
    lines = [
        "# Training step by kind of operation (SmolLM2-135M shapes, fp32 CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average before {report['load_before']}, after {report['load_after']}  ",
        f"Batch {report['batch']} tokens, {report['layers']} layers, {report['calls']} profiled steps per side; "
        "ms per step (operation times summed over both threads, so a column can exceed the wall time).",
        "",
        "| kind | " + " | ".join(row["side"] for row in report["rows"]) + " |",
        "|---|" + "---:|" * len(report["rows"]),
        "| **wall time per step** | " + " | ".join(f"**{row['wall_ms']:.0f}**" for row in report["rows"]) + " |",
    ]
    scratch = [f"{row['scratch_mb']:.0f}" if "scratch_mb" in row else "" for row in report["rows"]]
    lines.append("| scratch MB (XLA temporaries of the step) | " + " | ".join(scratch) + " |")
    for kind in kinds:
        cells = [f"{row['kinds_ms'].get(kind, 0.0):.0f}" for row in report["rows"]]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (smaller for smoke runs)")
    parser.add_argument("--batch", default="4x128", help="B x T tokens")
    parser.add_argument("--calls", type=int, default=3, help="profiled steps per side")
    parser.add_argument("--remat", default="dots,none", help=f"comma-separated policies of {REMAT_POLICIES}")
    parser.add_argument("--no-torch", action="store_true", help="profile mojax alone")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.remat = args.remat.split(",")
    args.shape = tuple(int(v) for v in args.batch.lower().split("x"))
    if set(args.remat) - set(REMAT_POLICIES) or len(args.shape) != 2 or min(args.layers, args.calls, args.vocab) < 1:
        parser.error(f"--remat in {REMAT_POLICIES}, --batch as BxT, --layers, --calls and --vocab >= 1; got {args}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(2)
    report = {
        "command": benchmark_command("benchmarks/profile_step.py", sys.argv[1:] if argv is None else argv),
        "machine": cpu_summary() + f", jax {jax.__version__}, torch {torch.__version__}",
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "batch": args.batch,
        "layers": args.layers,
        "calls": args.calls,
        "rows": [],
    }
    model = LlamaForCausalLM(smollm2_shapes(args.layers, args.vocab), rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=args.shape).astype(np.int32)
    for remat in args.remat:
        report["rows"].append(profile_mojax(model, jnp.asarray(ids), remat, args.calls))
    if not args.no_torch:
        report["rows"].append(profile_torch(model, ids, args.calls))
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = markdown(report)
    print(text)
    write_report(args.out, "profile_step", report, text)
    return report


if __name__ == "__main__":
    keep_freed_host_memory()  # as the mojax command line and the other benchmarks: no page faults per call
    main()
