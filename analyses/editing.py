"""Shared by the Section 4 studies (layer sweep, ARD separation, ablations): load a slice of a
benchmark, make N edits *sequentially* with MicroEdit, score all of them afterwards with the WISE
protocol, and measure how the switch routes the edited prompts, their paraphrases and the locality
prompts.

:func:`edit_and_score` is :meth:`microedit_lens.lifelong.LifelongRunner.run` with ``T = [N]`` (one
chunk of N edits: locality baselines of the plain model first, then the N edits, then Rel/Gen/Loc
through :meth:`LifelongRunner.score`), except that the edits are *kept* afterwards, so a study can
route texts through the edited SAE (:meth:`EditRun.route`) or re-score the same edits with another
switch mode (:meth:`EditRun.score`). The editor stays attached to the model until
:meth:`EditRun.close` (or the end of a ``with`` block).

Benchmark paths in the study configs are relative to :func:`analyses.prompts.data_root`
(``$MICROEDIT_DATA`` or ``shared/data`` next to the checkout) unless absolute.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.prompts import data_root
from microedit_lens import data
from microedit_lens.data import load_dataset
from microedit_lens.lifelong import LifelongConfig, LifelongRunner, RecordScore
from microedit_lens.methods.microedit import MicroEditConfig, MicroEditor
from microedit_lens.switch import SwitchMode
from microedit_lens.types import EditRequest

logger = logging.getLogger(__name__)

#: Default benchmark files, relative to :func:`analyses.prompts.data_root` (as in
#: ``benchmarks/run_lifelong.sh``: each edit set is calibrated on its own training split).
ZSRE_EDITS = "zsre/zsre_mend_eval_portability_gpt4.json"
ZSRE_REFERENCE = "zsre/zsre_mend_train-1k.json"
HALLUCINATION_EDITS = "hallucination/hallucination-edit.json"
HALLUCINATION_REFERENCE = "hallucination/hallucination-train.json"

#: The normalised ``editor_overrides`` config field: sorted (name, value) pairs of MicroEditConfig.
Overrides = tuple[tuple[str, Any], ...]


# ------------------------------------------------------------------------------ config fields


def resolve_data_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself when absolute (``~`` expanded), else ``data_root() / path``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_root() / p


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_editor_overrides(overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None) -> Overrides:
    """Normalise a config's ``editor_overrides`` (a mapping, e.g. a JSON object from
    ``microedit analyze --set``, or (name, value) pairs) to sorted pairs, and check that
    :class:`MicroEditConfig` accepts them (unknown names and bad values raise ValueError)."""
    items = dict(overrides or {})
    try:
        MicroEditConfig(**items)
    except TypeError as exc:
        valid = sorted(f.name for f in dataclasses.fields(MicroEditConfig))
        raise ValueError(f"editor_overrides: {exc}; valid names: {valid}") from None
    return tuple(sorted(items.items()))


def method_config(overrides: Overrides, **changes: Any) -> MicroEditConfig:
    """The MicroEdit config: defaults, then ``overrides`` (the study's config), then ``changes``
    (what a variant of a study changes)."""
    return MicroEditConfig(**{**dict(overrides), **changes})


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class EditData:
    """The first N records of a benchmark file, with the format the loader recognised."""

    records: tuple[EditRequest, ...]
    source: Path
    format: str

    @property
    def has_paraphrases(self) -> bool:
        return any(r.paraphrases for r in self.records)


def load_edit_data(path: str | os.PathLike[str], n: int, format: str | None = None) -> EditData:
    """The first ``n`` records of a benchmark file (format detected unless given; duplicates kept,
    as ``microedit eval`` does)."""
    source = resolve_data_path(path)
    ds = load_dataset(source, format=format, limit=n, dedupe="keep")
    if not ds.records:
        raise ValueError(f"{source}: no usable records among the first {n}")
    if len(ds.records) < n:
        logger.warning("%s: only %d usable records among the first %d", source, len(ds.records), n)
    return EditData(tuple(ds.records), source, ds.format)


def load_reference_texts(path: str | os.PathLike[str], limit: int) -> list[str]:
    """Unrelated text for tau calibration, as ``microedit eval --reference``: a JSON list of strings,
    or the prompts of a benchmark file; the first ``limit``."""
    return data.load_reference_texts(resolve_data_path(path), limit)


# ----------------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class EditScores:
    """WISE scores of N sequential edits, all scored after the last edit (one chunk, T = N).

    ``generalization`` is NaN when no record has paraphrases (the hallucination set); ``ppl`` is the
    mean target perplexity after the prompt (the hallucination set's reliability measure).
    ``seconds_per_edit`` is the editing time only (not scoring, not calibration).
    """

    n_edits: int
    reliability: float
    generalization: float
    locality: float
    ppl: float
    edit_success: float
    seconds_per_edit: float
    tau: float | None
    mode: str
    records: tuple[RecordScore, ...] = dataclasses.field(repr=False, default=())

    @property
    def average(self) -> float:
        """Mean of Rel, Gen and Loc, leaving out NaN (the lifelong tables' "Avg.")."""
        vals = [v for v in (self.reliability, self.generalization, self.locality) if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}reliability": self.reliability,
            f"{prefix}generalization": self.generalization,
            f"{prefix}locality": self.locality,
            f"{prefix}average": self.average,
            f"{prefix}ppl": self.ppl,
            f"{prefix}edit_success": self.edit_success,
            f"{prefix}seconds_per_edit": self.seconds_per_edit,
            f"{prefix}tau": float("nan") if self.tau is None else float(self.tau),
        }


def _mean_finite(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


def _summarise(scores: Sequence[RecordScore], tau: float | None, mode: SwitchMode) -> EditScores:
    n = len(scores)
    return EditScores(
        n_edits=n,
        reliability=_mean_finite([s.reliability for s in scores]),
        generalization=_mean_finite([s.generalization for s in scores]),
        locality=_mean_finite([s.locality for s in scores]),
        ppl=_mean_finite([s.ppl for s in scores]),
        edit_success=_mean_finite([float(s.edit_success) for s in scores]),
        seconds_per_edit=sum(s.edit_seconds for s in scores) / max(n, 1),
        tau=tau,
        mode=mode.value,
        records=tuple(scores),
    )


#: (attribute, label, colour) of the scores every Section 4 figure shows.
SCORE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("reliability", "Rel.", "tab:red"), ("generalization", "Gen.", "tab:orange"),
    ("locality", "Loc.", "tab:blue"), ("average", "Avg.", "dimgray"),
)


def score_bars(ax: Any, items: Sequence[Any], tick_labels: Sequence[str], fontsize: float = 7) -> None:
    """Grouped bars of :data:`SCORE_METRICS` (attributes of each item, e.g. :class:`EditScores`), one
    group per item, values written on the bars (NaN: an empty bar labelled n/a)."""
    x = np.arange(len(items))
    width = 0.8 / len(SCORE_METRICS)
    for j, (attr, label, color) in enumerate(SCORE_METRICS):
        vals = [float(getattr(item, attr)) for item in items]
        bars = ax.bar(x + (j - (len(SCORE_METRICS) - 1) / 2) * width, [0.0 if math.isnan(v) else v for v in vals],
                      width, color=color, alpha=0.85, label=label)
        ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.2f}" for v in vals], fontsize=fontsize - 1.5)
    ax.set_xticks(x, labels=list(tick_labels), fontsize=fontsize)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("score")
    ax.legend(fontsize=fontsize, ncols=len(SCORE_METRICS), loc="upper center")


# ---------------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class RoutedGroups:
    """ARD per text of the three groups of a set of edit records under one decoder state, with the
    switch threshold. Lower ARD = closer to what the SAE reconstructs = in scope (spliced)."""

    prompts: Float[Tensor, " n"]
    paraphrases: Float[Tensor, " n_para"]
    locality: Float[Tensor, " n_loc"]
    tau: float

    def in_scope(self, ard: Tensor) -> float:
        """Share of ``ard`` at most tau (NaN for an empty group)."""
        return in_scope_rate(ard, self.tau)

    def spliced_rate(self, ard: Tensor, mode: SwitchMode) -> float:
        """Share of texts whose activation the switch replaces in ``mode`` (NaN for an empty group)."""
        on = spliced(ard, self.tau, mode)
        return float(on.float().mean()) if on.numel() else float("nan")


def in_scope_rate(ard: Tensor, tau: float) -> float:
    return float((ard <= tau).float().mean()) if ard.numel() else float("nan")


def spliced(ard: Float[Tensor, " n"], tau: float, mode: SwitchMode) -> Bool[Tensor, " n"]:
    """The switch's decision per text (as :class:`~microedit_lens.switch.SwitchedSAE` takes it)."""
    decisions = {SwitchMode.AUTO: ard <= tau, SwitchMode.ALWAYS: torch.ones_like(ard, dtype=torch.bool),
                 SwitchMode.NEVER: torch.zeros_like(ard, dtype=torch.bool)}
    return decisions[SwitchMode(mode)]


# --------------------------------------------------------------------------------- the run


class EditRun:
    """N edits made sequentially and kept: the editor stays attached until :meth:`close`.

    ``scores`` are the WISE scores in the mode :func:`edit_and_score` was called with.
    """

    def __init__(self, runner: LifelongRunner, records: Sequence[EditRequest], baselines: Any,
                 info: list[tuple[bool, float]], batch_size: int, mode: SwitchMode | str = SwitchMode.AUTO):
        self.runner = runner
        self.records = tuple(records)
        self._baselines = baselines
        self._info = info
        self.batch_size = batch_size
        self.scores: EditScores = self.score(mode)

    @property
    def editor(self) -> MicroEditor:
        return self.runner.editor  # type: ignore[return-value]

    @property
    def tau(self) -> float:
        tau = self.editor.tau
        assert tau is not None  # edit() refuses to run without tau
        return tau

    def score(self, mode: SwitchMode | str = SwitchMode.AUTO) -> EditScores:
        """Rel/Gen/Loc of every record with the current edits, the switch in ``mode`` while scoring
        (``ALWAYS`` = the "without the switch" ablation). Edits are made with the switch detached,
        so they do not depend on the mode and one set of edits can be scored in several modes."""
        mode = SwitchMode(mode)
        cfg = LifelongConfig(T=[len(self.records)], batch_size=self.batch_size, generative=False)
        with self.editor.switch.mode_as(mode):
            scores = self.runner.score(self.records, list(range(len(self.records))), self._baselines, cfg, self._info)
        return _summarise(scores, self.editor.tau, mode)

    def route(self, records: Sequence[EditRequest] | None = None) -> RoutedGroups:
        """ARD of the prompts, paraphrases and locality prompts of ``records`` (default: the edited
        records) under the editor's current decoder."""
        recs = self.records if records is None else tuple(records)
        ed = self.editor
        bs = self.batch_size
        return RoutedGroups(
            prompts=ed.route([r.prompt for r in recs], bs).ard,
            paraphrases=ed.route([p for r in recs for p in r.paraphrases], bs).ard,
            locality=ed.route([p for r in recs for p in r.locality_prompts], bs).ard,
            tau=self.tau,
        )

    def close(self) -> None:
        """Detach the editor: the model is the plain model again."""
        self.runner.close()

    def __enter__(self) -> "EditRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def edit_and_score(
    model: Any,
    sae: Any,
    records: Sequence[EditRequest],
    method_config: MicroEditConfig,
    reference_texts: Sequence[str],
    mode: SwitchMode | str = SwitchMode.AUTO,
    batch_size: int = 32,
    progress_every: int = 10,
) -> EditRun:
    """Calibrate MicroEdit on ``reference_texts`` (unless ``method_config.tau`` is set), make every
    edit in ``records`` in order, then score them all (``run.scores``, switch in ``mode``).

    The returned :class:`EditRun` keeps the edits and the attached editor: use it as a context
    manager or call ``close()``. On an exception the editor is detached before it propagates.
    """
    records = list(records)
    if not records:
        raise ValueError("edit_and_score needs at least one record")
    if method_config.tau is None and not reference_texts:
        raise ValueError("give reference_texts to calibrate tau, or set tau in the method config")
    # no reference texts here: the runner would calibrate inside its constructor, where a failure
    # would leave the editor attached; calibrating below is the same call (``prepare``)
    runner = LifelongRunner(model, sae, MicroEditor.name, method_config)
    try:
        if reference_texts:
            runner.editor.prepare(list(reference_texts))
        baselines = runner.baselines(records, batch_size, lower_cache=True)
        info: list[tuple[bool, float]] = []
        t0 = time.perf_counter()
        for i, request in enumerate(records):
            res = runner.editor.edit(request)[0]
            info.append((res.success, res.seconds))
            if progress_every and (i + 1) % progress_every == 0 and i + 1 < len(records):
                logger.info("edit %d/%d (%.1fs)", i + 1, len(records), time.perf_counter() - t0)
        run = EditRun(runner, records, baselines, info, batch_size, mode)
    except BaseException:
        runner.close()
        raise
    s = run.scores
    logger.info("%d edits in %.1fs (tau %.4g, %s): Rel %.3f Gen %.3f Loc %.3f", len(records),
                time.perf_counter() - t0, run.tau, s.mode, s.reliability, s.generalization, s.locality)
    return run


__all__ = [
    "SCORE_METRICS", "EditData", "EditRun", "EditScores", "RoutedGroups", "check_editor_overrides",
    "check_positive_int", "edit_and_score", "in_scope_rate", "load_edit_data", "load_reference_texts",
    "method_config", "resolve_data_path", "score_bars", "spliced",
]
