"""Fig. 4 (sparsity k sweep) and Table 4 (ablations): MicroEdit variants on the same N edits.

Every variant edits the first ``n_edits`` records of one benchmark (default ZsRE) sequentially,
calibrates tau on the reference text itself (the ARD scale changes with the codes) and is scored with
the WISE protocol after the last edit. Variants (:data:`ABLATIONS`, chosen by ``variants``):

* ``full``: MicroEdit as configured (``editor_overrides`` on top of the defaults);
* ``no_switch``: the same edits scored with the switch always on (``SwitchMode.ALWAYS``: every input
  gets the SAE reconstruction). Edits are made with the switch detached, so this variant re-scores
  the ``full`` edits instead of making them again;
* ``no_stage1``: no distance-regularisation stage (``MicroEditConfig(stage1_max_steps=0)``);
* ``no_topk``: dense codes. **An inference-time emulation**: no ReLU SAE was trained for the model,
  so a copy of the TopK SAE is run with inference ``k = dense_k`` (default ``d_sae // 4``): its
  encoder keeps the ``dense_k`` largest pre-activations, ReLU'd, so many more latents fire (and are
  trained by each edit) than the SAE was trained with; reconstructions are worse than a genuinely
  trained dense SAE's would be.

The **k sweep** (``k_values``) likewise changes only the *inference* k of a copy of the SAE
(``cfg.k`` and its ``TopK`` activation; the editor reads ``sae.cfg.k`` for its codes). The shipped
SAE was trained with k = 32, so k != 32 measures how MicroEdit copes with a mismatched sparsity, not
an SAE trained at that k: a properly trained-per-k sweep needs one SAE per k (``microedit train-sae
--k K``). The k equal to the SAE's own k is the ``full`` variant (run once).

Each row reports Rel, Gen, Loc, their average, seconds per edit, the share of paraphrases and of
locality prompts the switch splices in the variant's mode (``ALWAYS``: 1 by definition; ``AUTO``: ARD
<= tau) and the mean number of active latents per reference token.

Regenerate the figure (embedded model, shipped SAE)::

    python -m analyses.make_figures ablations               # docs/figures/fig4_k_sweep_ablations.png
    microedit analyze ablations --set n_edits=50 --set 'k_values=[16,32,64]'
"""

from __future__ import annotations

import copy
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from analyses.common import new_figure, save_figure
from analyses.editing import (
    SCORE_METRICS,
    ZSRE_EDITS,
    ZSRE_REFERENCE,
    Overrides,
    check_editor_overrides,
    check_positive_int,
    edit_and_score,
    load_edit_data,
    load_reference_texts,
    method_config,
    score_bars,
)
from microedit_lens.switch import SwitchMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ablation:
    """How one ablation differs from MicroEdit as configured."""

    description: str
    mode: SwitchMode = SwitchMode.AUTO  # switch mode while scoring
    config_changes: Overrides = ()  # MicroEditConfig fields set on top of the study's overrides
    dense_codes: bool = False  # run with inference k = the study's dense k


ABLATIONS: Mapping[str, Ablation] = MappingProxyType({
    "full": Ablation("MicroEdit"),
    "no_switch": Ablation("w/o switch (always spliced)", mode=SwitchMode.ALWAYS),
    "no_stage1": Ablation("w/o stage 1 (distance regularisation)", config_changes=(("stage1_max_steps", 0),)),
    "no_topk": Ablation("w/o TopK (dense codes, emulated)", dense_codes=True),
})


@dataclass(frozen=True)
class AblationsConfig:
    data: str = ZSRE_EDITS  # relative to data_root() unless absolute
    data_format: str | None = None  # None: detect
    reference: str = ZSRE_REFERENCE
    reference_limit: int = 500
    n_edits: int = 50
    variants: tuple[str, ...] = tuple(ABLATIONS)
    k_values: tuple[int, ...] = (8, 16, 32, 64, 128)  # inference k of the k sweep; () = no sweep
    dense_k: int | None = None  # inference k of "no_topk"; None: d_sae // 4
    # MicroEditConfig fields for every variant; the ablations are of the paper's two Adam stages, so
    # the row update is the projected one (the default minimal update has no stage 1 to remove), with
    # neither the floor nor the scope ceiling (not the paper's)
    editor_overrides: Overrides = (("keep_floor", None), ("keep_scope", None), ("row_update", "projected"))
    batch_size: int = 32

    def __post_init__(self) -> None:
        variants = (self.variants,) if isinstance(self.variants, str) else tuple(self.variants)
        unknown = [v for v in variants if v not in ABLATIONS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {list(ABLATIONS)}")
        object.__setattr__(self, "variants", tuple(dict.fromkeys(variants)))
        ks = tuple(sorted({check_positive_int("k_values entry", k) for k in self.k_values}))
        object.__setattr__(self, "k_values", ks)
        if not self.variants and not self.k_values:
            raise ValueError("nothing to run: variants and k_values are both empty")
        if self.dense_k is not None:
            object.__setattr__(self, "dense_k", check_positive_int("dense_k", self.dense_k))
        for name in ("reference_limit", "n_edits", "batch_size"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        object.__setattr__(self, "editor_overrides", check_editor_overrides(self.editor_overrides))


@dataclass(frozen=True)
class Variant:
    """One concrete run: an ablation or a k-sweep point, resolved against the SAE."""

    name: str
    kind: str  # "ablation" or "k_sweep"
    description: str
    mode: SwitchMode
    config_changes: Overrides
    k: int  # inference k

    @property
    def edit_key(self) -> tuple[Overrides, int]:
        """What the edits depend on (the switch mode only matters while scoring)."""
        return self.config_changes, self.k


@dataclass(frozen=True)
class AblationRow:
    name: str
    kind: str
    description: str
    k: int
    mode: str
    reliability: float
    generalization: float
    locality: float
    average: float
    seconds_per_edit: float
    spliced_paraphrases: float  # share of paraphrases the switch splices in this mode
    spliced_locality: float
    tau: float
    l0_reference: float  # mean active latents per reference token

    def as_dict(self) -> dict[str, float]:
        p = f"{self.name}_"
        return {
            f"{p}k": float(self.k), f"{p}reliability": self.reliability, f"{p}generalization": self.generalization,
            f"{p}locality": self.locality, f"{p}average": self.average, f"{p}seconds_per_edit": self.seconds_per_edit,
            f"{p}spliced_paraphrases": self.spliced_paraphrases, f"{p}spliced_locality": self.spliced_locality,
            f"{p}tau": self.tau, f"{p}l0_reference": self.l0_reference,
        }


@dataclass(frozen=True)
class AblationsResult:
    config: AblationsConfig
    dataset: str
    trained_k: int
    d_sae: int
    dense_k: int
    rows: tuple[AblationRow, ...] = field(default=())

    def row(self, name: str) -> AblationRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row '{name}'; rows: {[r.name for r in self.rows]}")

    def of_kind(self, kind: str) -> tuple[AblationRow, ...]:
        return tuple(r for r in self.rows if r.kind == kind)

    def headline(self) -> dict[str, float]:
        out = {"n_edits": float(self.config.n_edits), "trained_k": float(self.trained_k), "dense_k": float(self.dense_k)}
        for r in self.rows:
            out.update(r.as_dict())
        return out

    def to_markdown(self) -> str:
        head = ("| Variant | k | Rel. | Gen. | Loc. | Avg. | s/edit | paraphrases spliced | locality spliced |\n"
                "|---|---|---|---|---|---|---|---|---|")
        lines = [f"| {r.description} | {r.k} | {r.reliability:.2f} | {r.generalization:.2f} | {r.locality:.2f} | "
                 f"{r.average:.2f} | {r.seconds_per_edit:.2f} | {r.spliced_paraphrases:.2f} | {r.spliced_locality:.2f} |"
                 for r in self.rows]
        return "\n".join([head, *lines]) + "\n"


def with_inference_k(sae: Any, k: int) -> Any:
    """A copy of a SAELens TopK SAE whose encoder keeps ``k`` latents per token: both ``cfg.k`` (read
    by the editor and the switch) and the ``TopK`` activation module (built from ``cfg.k`` when the
    SAE is constructed, so it must be rebuilt) change. The weights are those of ``sae``."""
    if not 1 <= k <= sae.cfg.d_sae:
        raise ValueError(f"k must be in [1, d_sae={sae.cfg.d_sae}], got {k}")
    out = copy.deepcopy(sae)
    out.cfg.k = int(k)
    out.activation_fn = out.get_activation_fn()
    return out


def resolve_dense_k(cfg: AblationsConfig, d_sae: int) -> int:
    """The inference k of ``no_topk``: ``cfg.dense_k``, or ``d_sae // 4``."""
    return cfg.dense_k if cfg.dense_k is not None else max(1, d_sae // 4)


def build_variants(cfg: AblationsConfig, trained_k: int, d_sae: int) -> list[Variant]:
    dense_k = resolve_dense_k(cfg, d_sae)
    out = []
    for name in cfg.variants:
        a = ABLATIONS[name]
        out.append(Variant(name, "ablation", a.description, a.mode, a.config_changes, dense_k if a.dense_codes else trained_k))
    out += [Variant(f"k{k}", "k_sweep", f"k = {k}" + (" (trained)" if k == trained_k else " (inference only)"),
                    SwitchMode.AUTO, (), k) for k in cfg.k_values]
    bad = [v.name for v in out if not 1 <= v.k <= d_sae]
    if bad:
        raise ValueError(f"variant(s) {bad} need k <= d_sae = {d_sae}")
    return out


def run(model: Any, cfg: AblationsConfig, sae: Any = None) -> AblationsResult:
    """Run every variant; variants whose edits are identical (same config changes and k) share one
    editing run and are only scored separately."""
    if sae is None:
        raise ValueError("ablations needs an SAE (the one MicroEdit edits)")
    trained_k, d_sae = int(sae.cfg.k), int(sae.cfg.d_sae)
    variants = build_variants(cfg, trained_k, d_sae)
    data = load_edit_data(cfg.data, cfg.n_edits, cfg.data_format)
    refs = load_reference_texts(cfg.reference, cfg.reference_limit)
    groups: dict[tuple[Overrides, int], list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.edit_key, []).append(v)
    rows: dict[str, AblationRow] = {}
    for (changes, k), members in groups.items():
        logger.info("ablations: %s (k=%d, %s)", ", ".join(v.name for v in members), k, dict(changes) or "defaults")
        sae_k = sae if k == trained_k else with_inference_k(sae, k)
        conf = method_config(cfg.editor_overrides, **dict(changes))
        with edit_and_score(model, sae_k, data.records, conf, refs, mode=members[0].mode, batch_size=cfg.batch_size) as er:
            routed = er.route()
            rate = er.editor.latent_rate
            l0 = float(rate.sum()) if rate is not None else float("nan")
            for v in members:
                s = er.scores if v.mode.value == er.scores.mode else er.score(v.mode)
                rows[v.name] = AblationRow(
                    name=v.name, kind=v.kind, description=v.description, k=v.k, mode=v.mode.value,
                    reliability=s.reliability, generalization=s.generalization, locality=s.locality, average=s.average,
                    seconds_per_edit=s.seconds_per_edit,
                    spliced_paraphrases=routed.spliced_rate(routed.paraphrases, v.mode),
                    spliced_locality=routed.spliced_rate(routed.locality, v.mode),
                    tau=routed.tau, l0_reference=l0,
                )
    return AblationsResult(config=cfg, dataset=data.format, trained_k=trained_k, d_sae=d_sae,
                           dense_k=resolve_dense_k(cfg, d_sae),
                           rows=tuple(rows[v.name] for v in variants))


def plot(result: AblationsResult, path: str | Path) -> Path:
    """Left: Rel/Gen/Loc/Avg (and the share of paraphrases spliced) against the inference k. Right:
    the ablations as grouped bars."""
    fig, (ax_k, ax_a) = new_figure(12.0, 4.4, 1, 2)
    sweep = result.of_kind("k_sweep")
    if sweep:
        ks = [r.k for r in sweep]
        for attr, label, color in SCORE_METRICS:
            ax_k.plot(ks, [getattr(r, attr) for r in sweep], marker="o", color=color, label=label)
        ax_k.plot(ks, [r.spliced_paraphrases for r in sweep], marker="x", linestyle=":", color="tab:green",
                  label="paraphrases spliced")
        ax_k.axvline(result.trained_k, color="gray", linestyle="--", linewidth=1, label=f"trained k = {result.trained_k}")
        ax_k.set_xscale("log", base=2)
        ax_k.set_xticks(ks, labels=[str(k) for k in ks])
        ax_k.set_ylim(-0.02, 1.02)
        ax_k.set_xlabel("inference k (SAE trained with k = %d)" % result.trained_k)
        ax_k.legend(fontsize=7)
    ax_k.set_title(f"k sweep, {result.dataset}, {result.config.n_edits} sequential edits", fontsize=9)
    ablations = result.of_kind("ablation")
    if ablations:
        labels = [f"{textwrap.fill(r.description, 18)}\n{r.seconds_per_edit:.2f} s/edit" for r in ablations]
        score_bars(ax_a, ablations, labels, fontsize=6.5)
    ax_a.set_title(f"ablations (no_topk: inference k = {result.dense_k} of {result.d_sae})", fontsize=9)
    return save_figure(fig, path)
