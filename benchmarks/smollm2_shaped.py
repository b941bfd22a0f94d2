"""A Hugging Face folder with SmolLM2-135M's architecture, random weights and the tiny task's characters.

For timing the RL update at the real model's size where the real weights cannot be fetched (a machine with no
network, such as the accelerator of ``benchmarks/gpu.sh``): ``--set model.path=FOLDER`` gives every trainer of
``benchmarks/rl_step.py`` SmolLM2-135M's shapes (``profile_step.smollm2_shapes``: vocabulary 49152, d 576,
30 layers, 9/3 heads, MLP 1536, tied embeddings). The tokenizer is the tiny task's character tokenizer
(``mojax.rl.tiny.character_tokenizer``: ``<pad>``, ``<bos>``, ``<eos>``, then one token per character) with the rest
of the 49152 ids filled by placeholder tokens ``<t34>`` ... that encoding never produces, so the tiny task's prompts
and rewards work unchanged while the policy samples from the whole vocabulary. The weights are random, so only costs
mean anything.

    python benchmarks/smollm2_shaped.py /tmp/smollm2_shaped
    python benchmarks/rl_step.py --n 3 --combiners linear,ctwa,mgda --set model.path=/tmp/smollm2_shaped
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import smollm2_shapes  # noqa: E402

from mojax.models import LlamaForCausalLM, save_pretrained  # noqa: E402
from mojax.rl.tiny import BOS_ID, EOS_ID, PAD_ID, character_tokenizer  # noqa: E402


def write_folder(path: Path, layers: int = 30, vocab: int = 49152, seed: int = 0) -> None:
    """Write the folder: ``config.json``, random fp32 ``model.safetensors`` and the padded tokenizer."""
    config = smollm2_shapes(layers, vocab).replace(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    save_pretrained(model, path, tokenizer=character_tokenizer(vocab))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (fewer for a smoke run)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (smaller for a smoke run)")
    args = parser.parse_args(argv)
    write_folder(args.out, args.layers, args.vocab)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
