"""Regenerate the paper's figures on the embedded model and record their headline numbers.

    python -m analyses.make_figures                      # every figure
    python -m analyses.make_figures masking entanglement # some of them
    python -m analyses.make_figures ard_separation --n-edits 50
    python -m analyses.make_figures --list

Figures go to ``docs/figures/`` (``--out``); the headline numbers of each figure made are merged into
``<out>/headline.json`` (entries of figures not regenerated are kept). The SAE for the entanglement,
ard_separation and ablations studies is ``--sae PATH``, or else the first SAE directory found among
:data:`SAE_CANDIDATES`; with none, entanglement runs on neurons only (recorded as ``"sae": null``) and
the other two fail. The Section 4 figures (layer_sweep, ard_separation, ablations) make ``--n-edits``
sequential MicroEdit edits per run (several runs each; tens of minutes on a CPU), and layer_sweep
first trains any of its per-layer SAEs missing from its cache (see ``analyses.layer_sweep``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from analyses import get_spec, run_analysis
from analyses.editing import HALLUCINATION_EDITS, ZSRE_EDITS
from analyses.prompts import hallucination_edit_locality, zsre_edit_locality

logger = logging.getLogger("analyses.make_figures")

REPO = Path(__file__).resolve().parents[1]
#: Where an SAE for the embedded model is looked for (first with a cfg.json wins): the SAE shipped
#: in the package, then the training run's output next to the checkout.
SAE_CANDIDATES: tuple[Path, ...] = (
    REPO / "microedit_lens" / "assets" / "sae" / "smollm2-135m-l24-topk-16x-k32",
    REPO.parent / "runs" / "sae_l24_16x_k32",
)


@dataclass(frozen=True)
class FigureJob:
    """One figure: an analysis, its file name, and a (lazy) function giving its config overrides."""

    analysis: str
    filename: str
    overrides: Callable[[argparse.Namespace], dict[str, Any]] = field(default=lambda args: {})


def _zsre(args: argparse.Namespace) -> dict[str, Any]:
    edit, loc = zsre_edit_locality(args.zsre, args.n_records)
    return dict(edit_prompts=edit, locality_prompts=loc, edit_label="ZsRE edit (src)",
                locality_label="ZsRE locality (loc)", title=f"ZsRE, first {len(edit)} records")


def _hallucination(args: argparse.Namespace) -> dict[str, Any]:
    edit, loc = hallucination_edit_locality(args.hallucination, args.n_records)
    return dict(edit_prompts=edit, locality_prompts=loc, edit_label="hallucination edit (prompt)",
                locality_label="hallucination locality (locality_prompt)",
                title=f"Hallucination, first {len(edit)} records")


def _absolute(path: str | None, default: str) -> str:
    """A command-line path made absolute (the studies resolve relative paths against data_root())."""
    return str(Path(path).resolve()) if path is not None else default


def _zsre_edits(args: argparse.Namespace) -> dict[str, Any]:
    return dict(data=_absolute(args.zsre, ZSRE_EDITS), n_edits=args.n_edits)


def _zsre_and_hallucination_edits(args: argparse.Namespace) -> dict[str, Any]:
    return dict(datasets=(_absolute(args.zsre, ZSRE_EDITS), _absolute(args.hallucination, HALLUCINATION_EDITS)),
                n_edits=args.n_edits)


FIGURES: Mapping[str, FigureJob] = MappingProxyType({
    "sparsity": FigureJob("sparsity", "fig1a_sparsity.png"),
    "masking": FigureJob("masking", "fig1b_masking.png"),
    # the same intervention at one late layer only (layer 24 of 30: the SAE's layer)
    "masking_late_layer": FigureJob("masking", "fig1b_masking_late_layer.png", lambda args: dict(layers=(-6,))),
    "active_random_mutex": FigureJob("active_random_mutex", "fig1c_active_random_mutex.png"),
    "entanglement": FigureJob("entanglement", "fig1def_entanglement.png"),
    "entanglement_threshold": FigureJob(
        "entanglement", "fig1def_entanglement_threshold.png",
        lambda args: dict(neuron_rule="threshold", neuron_threshold=0.5),
    ),
    "geometry_zsre": FigureJob("geometry", "fig5_geometry_zsre.png", _zsre),
    "geometry_hallucination": FigureJob("geometry", "fig6_geometry_hallucination.png", _hallucination),
    "layer_sweep": FigureJob("layer_sweep", "fig3a_layer_sweep.png", _zsre_edits),
    "ard_separation": FigureJob("ard_separation", "fig3bc_ard_separation.png", _zsre_and_hallucination_edits),
    "ablations": FigureJob("ablations", "fig4_k_sweep_ablations.png", _zsre_edits),
})


def find_sae(path: str | None) -> Path | None:
    if path is not None:
        if path.lower() == "none":
            return None
        return Path(path)
    for cand in SAE_CANDIDATES:
        if (cand / "cfg.json").is_file():
            return cand
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def update_headline(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` into the JSON file at ``path`` (created if missing)."""
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    data.update(_jsonable(entries))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analyses.make_figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"figures to make (default: all): {', '.join(FIGURES)}; 'geometry' = both geometry figures")
    p.add_argument("--out", default=str(REPO / "docs" / "figures"))
    p.add_argument("--model", default=None, help="model source for load_model (default: the embedded SmolLM2)")
    p.add_argument("--sae", default=None, help="SAE directory for entanglement, ard_separation, ablations ('none' for neurons only)")
    p.add_argument("--zsre", default=None, help="ZsRE json (default: shared/data/zsre/zsre_mend_eval_portability_gpt4.json)")
    p.add_argument("--hallucination", default=None, help="hallucination json (default: shared/data/hallucination/hallucination-edit.json)")
    p.add_argument("--n-records", type=int, default=200, help="records per geometry data set")
    p.add_argument("--n-edits", type=int, default=50, help="sequential edits per run of the Section 4 studies")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    return p.parse_args(argv)


def resolve_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names or list(FIGURES):
        expanded = [n for n in FIGURES if n.startswith("geometry_")] if name == "geometry" else [name]
        for n in expanded:
            if n not in FIGURES:
                raise SystemExit(f"unknown figure '{n}'; choose from {', '.join(FIGURES)} (or 'geometry')")
            if n not in out:
                out.append(n)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        for name, job in FIGURES.items():
            logger.info("%-24s %-28s %s", name, job.filename, get_spec(job.analysis).description)
        return 0
    names = resolve_names(args.names)
    from microedit_lens.models import load_model

    model = load_model(args.model)
    sae_dir = find_sae(args.sae) if any(get_spec(FIGURES[n].analysis).uses_sae for n in names) else None
    sae = None
    if sae_dir is not None:
        from microedit_lens.sae import load_sae

        sae = load_sae(sae_dir)
        logger.info("SAE: %s (%s, d_sae=%d)", sae_dir, sae.cfg.metadata.hook_name, sae.cfg.d_sae)
    out = Path(args.out)
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        job = FIGURES[name]
        t0 = time.perf_counter()
        result, png = run_analysis(job.analysis, model, sae=sae, out_dir=out, filename=job.filename, **job.overrides(args))
        uses_sae = get_spec(job.analysis).uses_sae
        entries[name] = {
            "analysis": job.analysis,
            "figure": png.name,
            "model": args.model or "smollm2-135m-instruct (embedded)",
            "sae": (str(sae_dir) if sae_dir is not None else None) if uses_sae else None,
            "seconds": round(time.perf_counter() - t0, 1),
            "headline": result.headline(),
        }
        logger.info("%s -> %s (%.1fs)", name, png, entries[name]["seconds"])
    update_headline(out / "headline.json", entries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
