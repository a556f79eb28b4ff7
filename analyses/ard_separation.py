"""Fig. 3b-c: does the ARD switch separate edited knowledge from everything else?

For each configured benchmark (default: ZsRE and the hallucination set, one panel each), the first
``n_edits`` records are edited sequentially with MicroEdit (tau calibrated on that benchmark's own
training split, as in ``benchmarks/run_lifelong.sh``) and scored with the WISE protocol. Then the
Average Reconstruction Distance (ARD, the switch's statistic: lower = in scope = spliced) is
measured through the edited SAE for

* the edited prompts (post-edit) and, after ``rollback(0)``, the same prompts pre-edit;
* their paraphrases (post-edit; the hallucination set has none);
* their locality prompts (post-edit).

Reported per benchmark: the ARD arrays, tau, the in-scope rate (ARD <= tau) of each group, and two
AUROCs with lower ARD counted as positive (rank-based Mann-Whitney estimate, ties count 1/2): edited
prompts vs locality prompts and paraphrases vs locality prompts (1 = tau could separate them
perfectly, 0.5 = no separation), plus the pre-edit AUROC of the edited prompts vs locality prompts
(what editing itself adds). Rel/Gen/Loc of the same edits come with it.

Regenerate the figure (embedded model, shipped SAE)::

    python -m analyses.make_figures ard_separation          # docs/figures/fig3bc_ard_separation.png
    microedit analyze ard_separation --set n_edits=50       # the same through the CLI
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from analyses.common import auroc, new_figure, save_figure
from analyses.editing import (
    HALLUCINATION_EDITS,
    HALLUCINATION_REFERENCE,
    ZSRE_EDITS,
    ZSRE_REFERENCE,
    EditScores,
    Overrides,
    check_editor_overrides,
    check_positive_int,
    edit_and_score,
    in_scope_rate,
    load_edit_data,
    load_reference_texts,
    method_config,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArdSeparationConfig:
    datasets: tuple[str, ...] = (ZSRE_EDITS, HALLUCINATION_EDITS)  # one panel each (relative to data_root())
    formats: tuple[str, ...] = ()  # () = detect each file's format; else one per dataset
    references: tuple[str, ...] = (ZSRE_REFERENCE, HALLUCINATION_REFERENCE)  # one per dataset, or one for all
    reference_limit: int = 500  # calibration texts (as `microedit eval`)
    n_edits: int = 50
    editor_overrides: Overrides = ()  # MicroEditConfig fields, e.g. {"stage2_max_steps": 30}
    batch_size: int = 32
    bins: int = 40

    def __post_init__(self) -> None:
        for name in ("datasets", "formats", "references"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.datasets:
            raise ValueError("datasets is empty")
        if self.formats and len(self.formats) != len(self.datasets):
            raise ValueError(f"formats must be empty (detect) or one per dataset, got {len(self.formats)} for {len(self.datasets)}")
        if len(self.references) not in (1, len(self.datasets)):
            raise ValueError(f"references must hold one path, or one per dataset ({len(self.datasets)}), got {len(self.references)}")
        for name in ("reference_limit", "n_edits", "batch_size"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        if check_positive_int("bins", self.bins) < 2:
            raise ValueError("bins must be >= 2")
        object.__setattr__(self, "editor_overrides", check_editor_overrides(self.editor_overrides))

    def reference_for(self, i: int) -> str:
        return self.references[i if len(self.references) > 1 else 0]

    def format_for(self, i: int) -> str | None:
        return self.formats[i] if self.formats else None


@dataclass(frozen=True)
class DatasetSeparation:
    """ARD of the groups of one benchmark's edit records, and how well tau separates them."""

    label: str  # the detected format, e.g. "zsre"
    source: str
    tau: float
    edited_pre: Float[Tensor, " n"]
    edited_post: Float[Tensor, " n"]
    paraphrases: Float[Tensor, " n_para"]  # empty for the hallucination set
    locality: Float[Tensor, " n_loc"]
    in_scope_edited_pre: float
    in_scope_edited: float
    in_scope_paraphrases: float  # NaN without paraphrases
    in_scope_locality: float
    auroc_edited_vs_locality: float
    auroc_paraphrases_vs_locality: float  # NaN without paraphrases
    auroc_edited_pre_vs_locality: float
    scores: EditScores

    def as_dict(self) -> dict[str, float]:
        p = f"{self.label}_"
        return {
            f"{p}tau": self.tau,
            f"{p}in_scope_edited_pre": self.in_scope_edited_pre,
            f"{p}in_scope_edited": self.in_scope_edited,
            f"{p}in_scope_paraphrases": self.in_scope_paraphrases,
            f"{p}in_scope_locality": self.in_scope_locality,
            f"{p}auroc_edited_vs_locality": self.auroc_edited_vs_locality,
            f"{p}auroc_paraphrases_vs_locality": self.auroc_paraphrases_vs_locality,
            f"{p}auroc_edited_pre_vs_locality": self.auroc_edited_pre_vs_locality,
            f"{p}median_ard_edited": _median(self.edited_post),
            f"{p}median_ard_locality": _median(self.locality),
            **self.scores.as_dict(p),
        }


@dataclass(frozen=True)
class ArdSeparationResult:
    config: ArdSeparationConfig
    datasets: tuple[DatasetSeparation, ...]

    def headline(self) -> dict[str, float]:
        out: dict[str, float] = {"n_edits": float(self.config.n_edits)}
        for d in self.datasets:
            out.update(d.as_dict())
        return out


def _median(x: Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return float(finite.median()) if finite.numel() else float("nan")


def in_scope_auroc(in_scope: Tensor, out_of_scope: Tensor) -> float:
    """AUROC of ARD as a detector of in-scope inputs (lower ARD = in scope)."""
    return auroc(-in_scope, -out_of_scope)


def run(model: Any, cfg: ArdSeparationConfig, sae: Any = None) -> ArdSeparationResult:
    """Edit, score and route each configured benchmark in turn (the model is left unedited)."""
    if sae is None:
        raise ValueError("ard_separation needs an SAE (the one MicroEdit edits)")
    out = []
    for i, path in enumerate(cfg.datasets):
        data = load_edit_data(path, cfg.n_edits, cfg.format_for(i))
        refs = load_reference_texts(cfg.reference_for(i), cfg.reference_limit)
        with edit_and_score(model, sae, data.records, method_config(cfg.editor_overrides), refs, batch_size=cfg.batch_size) as er:
            post = er.route()
            er.editor.rollback(0)  # bitwise the unedited decoder
            pre = er.route()
            tau = er.tau
        sep = DatasetSeparation(
            label=data.format, source=str(data.source), tau=tau,
            edited_pre=pre.prompts, edited_post=post.prompts, paraphrases=post.paraphrases, locality=post.locality,
            in_scope_edited_pre=in_scope_rate(pre.prompts, tau), in_scope_edited=in_scope_rate(post.prompts, tau),
            in_scope_paraphrases=in_scope_rate(post.paraphrases, tau), in_scope_locality=in_scope_rate(post.locality, tau),
            auroc_edited_vs_locality=in_scope_auroc(post.prompts, post.locality),
            auroc_paraphrases_vs_locality=in_scope_auroc(post.paraphrases, post.locality),
            auroc_edited_pre_vs_locality=in_scope_auroc(pre.prompts, pre.locality),
            scores=er.scores,
        )
        logger.info("ard_separation %s: tau %.4g, in scope: edited %.2f, paraphrases %.2f, locality %.2f; "
                    "AUROC edited/loc %.3f, para/loc %.3f", sep.label, tau, sep.in_scope_edited,
                    sep.in_scope_paraphrases, sep.in_scope_locality, sep.auroc_edited_vs_locality,
                    sep.auroc_paraphrases_vs_locality)
        out.append(sep)
    return ArdSeparationResult(config=cfg, datasets=tuple(out))


def log_bins(arrays: list[Tensor], n: int) -> np.ndarray:
    """``n + 1`` log-spaced bin edges spanning the finite positive values of ``arrays``."""
    vals = np.concatenate([a[torch.isfinite(a) & (a > 0)].double().numpy() for a in arrays] or [np.zeros(0)])
    if vals.size == 0:
        return np.logspace(-3, 0, n + 1)
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        lo, hi = lo / 2, hi * 2
    return np.logspace(math.log10(lo), math.log10(hi), n + 1)


def plot(result: ArdSeparationResult, path: str | Path) -> Path:
    """One panel per benchmark: overlaid ARD histograms (log x) of the groups, tau as a line."""
    n = len(result.datasets)
    fig, axes = new_figure(6.0 * n, 4.2, 1, n)
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, d in zip(flat, result.datasets):
        groups = [
            (d.edited_pre, f"edited prompts, pre-edit (in scope {d.in_scope_edited_pre:.0%})", "tab:gray"),
            (d.edited_post, f"edited prompts (in scope {d.in_scope_edited:.0%})", "tab:red"),
            (d.paraphrases, f"paraphrases (in scope {d.in_scope_paraphrases:.0%})", "tab:orange"),
            (d.locality, f"locality prompts (in scope {d.in_scope_locality:.0%})", "tab:blue"),
        ]
        groups = [g for g in groups if g[0].numel()]
        edges = log_bins([g[0] for g in groups], result.config.bins)
        for ard, label, color in groups:
            finite = ard[torch.isfinite(ard)].double().numpy()
            ax.hist(np.clip(finite, edges[0], edges[-1]), bins=edges, alpha=0.45, color=color, label=label)
        ax.axvline(d.tau, color="black", linestyle="--", linewidth=1.2, label=f"tau = {d.tau:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("ARD (lower = in scope)")
        ax.set_ylabel("prompts")
        para = "" if math.isnan(d.auroc_paraphrases_vs_locality) else f", para/loc {d.auroc_paraphrases_vs_locality:.3f}"
        ax.set_title(f"{d.label}: {d.scores.n_edits} sequential edits\n"
                     f"AUROC edited/loc {d.auroc_edited_vs_locality:.3f}{para} (pre-edit {d.auroc_edited_pre_vs_locality:.3f})",
                     fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
