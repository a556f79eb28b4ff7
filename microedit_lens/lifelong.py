"""The lifelong editing protocol (WISE/GRACE): for a stream of N requests and a chunk size T, make all T
edits of a chunk sequentially, *then* score every one of them; chunks start from the unedited state
(``rollback(0)``, bitwise identical to a fresh editor) and the scores are averaged over all chunks.
T = 1 means every edit alone.

Locality baselines (argmax tokens of the plain model) are computed once, before any edit. Long runs
show progress with ETA, checkpoint every ``checkpoint_every`` edits and resume to identical numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from microedit_lens import metrics
from microedit_lens.methods.base import EditMethod, get_method
from microedit_lens.types import EditRequest, NumericalEditError

logger = logging.getLogger(__name__)


@dataclass
class LifelongConfig:
    """How to run one lifelong benchmark."""

    T: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    """Chunk sizes: edits made before scoring."""
    batch_size: int = 32
    """Scoring batch size."""
    generative: bool = True
    """Also score greedy exact match of the target after the prompt."""
    checkpoint_dir: str | None = None
    """Where progress and mid-chunk editor state are saved; an existing checkpoint is resumed."""
    checkpoint_every: int = 100
    """Save after this many edits (and at the end of every chunk that passes the mark). A chunk longer
    than this is also saved when its edits are done, before it is scored, so an interruption during
    the scoring loses no edit."""
    keep_editor: bool = False
    """Keep the editor of each T's last chunk, as it was after its edits (before scoring), in
    ``CHECKPOINT_DIR/T<T>_final_editor`` (a ``MicroEditor.save`` directory, for
    ``benchmarks/route_checkpoint.py`` and other analyses of the edited state). Needs ``checkpoint_dir``."""
    lower_cache: bool = True
    """Compute the blocks below the editing method's hook (which no edit changes:
    ``EditMethod.unchanged_blocks``) once per scored sequence and run only the blocks above in each
    scoring pass; the locality pairs' lower blocks are kept from the baselines to the end of the run
    (float32, ``d_model`` values per token). The same numbers as without, to float rounding."""
    share_prefixes: bool = True
    """When several T give a single chunk each (e.g. T=3000 and 5000 over 5000 records), the smaller
    T's chunk is the prefix of the larger one's stream: make the larger stream's edits once and score
    the smaller T when its edit count is reached (the same numbers as a separate run: every edit
    depends only on the edits before it)."""

    def __post_init__(self) -> None:
        if not self.T or any(t < 1 for t in self.T):
            raise ValueError(f"T values must be >= 1, got {self.T}")
        if self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("batch_size and checkpoint_every must be >= 1")
        if self.keep_editor and not self.checkpoint_dir:
            raise ValueError("keep_editor needs a checkpoint_dir to keep the editor in")


@dataclass
class RecordScore:
    """Scores of one edit request after its chunk's edits."""

    index: int
    reliability: float
    generalization: float
    locality: float
    ppl: float
    rel_generative: float
    edit_success: bool
    edit_seconds: float
    edit_error: str = ""
    """Why the edit was not made (it raised a NumericalEditError and was rolled back); empty if it was."""
    edit_reverted: bool = False
    """The method found an update but did not apply it (``EditResult.reverted``); scored as not edited."""


class _EditInfo(NamedTuple):
    """How one edit of a chunk went (stored in checkpoints as a JSON list)."""

    success: bool
    seconds: float
    error: str = ""
    reverted: bool = False


@dataclass
class TRun:
    """All chunks of one T."""

    T: int
    n_chunks: int
    n_records: int
    reliability: float
    generalization: float
    locality: float
    ppl: float
    rel_generative: float
    edit_success: float
    edit_seconds_total: float
    edit_seconds_per_edit: float
    score_seconds_total: float
    wall_seconds: float
    records: list[RecordScore]
    edit_errors: int = 0
    """Edits that raised (rolled back, scored as not edited): ``RecordScore.edit_error``."""
    edits_reverted: int = 0
    """Edits the method did not apply (``RecordScore.edit_reverted``)."""

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("records")
        d["average"] = _avg(self)
        return d


def _avg(r: TRun) -> float:
    vals = [v for v in (r.reliability, r.generalization, r.locality) if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class SweepResult:
    """A lifelong benchmark over several T."""

    dataset: str
    method: str
    n_records: int
    config: dict[str, Any]
    runs: dict[int, TRun]
    tau: float | None = None

    def to_json(self, path: str | Path, with_records: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = {
            "dataset": self.dataset, "method": self.method, "n_records": self.n_records, "tau": self.tau,
            "config": self.config,
            "results": {str(t): r.summary() for t, r in self.runs.items()},
        }
        if with_records:
            out["records"] = {str(t): [asdict(s) for s in r.records] for t, r in self.runs.items()}
        path.write_text(json.dumps(out, indent=1, default=_json_default))
        return path

    def write(self, path: str | Path, ppl: bool = False) -> str:
        """JSON (with per-record scores) at ``path`` and the markdown table next to it (``.md``);
        returns the markdown."""
        self.to_json(path)
        md = self.to_markdown(ppl=ppl)
        Path(path).with_suffix(".md").write_text(md)
        return md

    @classmethod
    def from_json(cls, path: str | Path) -> "SweepResult":
        """Read what :meth:`to_json` wrote (with its per-record scores)."""
        path = Path(path)
        d = json.loads(path.read_text())
        if "records" not in d:
            raise ValueError(f"{path}: no per-record scores (written with with_records=False); cannot rebuild the runs")
        runs = {}
        for t, summary in d["results"].items():
            recs = [RecordScore(**{k: (float("nan") if v is None else v) for k, v in r.items()}) for r in d["records"][t]]
            runs[int(t)] = trun_from_progress(int(t), summary["n_chunks"], {
                "scores": [asdict(r) for r in recs], "edit_s": summary["edit_seconds_total"],
                "score_s": summary["score_seconds_total"], "wall_s": summary["wall_seconds"]})
        return cls(dataset=d["dataset"], method=d["method"], n_records=d["n_records"], config=d["config"], runs=runs, tau=d.get("tau"))

    @classmethod
    def merge(cls, results: Sequence["SweepResult"]) -> "SweepResult":
        """One table from runs of the same method on the same data made separately (e.g. each T in its
        own process). Each T keeps the config it ran with (``config["per_T"]``); a T may appear once.
        The data is compared by file name (runs started from other folders name one file differently)."""
        if not results:
            raise ValueError("nothing to merge")
        first = results[0]
        runs: dict[int, TRun] = {}
        for r in results:
            if (r.method, Path(r.dataset).name) != (first.method, Path(first.dataset).name):
                raise ValueError(f"cannot merge {r.method} on {r.dataset!r} with {first.method} on {first.dataset!r}")
            for t, run in r.runs.items():
                if t in runs:
                    raise ValueError(f"T={t} appears in more than one result")
                runs[t] = run
        configs = {t: r.config for r in results for t in r.runs}
        return cls(dataset=first.dataset, method=first.method, n_records=max(r.n_records for r in results),
                   config={"per_T": {str(t): c for t, c in sorted(configs.items())}}, runs=dict(sorted(runs.items())),
                   tau=None)

    def to_markdown(self, ppl: bool = False) -> str:
        """The paper's table layout: one row per method, a column group per T."""
        ts = sorted(self.runs)
        cols = ["Rel. (PPL↓)", "Loc."] if ppl else ["Rel.", "Gen.", "Loc.", "Avg."]
        head = "| Method | " + " | ".join(f"T={t} {c}" for t in ts for c in cols) + " |"
        sep = "|---|" + "---|" * (len(ts) * len(cols))
        cells = []
        for t in ts:
            r = self.runs[t]
            cells += [f"{r.ppl:.2f}", f"{r.locality:.2f}"] if ppl else [
                f"{r.reliability:.2f}", f"{r.generalization:.2f}", f"{r.locality:.2f}", f"{_avg(r):.2f}"]
        row = f"| {self.method} | " + " | ".join(cells) + " |"
        timing = "\n".join(
            f"- T={t}: {r.n_records} edits in {r.n_chunks} chunk(s); {r.edit_seconds_per_edit:.2f} s/edit; "
            f"edits {r.edit_seconds_total / 60:.1f} min, scoring {r.score_seconds_total / 60:.1f} min, wall {r.wall_seconds / 60:.1f} min; "
            f"generative exact match {r.rel_generative:.2f}; edits that met their own stopping rule {r.edit_success:.2f}"
            for t, r in sorted(self.runs.items()))
        return f"{head}\n{sep}\n{row}\n\n{timing}\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


@dataclass
class _Baselines:
    """Pre-edit argmax tokens of the plain model on every locality pair, per record, and the lower
    blocks' residuals of those pairs (``None`` without ``lower_cache``)."""

    loc: list[list[torch.Tensor]]
    lower: metrics.LowerCache | None = None


class LifelongRunner:
    """Runs the protocol for one method on one model/SAE."""

    def __init__(self, model: Any, sae: Any, method: str = "microedit", method_config: Any = None, reference_texts: Sequence[str] = ()):
        entry = get_method(method)
        self.method_name = method
        self.method_class = entry.method_class
        self.model, self.sae = model, sae
        self.method_config = method_config if method_config is not None else entry.config_class()
        self.editor: EditMethod = self.method_class(model, sae, self.method_config)
        if reference_texts:
            try:
                self.editor.prepare(list(reference_texts))
            except BaseException:  # never leave the user's model with a half-built editor attached
                self.editor.detach()
                raise

    @classmethod
    def for_editor(cls, editor: EditMethod, sae: Any) -> "LifelongRunner":
        """A runner around an existing (e.g. loaded, already edited) editor, for scoring it."""
        runner = cls.__new__(cls)
        runner.method_name, runner.method_class = editor.name, type(editor)
        runner.model, runner.sae, runner.editor = editor.model, sae, editor  # type: ignore[attr-defined]
        runner.method_config = getattr(editor, "cfg", None)
        return runner

    def close(self) -> None:
        self.editor.detach()

    # ---------------------------------------------------------------- scoring
    def baselines(self, records: Sequence[EditRequest], batch_size: int, lower_cache: bool = False) -> _Baselines:
        prompts, answers, owner = [], [], []
        for i, r in enumerate(records):
            for p, a in _locality_pairs(r):
                prompts.append(p)
                answers.append(a)
                owner.append(i)
        lower = self._lower_cache(batch_size) if lower_cache else None
        with self.editor.detached():
            tf = metrics.teacher_forced(self.model, prompts, answers, batch_size, lower=lower)
        loc: list[list[torch.Tensor]] = [[] for _ in records]
        for i, a in zip(owner, tf.argmax):
            loc[i].append(a)
        return _Baselines(loc, lower)

    def _lower_cache(self, batch_size: int) -> metrics.LowerCache | None:
        """A cache of the blocks the method never changes, where it names any and the model is a
        TransformerLens model."""
        n = self.editor.unchanged_blocks
        if n <= 0 or not metrics.LowerCache.supports(self.model):
            return None
        return metrics.LowerCache(self.model, n, batch_size)

    def score(self, records: Sequence[EditRequest], offsets: Sequence[int], base: _Baselines, cfg: LifelongConfig, edit_info: Sequence[tuple[Any, ...]]) -> list[RecordScore]:
        """Score ``records`` (global indices ``offsets``) with the current edits attached;
        ``edit_info``: (success, seconds[, error]) of each record's edit."""
        edit_info = [_EditInfo(*x) for x in edit_info]
        pad, bs, lower = self.editor.padding, cfg.batch_size, base.lower
        # the prompts' and paraphrases' lower blocks are dropped after scoring; the locality pairs' stay
        with self.editor.attached(), (lower.scoped() if lower is not None else contextlib.nullcontext()):
            rel = metrics.teacher_forced(self.model, [r.prompt for r in records], [r.target for r in records], bs, pad, lower)
            para = [(i, p) for i, r in enumerate(records) for p in r.paraphrases]
            gen = metrics.teacher_forced(self.model, [p for _, p in para], [records[i].target for i, _ in para], bs, pad, lower)
            locs = [(i, p, a) for i, r in enumerate(records) for p, a in _locality_pairs(r)]
            loc = metrics.teacher_forced(self.model, [p for _, p, _ in locs], [a for _, _, a in locs], bs, pad, lower)
            em = (metrics.greedy_exact_match(self.model, [r.prompt for r in records], [r.target for r in records], bs, pad,
                                             self.editor.prefix_logits_at, lower=lower)
                  if cfg.generative else [float("nan")] * len(records))
        gen_acc: list[list[float]] = [[] for _ in records]
        for (i, _), a in zip(para, gen.accuracy()):
            gen_acc[i].append(a)
        loc_acc: list[list[float]] = [[] for _ in records]
        for (i, _, _), post in zip(locs, loc.argmax):
            pre = base.loc[offsets[i]][len(loc_acc[i])]
            loc_acc[i].append(float((pre == post).float().mean()))
        rel_acc, ppl = rel.accuracy(), rel.perplexity()
        return [
            RecordScore(index=offsets[i], reliability=rel_acc[i], generalization=metrics.mean(gen_acc[i]),
                        locality=metrics.mean(loc_acc[i]), ppl=ppl[i], rel_generative=float(em[i]),
                        edit_success=edit_info[i].success, edit_seconds=edit_info[i].seconds, edit_error=edit_info[i].error,
                        edit_reverted=edit_info[i].reverted)
            for i in range(len(records))
        ]

    # ---------------------------------------------------------------- protocol
    def run(self, records: Sequence[EditRequest], cfg: LifelongConfig, dataset_name: str = "") -> SweepResult:
        records = list(records)
        if not records:
            raise ValueError("no records to edit: the lifelong run needs at least one request")
        base = self.baselines(records, cfg.batch_size, cfg.lower_cache)
        ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        progress = _load_progress(ckpt)
        single = sorted({min(t, len(records)) for t in cfg.T if len(records) // min(t, len(records)) == 1})
        prefixes = single[:-1] if cfg.share_prefixes else []
        runs: dict[int, TRun] = {}
        for T in cfg.T:
            if min(T, len(records)) not in prefixes:
                runs[T] = self._run_T(records, T, base, cfg, ckpt, progress, [p for p in prefixes if p < min(T, len(records))])
        for T in cfg.T:
            if T not in runs:
                runs[T] = trun_from_progress(T, 1, progress[str(min(T, len(records)))])
        runs = dict(sorted(runs.items()))
        tau = getattr(self.editor, "tau", None)
        return SweepResult(dataset=dataset_name, method=self.method_name, n_records=len(records),
                           config={"method": _config_dict(self.method_config), "lifelong": asdict(cfg)}, runs=runs, tau=tau)

    def _run_T(self, records: list[EditRequest], T: int, base: _Baselines, cfg: LifelongConfig, ckpt: Path | None,
               progress: dict[str, Any], prefixes: Sequence[int] = ()) -> TRun:
        """All chunks of one T; with ``prefixes`` (only for a single chunk) also score the stream after
        each prefix length, stored under that T in ``progress``."""
        n = len(records)
        T_eff = min(T, n)
        if n % T_eff:
            logger.warning("T=%d: %d records are not a multiple of T; the last %d are not scored", T, n, n % T_eff)
        n_chunks = n // T_eff
        state = progress.setdefault(str(T), {"chunks_done": 0, "scores": [], "edit_s": 0.0, "score_s": 0.0, "wall_s": 0.0})
        t_wall = time.perf_counter() - state["wall_s"]
        self.editor.rollback(0)
        mid = ckpt / f"T{T}_editor" if ckpt else None
        bar = tqdm(total=n_chunks * T_eff, initial=state["chunks_done"] * T_eff, desc=f"T={T}", unit="edit")
        since_save = 0

        def save_mid_chunk(c: int, info: list[_EditInfo]) -> None:
            """The editor as it is in chunk ``c`` and the progress that resumes it there."""
            assert ckpt is not None and mid is not None
            self.editor.save(mid)
            state.update(mid_chunk=c, mid_info=info, wall_s=time.perf_counter() - t_wall)
            _save_progress(ckpt, progress)

        for c in range(state["chunks_done"], n_chunks):
            chunk = records[c * T_eff : (c + 1) * T_eff]
            done = 0
            info: list[_EditInfo] = []
            if mid is not None and (mid / "editor.json").is_file() and state.get("mid_chunk") == c:
                self._restore_editor(mid)
                info = [_EditInfo(*x) for x in state.get("mid_info", [])]
                done = len(info)  # not n_edits: an edit that raised was rolled back but is part of the chunk
                bar.update(done)
            for j in range(done, T_eff):
                info.append(self._edit_or_report(chunk[j], c * T_eff + j))
                state["edit_s"] += info[-1].seconds
                bar.update(1)
                since_save += 1
                prefix_done = j + 1 in prefixes and progress.get(str(j + 1), {}).get("chunks_done") != 1
                if prefix_done:
                    progress[str(j + 1)] = self._score_prefix(chunk[: j + 1], base, cfg, info, time.perf_counter() - t_wall)
                # a scored prefix is saved at once, so an interruption after it loses nothing
                if ckpt is not None and (prefix_done or (since_save >= cfg.checkpoint_every and j + 1 < T_eff)):
                    save_mid_chunk(c, info)
                    since_save = 0
            last = c + 1 == n_chunks
            saved_edits = mid is not None and (T_eff > cfg.checkpoint_every or (cfg.keep_editor and last))
            if saved_edits and done < T_eff:  # done == T_eff: restored from this very save
                save_mid_chunk(c, info)
            t0 = time.perf_counter()
            scores = self.score(chunk, list(range(c * T_eff, (c + 1) * T_eff)), base, cfg, info)
            state["score_s"] += time.perf_counter() - t0
            state["scores"].extend(asdict(s) for s in scores)
            state["chunks_done"] = c + 1
            state.pop("mid_chunk", None)
            state.pop("mid_info", None)
            self.editor.rollback(0)
            if ckpt is not None and (since_save >= cfg.checkpoint_every or last or saved_edits):
                state["wall_s"] = time.perf_counter() - t_wall
                _save_progress(ckpt, progress)
                if mid is not None and mid.exists():
                    if cfg.keep_editor and last:
                        final = ckpt / f"T{T}_final_editor"
                        if final.exists():
                            shutil.rmtree(final)
                        mid.rename(final)
                    else:
                        shutil.rmtree(mid)
                since_save = 0
        bar.close()
        state["wall_s"] = time.perf_counter() - t_wall
        return trun_from_progress(T, n_chunks, state)

    def _edit_or_report(self, request: EditRequest, index: int) -> _EditInfo:
        """Make one edit of the stream. An edit that fails numerically was rolled back by the editor
        (earlier edits kept); the run reports it (log, ``edit_error`` in the record's scores) and goes
        on, scoring the record as not edited, instead of losing the whole stream."""
        t0 = time.perf_counter()
        try:
            res = self.editor.edit(request)[0]
        except NumericalEditError as exc:
            logger.warning("record %d: the edit failed and was rolled back (%s); it is scored as not edited", index, exc)
            return _EditInfo(False, time.perf_counter() - t0, str(exc))
        return _EditInfo(res.success, res.seconds, reverted=res.reverted)

    def _score_prefix(self, chunk: list[EditRequest], base: _Baselines, cfg: LifelongConfig, info: list[_EditInfo], wall_so_far: float) -> dict[str, Any]:
        """Progress state of the run made of the first ``len(chunk)`` edits of the current stream."""
        t0 = time.perf_counter()
        scores = self.score(chunk, list(range(len(chunk))), base, cfg, info)
        score_s = time.perf_counter() - t0
        return {"chunks_done": 1, "scores": [asdict(s) for s in scores], "edit_s": sum(i.seconds for i in info),
                "score_s": score_s, "wall_s": wall_so_far + score_s}

    def _restore_editor(self, path: Path) -> None:
        self.editor.detach()
        self.editor = self.method_class.load(path, self.model, sae=self.sae)


def trun_from_progress(T: int, n_chunks: int, state: dict[str, Any]) -> TRun:
    """Aggregate one T's progress state (per-record scores and timings)."""
    recs = [RecordScore(**s) for s in state["scores"]]
    m = metrics.mean
    return TRun(
        T=T, n_chunks=n_chunks, n_records=len(recs),
        reliability=m([r.reliability for r in recs]),
        generalization=m([r.generalization for r in recs if not math.isnan(r.generalization)]),
        locality=m([r.locality for r in recs if not math.isnan(r.locality)]),
        ppl=m([r.ppl for r in recs]),
        rel_generative=m([r.rel_generative for r in recs]),
        edit_success=m([float(r.edit_success) for r in recs]),
        edit_seconds_total=state["edit_s"], edit_seconds_per_edit=state["edit_s"] / max(len(recs), 1),
        score_seconds_total=state["score_s"], wall_seconds=state["wall_s"], records=recs,
        edit_errors=sum(bool(r.edit_error) for r in recs), edits_reverted=sum(r.edit_reverted for r in recs),
    )


def _locality_pairs(r: EditRequest) -> list[tuple[str, str]]:
    """(prompt, answer) pairs; a locality prompt without an answer is scored on all its positions."""
    answers = r.locality_answers or ("",) * len(r.locality_prompts)
    return list(zip(r.locality_prompts, answers))


def _config_dict(cfg: Any) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)


def _load_progress(ckpt: Path | None) -> dict[str, Any]:
    if ckpt is None or not (ckpt / "progress.json").is_file():
        return {}
    logger.info("resuming from %s", ckpt)
    return json.loads((ckpt / "progress.json").read_text())


def _save_progress(ckpt: Path, progress: dict[str, Any]) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "progress.json.tmp"
    tmp.write_text(json.dumps(progress))
    tmp.replace(ckpt / "progress.json")


def run_lifelong(
    model: Any, sae: Any, records: Sequence[EditRequest], cfg: LifelongConfig, method: str = "microedit",
    method_config: Any = None, reference_texts: Sequence[str] = (), dataset_name: str = "",
) -> SweepResult:
    """Convenience wrapper: build a :class:`LifelongRunner`, run it, detach the editor."""
    runner = LifelongRunner(model, sae, method, method_config, reference_texts)
    try:
        return runner.run(records, cfg, dataset_name)
    finally:
        runner.close()
