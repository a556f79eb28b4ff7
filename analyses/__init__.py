"""The MicroEdit paper's studies, one module per study: Section 2 ("why SAE editing": sparsity,
masking, active_random_mutex, entanglement, geometry) and Section 4 (layer_sweep, ard_separation,
ablations; these edit with MicroEdit through :mod:`analyses.editing`).

Every study has a frozen config dataclass (validated on construction, ``ValueError`` on bad values),
``run(model, cfg, sae=None) -> Result`` and ``plot(result, path) -> Path`` (a PNG). The registry
:data:`ANALYSES` maps a name to its :class:`AnalysisSpec`, so a front end (``microedit analyze NAME``)
can run any study without branching on names; :func:`run_analysis` does config + run + plot.

    >>> from analyses import run_analysis
    >>> result, png = run_analysis("masking", model, keep_fractions=(0.05, 0.1))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from analyses import (
    ablations,
    active_random_mutex,
    ard_separation,
    entanglement,
    geometry,
    layer_sweep,
    masking,
    sparsity,
)


@dataclass(frozen=True)
class AnalysisSpec:
    """One registered study."""

    name: str
    config_cls: type
    run: Callable[..., Any]  # (model, cfg, sae=None) -> result with .headline()
    plot: Callable[[Any, Path], Path]
    description: str
    figure: str  # default PNG file name
    uses_sae: bool = False  # True: the study uses an SAE when one is given

    def make_config(self, **overrides: Any) -> Any:
        """The config with ``overrides``; unknown names raise ValueError (listing the valid ones)."""
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for analysis '{self.name}'; valid: {sorted(fields)}")
        return self.config_cls(**overrides)


ANALYSES: dict[str, AnalysisSpec] = {
    spec.name: spec
    for spec in (
        AnalysisSpec("sparsity", sparsity.SparsityConfig, sparsity.run, sparsity.plot,
                     "Fig. 1a: share of MLP neurons above |activation| thresholds, per layer, on knowledge prompts",
                     "fig1a_sparsity.png"),
        AnalysisSpec("masking", masking.MaskingConfig, masking.run, masking.plot,
                     "Fig. 1b: output agreement when only the top-p% MLP neurons per token are kept",
                     "fig1b_masking.png"),
        AnalysisSpec("active_random_mutex", active_random_mutex.ActiveRandomMutexConfig, active_random_mutex.run,
                     active_random_mutex.plot,
                     "Fig. 1c: keep the active neurons vs as many random ones vs only the inactive ones",
                     "fig1c_active_random_mutex.png"),
        AnalysisSpec("entanglement", entanglement.EntanglementConfig, entanglement.run, entanglement.plot,
                     "Fig. 1d-f: semantic similarity vs active-unit overlap of facts, MLP neurons vs SAE latents",
                     "fig1def_entanglement.png", uses_sae=True),
        AnalysisSpec("geometry", geometry.GeometryConfig, geometry.run, geometry.plot,
                     "Fig. 5-6: t-SNE of late-layer residuals of edit vs locality prompts",
                     "fig5_geometry.png"),
        # one SAE per layer from its own cache (run(..., saes=...)), not the single shared SAE
        AnalysisSpec("layer_sweep", layer_sweep.LayerSweepConfig, layer_sweep.run, layer_sweep.plot,
                     "Fig. 3a: Rel/Gen/Loc of the same sequential edits with TopK SAEs at several residual layers",
                     "fig3a_layer_sweep.png"),
        AnalysisSpec("ard_separation", ard_separation.ArdSeparationConfig, ard_separation.run, ard_separation.plot,
                     "Fig. 3b-c: ARD of edited, paraphrase and locality prompts after sequential edits, vs tau",
                     "fig3bc_ard_separation.png", uses_sae=True),
        AnalysisSpec("ablations", ablations.AblationsConfig, ablations.run, ablations.plot,
                     "Fig. 4 + Table 4: inference-k sweep and ablations (no switch, no stage 1, dense codes)",
                     "fig4_k_sweep_ablations.png", uses_sae=True),
    )
}


def get_spec(name: str) -> AnalysisSpec:
    try:
        return ANALYSES[name]
    except KeyError:
        raise KeyError(f"unknown analysis '{name}'; available: {sorted(ANALYSES)}") from None


def run_analysis(
    name: str, model: Any, sae: Any = None, out_dir: str | Path = "docs/figures", *,
    filename: str | None = None, **overrides: Any,
) -> tuple[Any, Path]:
    """Run the study ``name`` with its config built from ``overrides`` and write its figure to
    ``out_dir/filename`` (default: the study's registered file name). Returns (result, png path)."""
    spec = get_spec(name)
    cfg = spec.make_config(**overrides)
    result = spec.run(model, cfg, sae=sae if spec.uses_sae else None)
    path = spec.plot(result, Path(out_dir) / (filename or spec.figure))
    return result, path


__all__ = ["ANALYSES", "AnalysisSpec", "get_spec", "run_analysis"]
