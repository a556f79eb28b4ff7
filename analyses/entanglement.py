"""Fig. 1d-f: do unrelated facts share active units? MLP neurons vs SAE latents.

For a set of knowledge statements (two per topic: same topic = related pair, different topic =
unrelated pair; the default set contains the paper's example "Bananas contain high amounts of
potassium" vs "The Sun revolves around the Earth in geocentric models"):

* **semantic similarity** (Fig. 1d): cosine of the model's own residual stream at a late layer
  (``blocks.{layer}.hook_resid_post``), mean-pooled over positions >= 1;
* **activation overlap** (Fig. 1e-f): Jaccard index (IoU) of the *sets of active units*

  - for MLP neurons at ``blocks.{layer}.mlp.hook_post``. A neuron is active for a token when it is
    among the token's ``neuron_k`` largest ``|activation|`` (``neuron_rule="topk"``, the default:
    the same fixed budget of active units per token as a TopK SAE, so the sets are comparable and
    no layer-specific threshold is needed) or when ``|activation| > neuron_threshold``
    (``neuron_rule="threshold"``);
  - for SAE latents: the TopK active set (``sae.encode(x) > 0``) at the SAE's hook.

  Two matrices per unit type: **token-averaged** (for statements i != j, the mean IoU over all pairs
  of a token of i and a token of j; the diagonal is the mean over pairs of *distinct* tokens of the
  same statement, so it is below 1) and **last token** (IoU of the active sets at each statement's
  last token; unit diagonal).

The core claim is measured as the mean overlap over unrelated pairs, for neurons and SAE latents,
next to the chance level (expected IoU of random sets of the same sizes: neurons and latents have
different widths and set sizes, so raw IoUs are compared through this baseline as well).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.common import (
    chance_jaccard,
    check_prompts_field,
    collect_activations,
    cosine_matrix,
    heatmap,
    hook_layer,
    jaccard_matrix,
    last_positions,
    late_layer,
    mean_pooled,
    mlp_hook_name,
    new_figure,
    pair_mean,
    resid_hook_name,
    save_figure,
    short_label,
    stat_positions,
    tokenize,
)
from analyses.prompts import ENTANGLEMENT_STATEMENTS, ENTANGLEMENT_TOPICS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntanglementConfig:
    statements: tuple[str, ...] = ENTANGLEMENT_STATEMENTS
    topics: tuple[str, ...] = ENTANGLEMENT_TOPICS  # same topic = related pair
    layer: int | None = None  # None: the SAE's layer when an SAE is given, else the 80 %-depth layer
    neuron_rule: Literal["topk", "threshold"] = "topk"
    neuron_k: int = 32
    neuron_threshold: float = 0.5
    skip_first: bool = True
    highlight: tuple[int, int] = (0, 2)  # the paper's unrelated example pair (bananas vs geocentric Sun)

    def __post_init__(self) -> None:
        object.__setattr__(self, "statements", check_prompts_field("statements", self.statements, minimum=2))
        object.__setattr__(self, "topics", tuple(self.topics))
        if len(self.topics) != len(self.statements):
            raise ValueError(f"topics ({len(self.topics)}) must label every statement ({len(self.statements)})")
        if self.neuron_rule not in ("topk", "threshold"):
            raise ValueError(f"neuron_rule must be 'topk' or 'threshold', got {self.neuron_rule!r}")
        if self.neuron_k < 1:
            raise ValueError("neuron_k must be >= 1")
        if not float(self.neuron_threshold) >= 0:
            raise ValueError("neuron_threshold must be >= 0")
        object.__setattr__(self, "highlight", tuple(int(x) for x in self.highlight))
        if len(self.highlight) != 2:
            raise ValueError(f"highlight must be a pair of statement indices, got {self.highlight}")
        i, j = self.highlight
        if not (0 <= i < len(self.statements) and 0 <= j < len(self.statements)) or i == j:
            raise ValueError(f"highlight must be two distinct statement indices, got {self.highlight}")

    def related_pairs(self) -> list[tuple[int, int]]:
        n = len(self.statements)
        return [(i, j) for i in range(n) for j in range(i + 1, n) if self.topics[i] == self.topics[j]]

    def unrelated_pairs(self) -> list[tuple[int, int]]:
        n = len(self.statements)
        return [(i, j) for i in range(n) for j in range(i + 1, n) if self.topics[i] != self.topics[j]]


@dataclass(frozen=True)
class UnitOverlap:
    """Overlap of active-unit sets for one unit type (MLP neurons or SAE latents)."""

    unit: str  # "neurons" or "sae_latents"
    hook_name: str
    width: int  # number of units
    mean_active: float  # mean active units per token
    tokens: Float[Tensor, "n n"]  # token-averaged IoU (diagonal: distinct tokens of one statement)
    last: Float[Tensor, "n n"]  # IoU at the last token (unit diagonal)
    chance: float  # expected IoU of two random sets of mean_active units
    unrelated_tokens: float
    unrelated_last: float
    related_tokens: float
    related_last: float
    highlight_tokens: float
    highlight_last: float

    def as_dict(self) -> dict[str, float]:
        p = self.unit
        return {
            f"{p}_width": float(self.width),
            f"{p}_mean_active": self.mean_active,
            f"{p}_chance_overlap": self.chance,
            f"{p}_unrelated_overlap_tokens": self.unrelated_tokens,
            f"{p}_unrelated_overlap_last": self.unrelated_last,
            f"{p}_related_overlap_tokens": self.related_tokens,
            f"{p}_related_overlap_last": self.related_last,
            f"{p}_unrelated_over_chance_tokens": self.unrelated_tokens / self.chance if self.chance > 0 else float("nan"),
            f"{p}_highlight_pair_overlap_tokens": self.highlight_tokens,
            f"{p}_highlight_pair_overlap_last": self.highlight_last,
        }


@dataclass(frozen=True)
class EntanglementResult:
    config: EntanglementConfig
    layer: int
    semantic: Float[Tensor, "n n"]
    neurons: UnitOverlap
    sae: UnitOverlap | None  # None when no SAE was given
    semantic_related: float
    semantic_unrelated: float

    @property
    def mean_unrelated_overlap_neurons(self) -> float:
        return self.neurons.unrelated_tokens

    @property
    def mean_unrelated_overlap_sae(self) -> float | None:
        return None if self.sae is None else self.sae.unrelated_tokens

    def headline(self) -> dict[str, float]:
        out: dict[str, float] = {
            "layer": float(self.layer),
            "semantic_related_mean": self.semantic_related,
            "semantic_unrelated_mean": self.semantic_unrelated,
        }
        out.update(self.neurons.as_dict())
        if self.sae is not None:
            out.update(self.sae.as_dict())
        return out


def neuron_active_sets(acts: Float[Tensor, "... d_mlp"], rule: str, k: int, threshold: float) -> Bool[Tensor, "... d_mlp"]:
    """Active neurons by the configured rule (top-k by |act|, or |act| above a threshold)."""
    if rule == "topk":
        idx = acts.abs().topk(min(k, acts.shape[-1]), dim=-1).indices
        return torch.zeros_like(acts, dtype=torch.bool).scatter_(-1, idx, True)
    return acts.abs() > threshold


def sae_active_sets(sae: Any, resid: Float[Tensor, "... d_in"]) -> Bool[Tensor, "... d_sae"]:
    """The SAE's active latents (``sae.encode(x) > 0``; for a TopK SAE at most k per token)."""
    param = next(sae.parameters())
    with torch.no_grad():
        feats = sae.encode(resid.to(device=param.device, dtype=param.dtype))
    return (feats > 0).cpu()


def token_averaged_overlap(sets: list[Bool[Tensor, "t d"]]) -> Float[Tensor, "n n"]:
    """Mean token-pair IoU between statements; diagonal over distinct token pairs (1 for one token)."""
    n = len(sets)
    out = torch.empty(n, n)
    for i in range(n):
        for j in range(i, n):
            m = jaccard_matrix(sets[i], sets[j])
            if i == j:
                t = m.shape[0]
                out[i, i] = 1.0 if t == 1 else (m.sum() - m.diagonal().sum()) / (t * (t - 1))
            else:
                out[i, j] = out[j, i] = m.mean()
    return out


def _unit_overlap(unit: str, hook: str, per_statement: list[Bool[Tensor, "t d"]], last: Bool[Tensor, "n d"], cfg: EntanglementConfig) -> UnitOverlap:
    width = int(last.shape[-1])
    mean_active = float(torch.cat(per_statement).float().sum(-1).mean())
    k = min(width, max(0, round(mean_active)))
    tok = token_averaged_overlap(per_statement)
    lst = jaccard_matrix(last)
    un, rel = cfg.unrelated_pairs(), cfg.related_pairs()
    hi = [cfg.highlight]
    return UnitOverlap(
        unit=unit, hook_name=hook, width=width, mean_active=mean_active, tokens=tok, last=lst,
        chance=chance_jaccard(k, k, width),
        unrelated_tokens=pair_mean(tok, un), unrelated_last=pair_mean(lst, un),
        related_tokens=pair_mean(tok, rel), related_last=pair_mean(lst, rel),
        highlight_tokens=pair_mean(tok, hi), highlight_last=pair_mean(lst, hi),
    )


def run(model: Any, cfg: EntanglementConfig, sae: Any = None) -> EntanglementResult:
    """Semantic similarity and active-set overlaps (neurons, and SAE latents when ``sae`` is given)."""
    sae_hook = None if sae is None else sae.cfg.metadata.hook_name
    layer = cfg.layer
    if layer is None and sae_hook is not None:
        layer = hook_layer(sae_hook)
    layer = late_layer(model, layer)
    if sae_hook is not None and hook_layer(sae_hook) != layer:
        logger.warning("entanglement: neurons/semantics at layer %d, SAE at %s", layer, sae_hook)
    tokens, mask = tokenize(model, cfg.statements)
    pos = stat_positions(mask, cfg.skip_first)
    hooks = [resid_hook_name(layer), mlp_hook_name(layer)] + ([sae_hook] if sae_hook else [])
    acts = collect_activations(model, tokens, hooks)
    resid, mlp = acts[resid_hook_name(layer)], acts[mlp_hook_name(layer)]
    n = len(cfg.statements)
    last = last_positions(mask)
    rows = torch.arange(n)

    semantic = cosine_matrix(mean_pooled(resid, pos))
    neuron_sets = neuron_active_sets(mlp, cfg.neuron_rule, cfg.neuron_k, cfg.neuron_threshold)
    neurons = _unit_overlap("neurons", mlp_hook_name(layer), [neuron_sets[i][pos[i]] for i in range(n)], neuron_sets[rows, last], cfg)
    sae_overlap = None
    if sae is not None and sae_hook is not None:
        latent_sets = sae_active_sets(sae, acts[sae_hook])
        sae_overlap = _unit_overlap("sae_latents", sae_hook, [latent_sets[i][pos[i]] for i in range(n)], latent_sets[rows, last], cfg)
    result = EntanglementResult(
        config=cfg, layer=layer, semantic=semantic, neurons=neurons, sae=sae_overlap,
        semantic_related=pair_mean(semantic, cfg.related_pairs()),
        semantic_unrelated=pair_mean(semantic, cfg.unrelated_pairs()),
    )
    logger.info("entanglement: unrelated overlap neurons %.3f, SAE %s", neurons.unrelated_tokens,
                "n/a" if sae_overlap is None else f"{sae_overlap.unrelated_tokens:.3f}")
    return result


def plot(result: EntanglementResult, path: str | Path) -> Path:
    """Heatmaps: semantic similarity, then token-averaged and last-token IoU for neurons (and SAE
    latents). The token-averaged panels share one colour scale so neurons and latents compare."""
    labels = [short_label(s) for s in result.config.statements]
    cfg = result.config
    nrule = f"top-{cfg.neuron_k} |act|" if cfg.neuron_rule == "topk" else f"|act| > {cfg.neuron_threshold:g}"
    units = [(result.neurons, f"neurons L{result.layer} ({nrule})")]
    if result.sae is not None:
        units.append((result.sae, f"SAE latents ({result.sae.width}, ~{result.sae.mean_active:.0f} active)"))
    tok_max = max(float(u.tokens.max()) for u, _ in units)
    # (matrix, title, vmax)
    panels: list[tuple[Tensor, str, float]] = [(result.semantic, f"semantic similarity (cos, resid L{result.layer})", 1.0)]
    for u, name in units:
        panels.append((u.tokens, f"{name}, token-avg IoU\nunrelated {u.unrelated_tokens:.3f} (chance {u.chance:.4f})", tok_max))
        panels.append((u.last, f"{name}, last-token IoU\nunrelated {u.unrelated_last:.3f}", 1.0))
    ncols = 3 if len(panels) > 3 else len(panels)
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = new_figure(5.2 * ncols, 4.8 * nrows, nrows, ncols)
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (m, title, vmax) in zip(flat, panels):
        heatmap(ax, m, labels, title, vmin=min(0.0, float(m.min())), vmax=vmax)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    return save_figure(fig, path)
