"""Experiment 7: gradient entanglement under DPO-family losses, and whether NPO and shared-prefix masking undo it.

Claim (Yuan et al., "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement",
ICLR 2025, arXiv 2410.13828): a margin loss moves log pi(y_w) and log pi(y_l) through g_w = grad log pi(y_w) and
g_l = grad log pi(y_l) only, so when <g_w, g_l> is large relative to their norms (similar responses: one token
differs, or a long shared part) the two log-probabilities move together (both down, or both up) instead of "chosen
up, rejected down"; the first-order condition predicts the sign pattern; normalising the pair's gradients (NPO) or
masking the tokens the two responses share restores "chosen up, rejected down".

Every run goes through :class:`mojax.rl.dpo.DPOTrainer` (the ``dpo_tiny`` built-in config with this folder's
overrides) on pairs of ``mojax.data.synthetic_sentiment_pairs`` (settings one_token, short_suffix, long_suffix).
Per step the trainer measures, on the first ``preference.entanglement_pairs`` pairs of the batch: the cosine and the
condition ratio <g_w, g_l> / min(|g_w|^2, |g_l|^2) on its probe set (final norm + LM head), the first-order
prediction of the signs of both moves, the observed moves after the AdamW step, and the agreement. This reports
their means over the steps, the share of (step, pair) moves in each sign pattern, and the sign of the total change
of the chosen and rejected log-probs since the start (mean over the last steps of log pi - log pi_ref, the
reference being the initial policy).

    PYTHONPATH=$PWD python experiments/07_gradient_entanglement/run.py          # full: 6 methods x 3 settings x 3 seeds
    PYTHONPATH=$PWD python experiments/07_gradient_entanglement/run.py --quick  # 2 methods, one_token, 1 seed, 2 steps
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from experiments import shared  # noqa: E402

FINAL_STEPS = 3
"""The total change of the log-probs is the mean of this many last steps' batch-mean log pi - log pi_ref."""
PER_STEP = (
    "entanglement/cosine",
    "entanglement/condition",
    "entanglement/predicted_chosen_up_rejected_down",
    "entanglement/observed_chosen_up_rejected_down",
    "entanglement/observed_both_up",
    "entanglement/observed_both_down",
    "entanglement/agreement_chosen",
    "entanglement/agreement_rejected",
    "entanglement/move_chosen",
    "entanglement/move_rejected",
    "rewards/accuracies",
)
"""Metrics of the DPO trainer averaged over the steps of a run."""
TOTALS = ("logratios/chosen", "logratios/rejected")
"""log pi - log pi_ref of the batch, whose last steps give the total change since the start."""


def tiny_text(text: str) -> str:
    """`text` lowercased and kept to the tiny tokenizer's alphabet (other characters dropped, spaces collapsed)."""
    from mojax.rl.tiny import ALPHABET

    kept = "".join(character for character in text.lower() if character in ALPHABET)
    return " ".join(kept.split())


def shorten(row: dict[str, str], shared_words: int | None, tiny_alphabet: bool) -> dict[str, str]:
    """A pair whose shared text is cut to its last `shared_words` words (None: kept), in the tiny alphabet if asked.

    Chosen and rejected start with the same words (the review text, and for one_token the frame "Overall, it was");
    the part where they differ (one word, a short or a long suffix) is kept whole.
    """
    chosen_words, rejected_words = row["chosen"].split(" "), row["rejected"].split(" ")
    common = 0
    while common < min(len(chosen_words), len(rejected_words)) and chosen_words[common] == rejected_words[common]:
        common += 1
    keep = common if shared_words is None else min(common, shared_words)
    cut = common - keep
    pair = {
        "prompt": row["prompt"],
        "chosen": " ".join(chosen_words[cut:]),
        "rejected": " ".join(rejected_words[cut:]),
    }
    return {key: tiny_text(value) for key, value in pair.items()} if tiny_alphabet else pair


def pair_rows(config: dict, setting: str, seed: int) -> list[dict[str, str]]:
    """The experiment's pairs of one setting and seed (``mojax.data.synthetic_sentiment_pairs``, shortened)."""
    from mojax.data import movie_reviews, synthetic_sentiment_pairs

    snippets = [row["text"] for row in movie_reviews()]
    rows = synthetic_sentiment_pairs(snippets, setting, n=config["num_pairs"], seed=seed)
    return [shorten(row, config["shared_words"], config["tiny_alphabet"]) for row in rows]


def make_trainer(overrides: Sequence[str], rows: list[dict[str, str]], *, seed: int, steps: int):
    """A DPOTrainer on the built-in ``dpo_tiny`` config with `overrides` and the pairs `rows`, seeded by `seed`."""
    from mojax.rl.dpo import DPOTrainer, load_dpo_config

    config = load_dpo_config(
        "dpo_tiny",
        [
            f"output_dir={tempfile.mkdtemp()}",
            f"steps={steps}",
            f"seed={seed}",
            f"model.init_seed={seed}",
            "logging.tensorboard=false",
            "logging.progress=false",
            "export=false",
            *overrides,
        ],
    )
    return DPOTrainer(dataclasses.replace(config, data=dataclasses.replace(config.data, pairs=rows)))


def summarize_run(history: Sequence[dict]) -> dict:
    """Means over the steps of :data:`PER_STEP`, the total changes of :data:`TOTALS`, and the per-step series."""
    summary = {key: float(np.nanmean(shared.series(history, key))) for key in PER_STEP}
    summary.update({key: float(np.mean(shared.series(history, key)[-FINAL_STEPS:])) for key in TOTALS})
    summary["series"] = {key: shared.series(history, key).tolist() for key in (*TOTALS, "entanglement/cosine")}
    return summary


SIGN_NAMES = {
    (1, -1): "chosen up, rejected down",
    (1, 1): "both up",
    (-1, -1): "both down",
    (-1, 1): "chosen down, rejected up",
}


def sign_pattern(chosen: float, rejected: float) -> str:
    """The sign pattern of the total changes of the chosen and rejected log-probs."""
    return SIGN_NAMES.get((int(np.sign(chosen)), int(np.sign(rejected))), "no change")


def aggregate(runs: Sequence[dict]) -> dict:
    """Mean and spread over seeds of every scalar, and the sign pattern of each seed's total changes."""
    summary = {key: shared.mean_spread([run[key] for run in runs]) for key in (*PER_STEP, *TOTALS)}
    summary["sign_patterns"] = [sign_pattern(run[TOTALS[0]], run[TOTALS[1]]) for run in runs]
    return summary


def _cell(summary: dict, key: str) -> str:
    """ "mean ± std" of one metric of :func:`aggregate`."""
    return shared.format_mean_spread(summary[key], 2)


def table(summaries: dict) -> str:
    """Markdown table, one row per (setting, method), mean ± std over seeds."""
    header = [
        "setting",
        "method",
        "cosine",
        "condition",
        "total d log pi_w",
        "total d log pi_l",
        "total sign pattern (per seed)",
        "steps: w up, l down",
        "both up",
        "both down",
        "predicted w up, l down",
        "agreement w / l",
    ]
    rows = []
    for setting, methods in summaries.items():
        for method, summary in methods.items():
            cell = functools.partial(_cell, summary)
            rows.append(
                [
                    setting,
                    method,
                    cell("entanglement/cosine"),
                    cell("entanglement/condition"),
                    cell("logratios/chosen"),
                    cell("logratios/rejected"),
                    "; ".join(summary["sign_patterns"]),
                    cell("entanglement/observed_chosen_up_rejected_down"),
                    cell("entanglement/observed_both_up"),
                    cell("entanglement/observed_both_down"),
                    cell("entanglement/predicted_chosen_up_rejected_down"),
                    f"{cell('entanglement/agreement_chosen')} / {cell('entanglement/agreement_rejected')}",
                ]
            )
    return shared.markdown_table(header, rows)


def plot(results: dict, path: Path) -> Path:
    """One panel per setting: log pi - log pi_ref of chosen (solid) and rejected (dashed) over steps, per method."""
    plt = shared.pyplot()
    settings = list(results)
    figure, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.8), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for method, runs in results[setting].items():
            chosen = np.asarray([run["series"]["logratios/chosen"] for run in runs])
            rejected = np.asarray([run["series"]["logratios/rejected"] for run in runs])
            steps = np.arange(1, chosen.shape[1] + 1)
            (line,) = ax.plot(steps, chosen.mean(axis=0), label=method)
            ax.plot(steps, rejected.mean(axis=0), "--", color=line.get_color())
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set(title=f"{setting}: chosen (solid), rejected (dashed)", xlabel="step", ylabel="log pi - log pi_ref")
    axes[0][0].legend(fontsize=7)
    return shared.save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train every method on every setting and seed; write results/gradient_entanglement.json and the plot."""
    experiment = shared.setup(argv, __doc__, HERE)
    config, seeds, steps, folder = experiment.config, experiment.seeds, experiment.steps, experiment.folder
    settings = config["quick_settings" if experiment.quick else "settings"]
    results: dict = {}
    for setting in settings:
        for method, overrides in config["methods"].items():
            for seed in seeds:
                trainer = make_trainer(
                    [*config["base"], *overrides],
                    pair_rows(config, setting, seed),
                    seed=seed,
                    steps=steps,
                )
                history = shared.run_steps(trainer, steps)
                trainer.close()
                results.setdefault(setting, {}).setdefault(method, []).append({"seed": seed, **summarize_run(history)})
    summaries = {
        setting: {method: aggregate(runs) for method, runs in methods.items()} for setting, methods in results.items()
    }
    payload = {
        "claim": "under DPO chosen and rejected log-probs move together when <g_w, g_l> is large relative to the "
        "norms; the first-order condition predicts it; NPO and shared-prefix masking restore chosen up, rejected down",
        "steps": steps,
        "seeds": list(seeds),
        "settings": list(settings),
        "summary": summaries,
        "runs": results,
    }
    path = shared.write_json(folder / "results" / "gradient_entanglement.json", payload)
    png = plot(results, folder / "gradient_entanglement.png")
    print(table(summaries))
    print(f"wrote {path} and {png}")
    return payload


if __name__ == "__main__":
    main()
