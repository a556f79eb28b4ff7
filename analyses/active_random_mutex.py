"""Fig. 1c: is it *which* neurons are kept that matters, or only how many?

Three interventions at the chosen layers (default: all), per token:

* ``active``: keep only the neurons with ``|activation| > threshold``, zero the rest;
* ``random``: keep the same number of neurons, drawn uniformly at random (seeded);
* ``mutex``: keep only the neurons at or below the threshold (zero the active ones).

Each is scored against the unmodified model with the three agreement metrics (top-1, ordered top-5,
top-5 Jaccard). Position 0 (attention sink) is neither masked nor scored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from analyses.common import (
    Agreement,
    KeepFn,
    agreement,
    check_layers_field,
    check_prompts_field,
    collect_mlp_acts,
    logits_with_neuron_masks,
    new_figure,
    resolve_layers,
    save_figure,
    stat_positions,
    tokenize,
)
from analyses.prompts import KNOWLEDGE_PROMPTS

logger = logging.getLogger(__name__)

CONDITIONS: tuple[str, ...] = ("active", "random", "mutex")


@dataclass(frozen=True)
class ActiveRandomMutexConfig:
    prompts: tuple[str, ...] = KNOWLEDGE_PROMPTS
    # absolute |activation| threshold for every masked layer; 0.1 marks ~39 % of the embedded
    # model's neurons active on average (late layers have larger activations: see Fig. 1a)
    threshold: float = 0.1
    layers: tuple[int, ...] | None = None  # None: every layer
    top_k: int = 5
    seed: int = 0
    skip_first: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", check_prompts_field("prompts", self.prompts))
        if not float(self.threshold) >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        object.__setattr__(self, "layers", check_layers_field(self.layers))
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")


@dataclass(frozen=True)
class ActiveRandomMutexResult:
    config: ActiveRandomMutexConfig
    layers: tuple[int, ...]
    agreements: dict[str, Agreement]  # keyed by CONDITIONS
    active_share: float  # mean share of neurons above the threshold (masked layers, scored tokens)
    n_positions: int

    def headline(self) -> dict[str, float]:
        out: dict[str, float] = {"active_share": self.active_share, "threshold": self.config.threshold, "n_positions": float(self.n_positions)}
        for name in CONDITIONS:
            out.update(self.agreements[name].as_dict(prefix=f"{name}_"))
        return out


def keep_above(threshold: float) -> KeepFn:
    def keep(act: Tensor, layer: int) -> Tensor:
        return act.abs() > threshold

    return keep


def keep_below(threshold: float) -> KeepFn:
    def keep(act: Tensor, layer: int) -> Tensor:
        return act.abs() <= threshold

    return keep


def keep_random_like(threshold: float, seed: int) -> KeepFn:
    """Keep as many neurons per token as are above ``threshold``, chosen uniformly at random. The
    random scores are drawn per layer from ``seed + layer``, so the choice does not depend on the
    order in which hooks run."""

    def keep(act: Tensor, layer: int) -> Tensor:
        n_keep = (act.abs() > threshold).sum(dim=-1, keepdim=True)
        gen = torch.Generator().manual_seed(seed * 100_003 + layer)
        scores = torch.rand(act.shape, generator=gen).to(act.device)
        ranks = scores.argsort(dim=-1).argsort(dim=-1)
        return ranks < n_keep

    return keep


def run(model: Any, cfg: ActiveRandomMutexConfig, sae: Any = None) -> ActiveRandomMutexResult:
    """Agreement of the active / random / mutex interventions with the clean model (``sae`` unused)."""
    layers = resolve_layers(model, cfg.layers)
    tokens, mask = tokenize(model, cfg.prompts)
    pos = stat_positions(mask, cfg.skip_first)
    acts = collect_mlp_acts(model, tokens, layers)
    active_share = float(np.mean([float((acts[l][pos].abs() > cfg.threshold).float().mean()) for l in layers]))
    clean = logits_with_neuron_masks(model, tokens, pos, layers, None)
    rules: dict[str, KeepFn] = {
        "active": keep_above(cfg.threshold),
        "random": keep_random_like(cfg.threshold, cfg.seed),
        "mutex": keep_below(cfg.threshold),
    }
    agreements = {}
    for name in CONDITIONS:
        agreements[name] = agreement(clean, logits_with_neuron_masks(model, tokens, pos, layers, rules[name]), pos, cfg.top_k)
        logger.info("active/random/mutex: %s -> %s", name, agreements[name])
    return ActiveRandomMutexResult(cfg, layers, agreements, active_share, int(pos.sum()))


def plot(result: ActiveRandomMutexResult, path: str | Path) -> Path:
    fig, ax = new_figure(6.5, 4.0)
    k = result.config.top_k
    metrics = ("top1", "topk_exact", "topk_jaccard")
    names = ("top-1", f"top-{k} exact", f"top-{k} Jaccard")
    width = 0.26
    labels = {
        "active": f"active (|act| > {result.config.threshold:g})",
        "random": "random, same count",
        "mutex": "inactive only (mutex)",
    }
    for c, cond in enumerate(CONDITIONS):
        vals = [getattr(result.agreements[cond], m) for m in metrics]
        xs = [i + (c - 1) * width for i in range(len(metrics))]
        bars = ax.bar(xs, vals, width=width, label=labels[cond])
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(range(len(metrics)), labels=names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("agreement with the unmasked model")
    ax.set_title(f"Active vs random vs inactive neurons ({100 * result.active_share:.1f}% active, {len(result.layers)} layers)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)
