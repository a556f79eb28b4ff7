"""Load knowledge-editing benchmarks into :class:`~microedit_lens.types.EditRequest` lists.

Every loader returns an :class:`EditDataset`. :func:`load_dataset` reads any supported file and, when
``format`` is ``None``, picks the format from the keys of the file's first record (the most specific
matching signature below wins). The per-format loaders (:func:`load_zsre`, ...) fix the format.

Formats and their mapping to ``EditRequest`` (keys not listed are ignored):

``zsre`` -- ZsRE in the MEND format (a JSON list), e.g. ``zsre_mend_eval_portability_gpt4.json`` (its
first 1000 records are the WISE T=1000 stream) and ``zsre_mend_train-1k.json``. Detected by
``src`` + ``alt``. ``src`` -> ``prompt``; ``alt`` -> ``target``; ``rephrase`` -> ``paraphrases=(rephrase,)``;
``loc``/``loc_ans`` -> ``locality_prompts=(loc,)``/``locality_answers=(loc_ans,)``; optional ``subject``
-> ``subject``; optional ``pred`` and ``answers`` -> ``meta``. ``portability`` and ``cond`` are dropped.

``hallucination`` -- WISE's SelfCheckGPT/WikiBio set (``hallucination-edit.json``, ``-train.json``).
Detected by ``prompt`` + ``target_new``. ``prompt`` -> ``prompt``, ``target_new`` -> ``target``,
``locality_prompt``/``locality_ground_truth`` -> one locality pair, optional ``subject``. The format
has no paraphrases, so ``paraphrases=()``.

``counterfact`` -- the flat WISE/EasyEdit CounterFact records (``counterfact-edit.json``, ``-train.json``).
Detected by ``prompt`` + ``target_new`` + ``rephrase_prompt``. As ``hallucination``, plus
``rephrase_prompt`` -> ``paraphrases=(rephrase_prompt,)``; optional ``subject``; optional ``case_id``
and ``ground_truth`` -> ``meta``.

``temporal`` -- WISE's temporal set (``temporal-edit.json``, ``-train.json``; fields ``prompt,
target_new, subject, ood_rephrase, locality_prompt, locality_ground_truth``). Detected by ``prompt`` +
``target_new`` + ``ood_rephrase``. As ``hallucination``, plus ``ood_rephrase`` ->
``paraphrases=(ood_rephrase,)`` (WISE passes it as the rephrase prompt and scores it with OOD-PPL).

``jsonl`` -- this package's own request records: one JSON object per line (``.jsonl``/``.ndjson``;
blank lines are ignored; a JSON list of the same objects is accepted too), the shape written by
``EditRequest.to_dict()``. Detected by ``prompt`` + ``target``. Keys: ``prompt``, ``target``, optional
``paraphrases``, ``locality_prompts``, ``locality_answers`` (each a string or a list of strings;
answers, when given, pair one to one with prompts), ``subject``, ``meta`` (an object). Other keys are
an error, so a misspelt key is not silently ignored.

Rules shared by all formats:

* Record indices are 0-based positions in the file (for JSONL: among the non-blank lines; messages
  also give the 1-based line number).
* A missing required field, a wrong type, an empty or whitespace-only prompt/target, a record that is
  not an object, or an invalid JSON line raises :class:`DataFormatError` naming the file and the
  record, e.g. ``zsre_mend_train-1k.json: record 534: field 'alt' is empty``. With
  ``skip_invalid=True`` the record is listed in :attr:`EditDataset.skipped` instead. A file that is
  not valid JSON, or not a JSON list, always raises.
* An empty auxiliary field (paraphrase, locality prompt or answer, subject) does not invalidate the
  edit: that paraphrase or locality pair is omitted and the omission is listed in
  :attr:`EditDataset.notes` (the real hallucination and temporal files have a few empty
  ``locality_ground_truth`` values).
* Texts are kept exactly as given: no stripping and no leading space added to targets
  (:attr:`EditRequest.target_text` adds the joining space).
* Two records with the same prompt and target (compared after stripping surrounding whitespace) are
  duplicates: ``dedupe="error"`` raises naming both records, ``"skip"`` lists the later one in
  ``skipped``, ``"keep"`` keeps both. The real CounterFact files contain a few such pairs (same
  prompt and new target, different case), so load them with ``dedupe="skip"`` or ``"keep"``.
* ``limit`` keeps the first ``limit`` records of the file, counted before validation, so indices
  stay aligned with the file and ``len(ds) + len(ds.skipped) == min(limit, records in file)``.
* ``meta`` holds ``source_index`` (the record's index in the file) plus the small per-format fields
  named above.

:func:`load_text_list` reads a JSON list of non-empty strings, such as WISE's locality prompt list
``wise_loc_prompts_zsre_mend_train_first1000.json`` (entries like ``"nq question: ... answer"``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from microedit_lens.types import EditRequest

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
DEDUPE_MODES = ("error", "skip", "keep")
_LINE_SUFFIXES = (".jsonl", ".ndjson")


class DataFormatError(ValueError):
    """A data file or one of its records is malformed. The message names the file and the record."""

    def __init__(self, path: PathLike, problem: str, index: int | None = None):
        self.path = str(path)
        self.problem = problem
        self.index = index
        where = f"{Path(path).name}: record {index}" if index is not None else Path(path).name
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.problem, self.index))


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out of an :class:`EditDataset` (invalid with ``skip_invalid``, or a duplicate)."""

    index: int
    reason: str


@dataclass(frozen=True)
class RecordNote:
    """Part of a kept record that was omitted (e.g. an empty locality answer)."""

    index: int
    message: str


@dataclass(repr=False)
class EditDataset:
    """Edit requests loaded from one file, with what was skipped or omitted while loading.

    ``skipped`` and ``notes`` describe the load of the whole file; slices and :meth:`head` keep them
    unchanged. Each request's ``meta["source_index"]`` is its index in the file.
    """

    records: list[EditRequest]
    source: str
    format: str
    skipped: list[SkippedRecord] = field(default_factory=list)
    notes: list[RecordNote] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[EditRequest]:
        return iter(self.records)

    @overload
    def __getitem__(self, key: int) -> EditRequest: ...

    @overload
    def __getitem__(self, key: slice) -> EditDataset: ...

    def __getitem__(self, key: int | slice) -> EditRequest | EditDataset:
        if isinstance(key, slice):
            return EditDataset(self.records[key], self.source, self.format, list(self.skipped), list(self.notes))
        return self.records[key]

    def head(self, n: int) -> EditDataset:
        """The first ``n`` requests."""
        if n < 0:
            raise ValueError(f"head(n) needs n >= 0, got {n}")
        return self[:n]

    def __repr__(self) -> str:
        return (f"EditDataset(format={self.format!r}, source={self.source!r}, records={len(self.records)}, "
                f"skipped={len(self.skipped)}, notes={len(self.notes)})")


class _Invalid(Exception):
    """A record is invalid; the message says why (without file or index)."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Fields:
    """Typed access to one raw record; collects notes about omitted parts."""

    def __init__(self, raw: Any, index: int):
        if not isinstance(raw, dict):
            raise _Invalid(f"expected a JSON object, got {_type_name(raw)}")
        self.raw: dict[str, Any] = raw
        self.index = index
        self.notes: list[str] = []

    def required(self, key: str) -> str:
        """The string value of ``key`` (possibly blank)."""
        if key not in self.raw:
            raise _Invalid(f"missing field '{key}'")
        value = self.raw[key]
        if not isinstance(value, str):
            raise _Invalid(f"field '{key}' is not a string (got {_type_name(value)})")
        return value

    def optional(self, key: str) -> str | None:
        """As :meth:`required`, but ``None`` when ``key`` is absent or null."""
        return None if self.raw.get(key) is None else self.required(key)

    def string(self, key: str, required: bool = True) -> str | None:
        return self.required(key) if required else self.optional(key)

    def text(self, key: str) -> str:
        """A required, non-blank string (a prompt or a target)."""
        value = self.required(key)
        if not value.strip():
            raise _Invalid(f"field '{key}' is empty")
        return value

    def aux(self, key: str, required: bool = True) -> str | None:
        """An auxiliary string; blank -> ``None`` with a note."""
        value = self.string(key, required)
        if value is not None and not value.strip():
            self.notes.append(f"field '{key}' is empty; omitted")
            return None
        return value

    def aux_tuple(self, key: str, required: bool = True) -> tuple[str, ...]:
        value = self.aux(key, required)
        return () if value is None else (value,)

    def strings(self, key: str) -> list[str] | None:
        """A string or list of strings (blank items kept); ``None`` if absent/null."""
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise _Invalid(f"field '{key}' is not a string or a list of strings (got {_type_name(value)})")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise _Invalid(f"field '{key}' item {i} is not a string (got {_type_name(item)})")
        return list(value)

    def nonblank(self, key: str) -> tuple[str, ...]:
        """:meth:`strings` with blank items omitted (noted)."""
        kept = []
        for i, item in enumerate(self.strings(key) or []):
            if item.strip():
                kept.append(item)
            else:
                self.notes.append(f"field '{key}' item {i} is empty; omitted")
        return tuple(kept)

    def locality_pair(self, prompt_key: str, answer_key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """One required locality prompt/answer pair; omitted (noted) if either is blank."""
        prompt, answer = self.required(prompt_key), self.required(answer_key)
        blank = [key for key, value in ((prompt_key, prompt), (answer_key, answer)) if not value.strip()]
        if blank:
            self.notes.append(f"field '{blank[0]}' is empty; locality pair omitted")
            return (), ()
        return (prompt,), (answer,)

    def locality_lists(self, prompt_key: str, answer_key: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Locality prompts with optional one-to-one answers; pairs with a blank side are omitted (noted)."""
        prompts, answers = self.strings(prompt_key) or [], self.strings(answer_key)
        if answers is None:
            return self.nonblank(prompt_key), ()
        if len(answers) != len(prompts):
            raise _Invalid(f"field '{answer_key}' has {len(answers)} items but '{prompt_key}' has {len(prompts)}")
        kept_prompts: list[str] = []
        kept_answers: list[str] = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            if prompt.strip() and answer.strip():
                kept_prompts.append(prompt)
                kept_answers.append(answer)
            else:
                self.notes.append(f"locality pair {i} has an empty prompt or answer; omitted")
        return tuple(kept_prompts), tuple(kept_answers)

    def integer(self, key: str) -> int | None:
        value = self.raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _Invalid(f"field '{key}' is not an integer (got {_type_name(value)})")
        return value

    def object(self, key: str) -> dict[str, Any]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _Invalid(f"field '{key}' is not an object (got {_type_name(value)})")
        return dict(value)

    def only_keys(self, allowed: frozenset[str]) -> None:
        unknown = sorted(set(self.raw) - allowed)
        if unknown:
            raise _Invalid(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")

    def meta(self, **fields: Any) -> dict[str, Any]:
        """``source_index`` plus the given fields that are not ``None``."""
        return {"source_index": self.index, **{k: v for k, v in fields.items() if v is not None}}


def _request(**kwargs: Any) -> EditRequest:
    try:
        return EditRequest(**kwargs)
    except ValueError as exc:
        raise _Invalid(str(exc)) from exc


def _parse_zsre(rec: _Fields) -> EditRequest:
    prompt, target = rec.text("src"), rec.text("alt")
    paraphrases = rec.aux_tuple("rephrase")
    loc, loc_ans = rec.locality_pair("loc", "loc_ans")
    return _request(
        prompt=prompt, target=target, paraphrases=paraphrases, locality_prompts=loc, locality_answers=loc_ans,
        subject=rec.aux("subject", required=False),
        meta=rec.meta(pred=rec.optional("pred"), answers=rec.strings("answers")),
    )


def _parse_wise(rec: _Fields, rephrase_key: str | None) -> EditRequest:
    """The WISE/EasyEdit flat shape shared by hallucination, counterfact and temporal."""
    prompt, target = rec.text("prompt"), rec.text("target_new")
    paraphrases = rec.aux_tuple(rephrase_key) if rephrase_key else ()
    loc, loc_ans = rec.locality_pair("locality_prompt", "locality_ground_truth")
    return _request(
        prompt=prompt, target=target, paraphrases=paraphrases, locality_prompts=loc, locality_answers=loc_ans,
        subject=rec.aux("subject", required=False),
        meta=rec.meta(case_id=rec.integer("case_id"), ground_truth=rec.optional("ground_truth")),
    )


def _parse_hallucination(rec: _Fields) -> EditRequest:
    return _parse_wise(rec, None)


def _parse_counterfact(rec: _Fields) -> EditRequest:
    return _parse_wise(rec, "rephrase_prompt")


def _parse_temporal(rec: _Fields) -> EditRequest:
    return _parse_wise(rec, "ood_rephrase")


_JSONL_KEYS = frozenset({"prompt", "target", "paraphrases", "locality_prompts", "locality_answers", "subject", "meta"})


def _parse_jsonl(rec: _Fields) -> EditRequest:
    rec.only_keys(_JSONL_KEYS)
    prompt, target = rec.text("prompt"), rec.text("target")
    paraphrases = rec.nonblank("paraphrases")
    loc, loc_ans = rec.locality_lists("locality_prompts", "locality_answers")
    return _request(
        prompt=prompt, target=target, paraphrases=paraphrases, locality_prompts=loc, locality_answers=loc_ans,
        subject=rec.aux("subject", required=False), meta={**rec.object("meta"), **rec.meta()},
    )


@dataclass(frozen=True)
class FormatSpec:
    """How to recognise and parse one record format."""

    name: str
    parse: Callable[[_Fields], EditRequest]
    signature: frozenset[str]
    """Keys whose presence identifies the format; the largest matching signature wins."""
    line_delimited: bool = False
    """Read the file as JSON lines unless it starts with ``[``."""


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("zsre", _parse_zsre, frozenset({"src", "alt"})),
        FormatSpec("hallucination", _parse_hallucination, frozenset({"prompt", "target_new"})),
        FormatSpec("counterfact", _parse_counterfact, frozenset({"prompt", "target_new", "rephrase_prompt"})),
        FormatSpec("temporal", _parse_temporal, frozenset({"prompt", "target_new", "ood_rephrase"})),
        FormatSpec("jsonl", _parse_jsonl, frozenset({"prompt", "target"}), line_delimited=True),
    )
}
"""The format registry: name -> :class:`FormatSpec`."""


def available_formats() -> tuple[str, ...]:
    return tuple(FORMATS)


def detect_format(record: Any) -> str:
    """The registered format whose signature best matches ``record``'s keys; ``ValueError`` if none or a tie."""
    if not isinstance(record, dict):
        raise ValueError(f"cannot detect the format: expected a JSON object, got {_type_name(record)}")
    matches = [spec for spec in FORMATS.values() if spec.signature <= record.keys()]
    if not matches:
        raise ValueError(f"cannot detect the format from keys {sorted(record)}; known formats: "
                         + ", ".join(f"{s.name} {sorted(s.signature)}" for s in FORMATS.values()))
    best = max(len(spec.signature) for spec in matches)
    top = [spec.name for spec in matches if len(spec.signature) == best]
    if len(top) > 1:
        raise ValueError(f"ambiguous format for keys {sorted(record)}: matches {top}; pass format=")
    return top[0]


@dataclass(frozen=True)
class _BadLine:
    """A JSONL line that is not valid JSON."""

    problem: str


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _parse_lines(text: str) -> list[Any]:
    items: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            items.append(_BadLine(f"line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})"))
    return items


def _parse_list(path: Path, text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(value, list):
        raise DataFormatError(path, f"expected a JSON list of records, got a JSON {_type_name(value)}")
    return value


def _read_raw(path: Path, spec: FormatSpec | None) -> list[Any]:
    text = _read_text(path)
    by_lines = path.suffix.lower() in _LINE_SUFFIXES or (spec is not None and spec.line_delimited)
    if by_lines and not text.lstrip().startswith("["):
        return _parse_lines(text)
    return _parse_list(path, text)


def _resolve_spec(path: Path, raw: list[Any], format: str | None) -> FormatSpec:
    if format is not None:
        return FORMATS[format]
    if not raw:
        raise DataFormatError(path, "no records, so the format cannot be detected; pass format=")
    first = raw[0]
    if isinstance(first, _BadLine):
        raise DataFormatError(path, first.problem, 0)
    try:
        return FORMATS[detect_format(first)]
    except ValueError as exc:
        raise DataFormatError(path, str(exc), 0) from exc


def _dedupe_key(request: EditRequest) -> tuple[str, str]:
    return request.prompt.strip(), request.target.strip()


class _Collector:
    """Accumulates one load: converts raw records, applies ``skip_invalid`` and ``dedupe``."""

    def __init__(self, path: Path, spec: FormatSpec, skip_invalid: bool, dedupe: str):
        self.path, self.spec, self.skip_invalid, self.dedupe = path, spec, skip_invalid, dedupe
        self.records: list[EditRequest] = []
        self.skipped: list[SkippedRecord] = []
        self.notes: list[RecordNote] = []
        self.seen: dict[tuple[str, str], int] = {}

    def add(self, index: int, item: Any) -> None:
        try:
            if isinstance(item, _BadLine):
                raise _Invalid(item.problem)
            rec = _Fields(item, index)
            request = self.spec.parse(rec)
        except _Invalid as exc:
            self._reject(index, str(exc))
            return
        if self._is_dropped_duplicate(index, request):
            return
        self.records.append(request)
        self.notes.extend(RecordNote(index, message) for message in rec.notes)

    def _reject(self, index: int, reason: str) -> None:
        if not self.skip_invalid:
            raise DataFormatError(self.path, reason, index)
        self.skipped.append(SkippedRecord(index, reason))

    def _is_dropped_duplicate(self, index: int, request: EditRequest) -> bool:
        key = _dedupe_key(request)
        first = self.seen.setdefault(key, index)
        if first == index or self.dedupe == "keep":
            return False
        reason = f"duplicate of record {first} (same prompt and target: {key[0][:80]!r} -> {key[1][:40]!r})"
        if self.dedupe == "error":
            raise DataFormatError(self.path, reason, index)
        self.skipped.append(SkippedRecord(index, reason))
        return True

    def dataset(self) -> EditDataset:
        return EditDataset(self.records, str(self.path), self.spec.name, self.skipped, self.notes)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")


def _check_args(format: str | None, limit: int | None, dedupe: str) -> None:
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; known: {sorted(FORMATS)}")
    _check_limit(limit)
    if dedupe not in DEDUPE_MODES:
        raise ValueError(f"dedupe must be one of {DEDUPE_MODES}, got {dedupe!r}")


def _log_summary(ds: EditDataset) -> None:
    logger.info("loaded %d %s requests from %s", len(ds), ds.format, ds.source)
    if ds.skipped:
        first = ds.skipped[0]
        logger.warning("%s: skipped %d record(s); first: record %d: %s",
                       ds.source, len(ds.skipped), first.index, first.reason)
    if ds.notes:
        first_note = ds.notes[0]
        logger.warning("%s: omitted parts of %d record(s); first: record %d: %s",
                       ds.source, len({n.index for n in ds.notes}), first_note.index, first_note.message)


def load_dataset(path: PathLike, format: str | None = None, limit: int | None = None,
                 skip_invalid: bool = False, dedupe: str = "error") -> EditDataset:
    """Load an editing dataset; see the module docstring for formats and rules.

    ``format``: a name in :data:`FORMATS`, or ``None`` to detect it from the first record's keys.
    ``limit``: keep the file's first ``limit`` records (counted before validation).
    ``skip_invalid``: list invalid records in ``skipped`` instead of raising :class:`DataFormatError`.
    ``dedupe``: ``"error"``, ``"skip"`` or ``"keep"`` for records repeating an earlier prompt and target.
    """
    _check_args(format, limit, dedupe)
    file = Path(path)
    raw = _read_raw(file, FORMATS[format] if format is not None else None)
    spec = _resolve_spec(file, raw, format)
    collector = _Collector(file, spec, skip_invalid, dedupe)
    for index, item in enumerate(raw if limit is None else raw[:limit]):
        collector.add(index, item)
    ds = collector.dataset()
    _log_summary(ds)
    return ds


def load_zsre(path: PathLike, limit: int | None = None, skip_invalid: bool = False,
              dedupe: str = "error") -> EditDataset:
    """ZsRE in the MEND format (``src, alt, rephrase, loc, loc_ans``)."""
    return load_dataset(path, "zsre", limit, skip_invalid, dedupe)


def load_hallucination(path: PathLike, limit: int | None = None, skip_invalid: bool = False,
                       dedupe: str = "error") -> EditDataset:
    """WISE hallucination (``prompt, target_new, locality_prompt, locality_ground_truth``)."""
    return load_dataset(path, "hallucination", limit, skip_invalid, dedupe)


def load_counterfact(path: PathLike, limit: int | None = None, skip_invalid: bool = False,
                     dedupe: str = "error") -> EditDataset:
    """Flat CounterFact (``prompt, target_new, rephrase_prompt, locality_prompt, locality_ground_truth``)."""
    return load_dataset(path, "counterfact", limit, skip_invalid, dedupe)


def load_temporal(path: PathLike, limit: int | None = None, skip_invalid: bool = False,
                  dedupe: str = "error") -> EditDataset:
    """WISE temporal (``prompt, target_new, ood_rephrase, locality_prompt, locality_ground_truth``)."""
    return load_dataset(path, "temporal", limit, skip_invalid, dedupe)


def load_jsonl(path: PathLike, limit: int | None = None, skip_invalid: bool = False,
               dedupe: str = "error") -> EditDataset:
    """Request records (``prompt, target`` + optional fields), one JSON object per line."""
    return load_dataset(path, "jsonl", limit, skip_invalid, dedupe)


def load_text_list(path: PathLike, limit: int | None = None) -> list[str]:
    """A JSON list of non-empty strings (e.g. WISE's locality prompts); the first ``limit`` if given."""
    _check_limit(limit)
    file = Path(path)
    items = _parse_list(file, _read_text(file))
    items = items if limit is None else items[:limit]
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise DataFormatError(file, f"expected a string, got {_type_name(item)}", index)
        if not item.strip():
            raise DataFormatError(file, "string is empty", index)
    logger.info("loaded %d strings from %s", len(items), file)
    return list(items)


def load_reference_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Unrelated text for tau calibration and reference anchors: a JSON list of strings, or the prompts
    of a benchmark file (any format :func:`load_dataset` reads; invalid records skipped); the first
    ``limit``."""
    try:
        return load_text_list(path, limit=limit)
    except DataFormatError:
        ds = load_dataset(path, limit=limit, skip_invalid=True, dedupe="keep")
        return [r.prompt for r in ds.records]
