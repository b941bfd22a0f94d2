"""A Hugging Face folder with SmolLM2-135M's (or the 56M) architecture, random weights and the tiny task's characters.

For timing the RL update at the real model's size where the real weights cannot be fetched (a machine with no
network, such as the accelerator of ``benchmarks/gpu.sh``): ``--set model.path=FOLDER`` gives every trainer of
``benchmarks/rl_step.py`` SmolLM2-135M's shapes (``profile_step.smollm2_shapes``: vocabulary 49152, d 576,
30 layers, 9/3 heads, MLP 1536, tied embeddings). The tokenizer is the tiny task's character tokenizer
(``mojax.rl.tiny.character_tokenizer``: ``<pad>``, ``<bos>``, ``<eos>``, then one token per character) with the rest
of the 49152 ids filled by placeholder tokens ``<t34>`` ... that encoding never produces, so the tiny task's prompts
and rewards work unchanged while the policy samples from the whole vocabulary. The weights are random, so only costs
mean anything. ``--shapes 56m`` writes the 56M configuration of ``benchmarks/model.py`` instead (vocabulary 32000,
d 512, 8 layers, 8/4 heads, MLP 1408, untied head): the RL update at the size between the tiny model and SmolLM2.
``--width D`` narrows either architecture to hidden size D, keeping its head size (64), its ratio of query to key-value
heads and its MLP's ratio to the hidden size (SmolLM2's shapes at ``--width 192``: 3/1 heads, MLP 512), for models
between the tiny one and one SmolLM2 layer.

    python benchmarks/smollm2_shaped.py /tmp/smollm2_shaped
    python benchmarks/rl_step.py --n 3 --combiners linear,ctwa,mgda --set model.path=/tmp/smollm2_shaped
    python benchmarks/smollm2_shaped.py /tmp/shaped_56m --shapes 56m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import FULL_SIZES  # noqa: E402
from profile_step import smollm2_shapes  # noqa: E402

from mojax.models import LlamaForCausalLM, ModelConfig, save_pretrained  # noqa: E402
from mojax.rl.tiny import BOS_ID, EOS_ID, PAD_ID, character_tokenizer  # noqa: E402

SHAPES = ("smollm2", "56m")


def shaped_config(
    shapes: str = "smollm2", layers: int | None = None, vocab: int | None = None, width: int | None = None
) -> ModelConfig:
    """The architecture `shapes` names (``"smollm2"`` or ``"56m"``), with `layers` decoder layers, `vocab` tokens and
    hidden size `width` (:func:`narrowed`) when given, and the character tokenizer's special ids."""
    if shapes == "smollm2":
        config = smollm2_shapes(30)
    elif shapes == "56m":
        config = next(config for name, (config, _, _) in FULL_SIZES.items() if name.startswith("56M"))
    else:
        raise ValueError(f"shapes must be one of {SHAPES}; got {shapes!r}")
    if width is not None:
        config = narrowed(config, width)
    return config.replace(
        num_hidden_layers=layers or config.num_hidden_layers,
        vocab_size=vocab or config.vocab_size,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def narrowed(config: ModelConfig, width: int) -> ModelConfig:
    """`config` at hidden size `width`: heads of the same size, as many query heads per key-value head, and the MLP
    as many times wider than the hidden size (rounded down); ValueError unless `width` is a whole number of key-value
    head groups."""
    group = config.head_dim * (config.num_attention_heads // config.num_key_value_heads)
    if width <= 0 or width % group:
        raise ValueError(
            f"width must be a positive multiple of {group} (head size x query heads per key-value head); got {width}"
        )
    heads = width // config.head_dim
    return config.replace(
        hidden_size=width,
        intermediate_size=config.intermediate_size * width // config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=heads * config.num_key_value_heads // config.num_attention_heads,
    )


def write_folder(
    path: Path,
    layers: int | None = None,
    vocab: int | None = None,
    seed: int = 0,
    shapes: str = "smollm2",
    width: int | None = None,
) -> None:
    """Write the folder: ``config.json``, random fp32 ``model.safetensors`` and the padded tokenizer."""
    config = shaped_config(shapes, layers, vocab, width)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    save_pretrained(model, path, tokenizer=character_tokenizer(config.vocab_size))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--shapes", choices=SHAPES, default="smollm2", help="the architecture")
    parser.add_argument(
        "--layers", type=int, help="decoder layers (default: the architecture's; fewer for a smoke run)"
    )
    parser.add_argument(
        "--vocab", type=int, help="vocabulary size (default: the architecture's; smaller for a smoke run)"
    )
    parser.add_argument("--width", type=int, help="hidden size (default: the architecture's; see the docstring)")
    args = parser.parse_args(argv)
    write_folder(args.out, args.layers, args.vocab, shapes=args.shapes, width=args.width)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
