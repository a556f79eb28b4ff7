"""Fig. 1a: how sparse are MLP neuron activations on knowledge prompts?

For each layer and each threshold ``t``, the share of (token, neuron) pairs with ``|activation| > t``
at ``blocks.{l}.mlp.hook_post`` (the gated-MLP neuron activation), over the real tokens of a set of
short factual statements (position 0, the attention sink, excluded). Equal to the per-token share of
neurons above ``t`` averaged over tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.common import (
    check_layers_field,
    check_prompts_field,
    collect_mlp_acts,
    new_figure,
    resolve_layers,
    save_figure,
    stat_positions,
    tokenize,
)
from analyses.prompts import KNOWLEDGE_PROMPTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparsityConfig:
    prompts: tuple[str, ...] = KNOWLEDGE_PROMPTS
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    layers: tuple[int, ...] | None = None  # None: every layer
    skip_first: bool = True
    batch_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", check_prompts_field("prompts", self.prompts))
        thresholds = tuple(float(t) for t in self.thresholds)
        if not thresholds or any(t < 0 for t in thresholds):
            raise ValueError(f"thresholds must be a non-empty list of values >= 0, got {self.thresholds}")
        object.__setattr__(self, "thresholds", tuple(sorted(set(thresholds))))
        object.__setattr__(self, "layers", check_layers_field(self.layers))
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True)
class SparsityResult:
    config: SparsityConfig
    layers: tuple[int, ...]
    thresholds: tuple[float, ...]
    share: Float[Tensor, "n_layers n_thresholds"]  # share of neurons with |act| > threshold
    mean_abs: Float[Tensor, " n_layers"]  # mean |activation| per layer
    n_tokens: int
    d_mlp: int

    def headline(self) -> dict[str, float]:
        out: dict[str, float] = {"n_tokens": float(self.n_tokens)}
        mean = self.share.mean(dim=0)
        for j, t in enumerate(self.thresholds):
            out[f"share_above_{t:g}_mean_over_layers"] = float(mean[j])
            out[f"share_above_{t:g}_max_layer"] = float(self.share[:, j].max())
        return out


def run(model: Any, cfg: SparsityConfig, sae: Any = None) -> SparsityResult:
    """Share of MLP neurons above each threshold, per layer (``sae`` is unused)."""
    layers = resolve_layers(model, cfg.layers)
    tokens, mask = tokenize(model, cfg.prompts)
    pos = stat_positions(mask, cfg.skip_first)
    acts = collect_mlp_acts(model, tokens, layers, cfg.batch_size)
    thr = torch.tensor(cfg.thresholds)
    share = torch.empty(len(layers), len(thr))
    mean_abs = torch.empty(len(layers))
    for i, layer in enumerate(layers):
        a = acts[layer][pos].abs()  # [n_tokens, d_mlp]
        share[i] = (a.unsqueeze(-1) > thr).float().mean(dim=(0, 1))
        mean_abs[i] = a.mean()
    n_tokens = int(pos.sum())
    d_mlp = int(next(iter(acts.values())).shape[-1])
    logger.info("sparsity: %d layers, %d tokens, mean share above %g = %.3f", len(layers), n_tokens, cfg.thresholds[0], float(share[:, 0].mean()))
    return SparsityResult(cfg, layers, cfg.thresholds, share, mean_abs, n_tokens, d_mlp)


def plot(result: SparsityResult, path: str | Path) -> Path:
    fig, ax = new_figure(6.5, 4.0)
    for j, t in enumerate(result.thresholds):
        ax.plot(result.layers, (100 * result.share[:, j]).numpy(), marker="o", ms=3, label=f"|act| > {t:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of MLP neurons (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"MLP activation sparsity on knowledge prompts ({result.n_tokens} tokens, d_mlp={result.d_mlp})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
