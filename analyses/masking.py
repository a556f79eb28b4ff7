"""Fig. 1b: do the few most active MLP neurons carry the output?

At the chosen layers (default: all), each token keeps only its top ``p`` fraction of MLP neurons by
``|activation|`` (``blocks.{l}.mlp.hook_post``) and the rest are zeroed; the next-token predictions
are compared with the unmodified model's (top-1 agreement, ordered top-5 agreement, Jaccard of the
top-5 sets) as ``p`` varies. As a floor, the same metrics with *every* neuron of those layers zeroed
(``p = 0``): the agreement that survives without the MLPs at all. Position 0 (attention sink) is
neither masked nor scored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.common import (
    Agreement,
    KeepFn,
    agreement,
    check_layers_field,
    check_prompts_field,
    logits_with_neuron_masks,
    new_figure,
    resolve_layers,
    save_figure,
    stat_positions,
    tokenize,
)
from analyses.prompts import KNOWLEDGE_PROMPTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskingConfig:
    prompts: tuple[str, ...] = KNOWLEDGE_PROMPTS
    keep_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75)
    layers: tuple[int, ...] | None = None  # None: every layer
    top_k: int = 5
    skip_first: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", check_prompts_field("prompts", self.prompts))
        fr = tuple(float(p) for p in self.keep_fractions)
        if not fr or any(not 0.0 < p <= 1.0 for p in fr):
            raise ValueError(f"keep_fractions must be non-empty values in (0, 1], got {self.keep_fractions}")
        object.__setattr__(self, "keep_fractions", tuple(sorted(set(fr))))
        object.__setattr__(self, "layers", check_layers_field(self.layers))
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")


@dataclass(frozen=True)
class MaskingResult:
    config: MaskingConfig
    layers: tuple[int, ...]
    keep_fractions: tuple[float, ...]
    top1: Float[Tensor, " n_fractions"]
    topk_exact: Float[Tensor, " n_fractions"]
    topk_jaccard: Float[Tensor, " n_fractions"]
    zeroed: Agreement  # every neuron at the masked layers zeroed (the floor)
    n_positions: int

    def agreement_at(self, i: int) -> Agreement:
        return Agreement(float(self.top1[i]), float(self.topk_exact[i]), float(self.topk_jaccard[i]), self.config.top_k)

    def headline(self) -> dict[str, float]:
        out: dict[str, float] = {"n_positions": float(self.n_positions), "n_layers_masked": float(len(self.layers))}
        for i, p in enumerate(self.keep_fractions):
            out.update(self.agreement_at(i).as_dict(prefix=f"keep_{100 * p:g}pct_"))
        out.update(self.zeroed.as_dict(prefix="all_zeroed_"))
        hit = [p for i, p in enumerate(self.keep_fractions) if float(self.top1[i]) >= 0.9]
        out["min_keep_fraction_for_top1_ge_0.9"] = min(hit) if hit else float("nan")
        return out


def keep_top_fraction(fraction: float) -> KeepFn:
    """Keep, per token, the ``ceil(fraction * d_mlp)`` neurons with the largest ``|activation|``."""

    def keep(act: Tensor, layer: int) -> Tensor:
        n_keep = max(1, math.ceil(fraction * act.shape[-1]))
        idx = act.abs().topk(n_keep, dim=-1).indices
        return torch.zeros_like(act, dtype=torch.bool).scatter_(-1, idx, True)

    return keep


def keep_none(act: Tensor, layer: int) -> Tensor:
    """Zero every neuron."""
    return torch.zeros_like(act, dtype=torch.bool)


def run(model: Any, cfg: MaskingConfig, sae: Any = None) -> MaskingResult:
    """Agreement with the clean model when only the top-p% neurons survive (``sae`` is unused)."""
    layers = resolve_layers(model, cfg.layers)
    tokens, mask = tokenize(model, cfg.prompts)
    pos = stat_positions(mask, cfg.skip_first)
    clean = logits_with_neuron_masks(model, tokens, pos, layers, None)
    rows = []
    for p in cfg.keep_fractions:
        masked = logits_with_neuron_masks(model, tokens, pos, layers, keep_top_fraction(p))
        rows.append(agreement(clean, masked, pos, cfg.top_k))
        logger.info("masking: keep %.3g -> %s", p, rows[-1])
    zeroed = agreement(clean, logits_with_neuron_masks(model, tokens, pos, layers, keep_none), pos, cfg.top_k)
    return MaskingResult(
        config=cfg, layers=layers, keep_fractions=cfg.keep_fractions,
        top1=torch.tensor([r.top1 for r in rows]),
        topk_exact=torch.tensor([r.topk_exact for r in rows]),
        topk_jaccard=torch.tensor([r.topk_jaccard for r in rows]),
        zeroed=zeroed, n_positions=int(pos.sum()),
    )


def plot(result: MaskingResult, path: str | Path) -> Path:
    fig, ax = new_figure(6.5, 4.0)
    x = [100 * p for p in result.keep_fractions]
    k = result.config.top_k
    ax.plot(x, result.top1.numpy(), marker="o", label="top-1 agreement")
    ax.plot(x, result.topk_exact.numpy(), marker="s", label=f"top-{k} exact (ordered)")
    ax.plot(x, result.topk_jaccard.numpy(), marker="^", label=f"top-{k} Jaccard")
    ax.axhline(result.zeroed.top1, color="C0", ls=":", lw=1, label=f"top-1, all neurons zeroed ({result.zeroed.top1:.2f})")
    ax.axhline(result.zeroed.topk_jaccard, color="C2", ls=":", lw=1, label=f"top-{k} Jaccard, all zeroed ({result.zeroed.topk_jaccard:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("neurons kept per token (%, by |activation|)")
    ax.set_ylabel("agreement with the unmasked model")
    ax.set_ylim(0, 1.02)
    n_l = len(result.layers)
    where = f"all {n_l} layers" if result.config.layers is None else (
        f"layer{'s' if n_l > 1 else ''} {', '.join(map(str, result.layers))}" if n_l <= 4 else f"{n_l} layers")
    ax.set_title(f"Keep only the top-p% MLP neurons at {where} ({result.n_positions} positions)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
