"""Plain numpy (float64, loops over groups) transcription of the CTWA reference maths (arXiv 2602.06869: the
training signal, the covariance statistics and the interference diagnostics) and of the CTWA repository's reading of PAMA. A test oracle, written for readability."""

from __future__ import annotations

import numpy as np


def reference_signal(adv, mask, logp_new, logp_old, eps_low=0.2, eps_high=0.2, w_agg="mean"):
    """The effective training signal w[b] from token advantages adv[B, T]. Rows without tokens give NaN (0/0)."""
    adv, mask = np.asarray(adv, np.float64), np.asarray(mask, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        seq_adv = (adv * mask).sum(-1) / mask.sum(-1)
        ratio = np.exp(np.clip(np.asarray(logp_new, np.float64) - np.asarray(logp_old, np.float64), -20, 20))
        w = np.empty(adv.shape[0])
        for b in range(adv.shape[0]):
            if seq_adv[b] >= 0:
                unclipped = ratio[b] <= 1 + eps_high
            else:
                unclipped = ratio[b] >= 1 - eps_low
            unclipped = unclipped * mask[b]
            total = np.sum(seq_adv[b] * ratio[b] * unclipped)
            if w_agg == "mean":
                w[b] = total / mask[b].sum()
            elif w_agg == "mean_unclipped":
                w[b] = total / (unclipped.sum() + 1e-8)
            else:
                w[b] = total
    return w


def reference_statistics(rewards, w, uids, global_metrics=False, outlier_factor=100.0, eps=1e-8):
    """The within-group covariance statistics plus the interference diagnostics; dict of float64 arrays."""
    rewards, w = np.asarray(rewards, np.float64), np.asarray(w, np.float64)
    n = rewards.shape[1]
    finite = np.isfinite(w)
    median = float(np.median(np.abs(w[finite]))) if finite.any() else 0.0
    keep = finite & (np.abs(w) <= outlier_factor * median) if median > 0 else finite

    groups: dict[int, list[int]] = {}
    for i in np.nonzero(keep)[0]:
        groups.setdefault(int(uids[i]), []).append(int(i))

    covs, corrs, corr_valid = [], [], []
    pooled_cross, pooled_r2, pooled_w2, pooled_count = np.zeros(n), np.zeros(n), 0.0, 0
    for members in groups.values():
        if len(members) < 2:
            continue
        wc = w[members] - w[members].mean()
        rc = rewards[members] - rewards[members].mean(axis=0)
        cov = (rc * wc[:, None]).mean(axis=0)
        denominator = rc.std(axis=0) * wc.std()
        valid = denominator > eps
        covs.append(cov)
        corrs.append(np.where(valid, cov / np.where(valid, denominator, 1.0), 0.0))
        corr_valid.append(valid)
        pooled_cross += (rc * wc[:, None]).sum(axis=0)
        pooled_r2 += (rc**2).sum(axis=0)
        pooled_w2 += float((wc**2).sum())
        pooled_count += len(members)

    if not covs:
        zeros = np.zeros(n)
        return dict(cov=zeros, corr=zeros, frac_neg=zeros, interference=zeros, num_groups=0)
    covs, corrs, corr_valid = np.array(covs), np.array(corrs), np.array(corr_valid)
    if global_metrics:
        cov = pooled_cross / pooled_count
        denominator = np.sqrt(pooled_r2 / pooled_count) * np.sqrt(pooled_w2 / pooled_count)
        corr = np.where(denominator > eps, cov / np.where(denominator > eps, denominator, 1.0), 0.0)
    else:
        cov = covs.mean(axis=0)
        corr = corrs.sum(axis=0) / np.maximum(corr_valid.sum(axis=0), 1)
    return dict(
        cov=cov,
        corr=corr,
        frac_neg=(covs < 0).mean(axis=0),
        interference=np.maximum(-covs, 0).mean(axis=0),
        num_groups=len(covs),
    )


def reference_controller(log_w, ema, initialized, value, obj_mean, cov_targets, lr, tau, obj_targets=None):
    """The CTWA controller: (log_w, ema) after one step, float64."""
    value = np.asarray(value, np.float64)
    ema = (1 - tau) * np.asarray(ema, np.float64) + tau * value if initialized else value.copy()
    gate = np.ones_like(value)
    if obj_targets is not None:
        gate = np.where(np.asarray(obj_mean) >= np.asarray(obj_targets), 0.0, 1.0)
    deficit = np.maximum(np.asarray(cov_targets, np.float64) - ema, 0.0) * gate
    return np.asarray(log_w, np.float64) + lr * deficit, ema


def reference_pama_port(adv_btn, logp_old, logp_ref, mask, clip):
    """The CTWA repository's PAMA reading: a_i over batch tokens, u = exp(clip(old - ref)), s*."""
    adv_btn = np.asarray(adv_btn, np.float64)
    u = np.exp(np.clip(np.asarray(logp_old, np.float64) - np.asarray(logp_ref, np.float64), -20, 20))
    mask = np.asarray(mask, np.float64)
    a = np.zeros(adv_btn.shape[-1])
    for i in range(adv_btn.shape[-1]):
        a[i] = np.sum(np.maximum(adv_btn[..., i], 0) * (u <= 1 + clip) * mask) / mask.sum()
    if a.min() <= 0 <= a.max():
        s = 0.0
    elif a.min() > 0:
        s = a.min()
    else:
        s = a.max()
    return a, s
