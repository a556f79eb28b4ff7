"""Tests for microedit_lens.data: every format and error path on small files in tmp_path, plus a few
checks on the real benchmark files under /work/shared/data (skipped when that folder is missing)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest

from microedit_lens.data import (
    FORMATS,
    DataFormatError,
    EditDataset,
    RecordNote,
    SkippedRecord,
    available_formats,
    detect_format,
    load_counterfact,
    load_dataset,
    load_hallucination,
    load_jsonl,
    load_temporal,
    load_text_list,
    load_zsre,
)
from microedit_lens.types import EditRequest

REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def zsre_rec(i: int = 0, **over: Any) -> dict[str, Any]:
    rec = {
        "subject": f"Subject{i}", "src": f"What is the product made by Subject{i}?", "pred": "uniform",
        "rephrase": f"What does Subject{i} make?", "alt": f"widget{i}", "answers": ["uniform"],
        "loc": f"nq question: who plays role {i}", "loc_ans": f"Actor {i}", "cond": "uniform >> widget",
        "portability": {"New Question": "q?", "New Answer": "a"},
    }
    rec.update(over)
    return rec


def wise_rec(i: int = 0, **over: Any) -> dict[str, Any]:
    rec = {"prompt": f"This is a passage about thing {i}.", "target_new": f"It was made in {1900 + i}.",
           "subject": f"thing {i}", "locality_prompt": f"Some web text {i}", "locality_ground_truth": f" continues {i}"}
    rec.update(over)
    return rec


def cf_rec(i: int = 0, **over: Any) -> dict[str, Any]:
    rec = {"case_id": i, "prompt": f"The mother tongue of Person{i} is", "target_new": "English",
           "subject": f"Person{i}", "ground_truth": "French", "rephrase_prompt": f"Person{i} speaks",
           "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
    rec.update(over)
    return rec


def temporal_rec(i: int = 0, **over: Any) -> dict[str, Any]:
    rec = wise_rec(i, ood_rephrase=f"Thing {i}, a long passage written differently.")
    rec.update(over)
    return rec


def write_json(tmp_path: Path, name: str, obj: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_lines(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(tmp_path: Path, name: str, records: list[Any]) -> Path:
    return write_lines(tmp_path, name, [json.dumps(r) for r in records])


# --------------------------------------------------------------------------------------------------
# formats and mapping


def test_zsre_mapping(tmp_path):
    ds = load_zsre(write_json(tmp_path, "zsre.json", [zsre_rec(0), zsre_rec(1)]))
    assert isinstance(ds, EditDataset) and ds.format == "zsre" and len(ds) == 2
    r = ds[1]
    assert r.prompt == "What is the product made by Subject1?" and r.target == "widget1"
    assert r.paraphrases == ("What does Subject1 make?",)
    assert r.locality_prompts == ("nq question: who plays role 1",) and r.locality_answers == ("Actor 1",)
    assert r.subject == "Subject1"
    assert r.meta == {"source_index": 1, "pred": "uniform", "answers": ["uniform"]}
    assert ds.source == str(tmp_path / "zsre.json") and ds.skipped == [] and ds.notes == []


def test_zsre_optional_fields_may_be_absent(tmp_path):
    rec = {"src": "Q?", "alt": "A", "rephrase": "Q again?", "loc": "nq question: x", "loc_ans": "y"}
    r = load_zsre(write_json(tmp_path, "z.json", [rec]))[0]
    assert r.subject is None and r.meta == {"source_index": 0}


def test_target_kept_as_given(tmp_path):
    r = load_zsre(write_json(tmp_path, "z.json", [zsre_rec(alt=" MAT-49")]))[0]
    assert r.target == " MAT-49" and r.target_text == " MAT-49"
    r = load_zsre(write_json(tmp_path, "z2.json", [zsre_rec(alt="MAT-49 ")]))[0]
    assert r.target == "MAT-49 " and r.target_text == " MAT-49 "


def test_hallucination_mapping(tmp_path):
    ds = load_hallucination(write_json(tmp_path, "h.json", [wise_rec(0)]))
    r = ds[0]
    assert ds.format == "hallucination"
    assert (r.prompt, r.target) == ("This is a passage about thing 0.", "It was made in 1900.")
    assert r.paraphrases == ()
    assert r.locality_prompts == ("Some web text 0",) and r.locality_answers == (" continues 0",)
    assert r.subject == "thing 0" and r.meta == {"source_index": 0}


def test_counterfact_mapping(tmp_path):
    ds = load_counterfact(write_json(tmp_path, "cf.json", [cf_rec(7)]))
    r = ds[0]
    assert ds.format == "counterfact"
    assert (r.prompt, r.target, r.subject) == ("The mother tongue of Person7 is", "English", "Person7")
    assert r.paraphrases == ("Person7 speaks",)
    assert r.locality_prompts == ("Michel Rocard is a native speaker of",) and r.locality_answers == ("French",)
    assert r.meta == {"source_index": 0, "case_id": 7, "ground_truth": "French"}


def test_temporal_mapping(tmp_path):
    r = load_temporal(write_json(tmp_path, "t.json", [temporal_rec(3)]))[0]
    assert r.paraphrases == ("Thing 3, a long passage written differently.",)
    assert r.target == "It was made in 1903." and r.locality_answers == (" continues 3",)


def test_jsonl_mapping(tmp_path):
    path = write_lines(tmp_path, "reqs.jsonl", [
        json.dumps({"prompt": "The capital of France is", "target": "Rome"}),
        "",
        "   ",
        json.dumps({"prompt": "P", "target": "T", "paraphrases": "P2", "locality_prompts": ["L1", "L2"],
                    "locality_answers": ["A1", "A2"], "subject": "S", "meta": {"tag": "x"}}),
        json.dumps({"prompt": "Q", "target": "U", "paraphrases": ["Q2", "Q3"], "locality_prompts": "L"}),
    ])
    ds = load_jsonl(path)
    assert ds.format == "jsonl" and len(ds) == 3
    assert ds[0] == EditRequest("The capital of France is", "Rome")
    assert ds[1].paraphrases == ("P2",) and ds[1].locality_prompts == ("L1", "L2")
    assert ds[1].locality_answers == ("A1", "A2") and ds[1].subject == "S"
    assert ds[1].meta == {"tag": "x", "source_index": 1}  # blank lines do not count as records
    assert ds[2].paraphrases == ("Q2", "Q3") and ds[2].locality_prompts == ("L",) and ds[2].locality_answers == ()


def test_jsonl_round_trips_to_dict(tmp_path):
    reqs = [EditRequest("a b", "c", ("a2",), ("l",), ("m",), "a", {"k": 1}), EditRequest("d e", "f")]
    ds = load_dataset(write_jsonl(tmp_path, "r.jsonl", [r.to_dict() for r in reqs]))
    assert ds.records == reqs  # meta is not compared
    assert ds[0].meta == {"k": 1, "source_index": 0}


def test_jsonl_records_in_a_json_list(tmp_path):
    path = write_json(tmp_path, "reqs.json", [{"prompt": "P", "target": "T"}])
    assert load_dataset(path).format == "jsonl"
    assert load_jsonl(path)[0] == EditRequest("P", "T")


@pytest.mark.parametrize(("name", "records"), [
    ("zsre", [zsre_rec()]),
    ("hallucination", [wise_rec()]),
    ("counterfact", [cf_rec()]),
    ("temporal", [temporal_rec()]),
    ("jsonl", [{"prompt": "P", "target": "T"}]),
])
def test_autodetect_matches_explicit_format(tmp_path, name, records):
    path = write_json(tmp_path, f"{name}.json", records)
    auto = load_dataset(path)
    assert auto.format == name
    assert auto.records == load_dataset(path, format=name).records
    assert detect_format(records[0]) == name


def test_registry():
    assert set(available_formats()) == {"zsre", "hallucination", "counterfact", "temporal", "jsonl"}
    assert all(FORMATS[name].name == name for name in FORMATS)


def test_detect_format_errors():
    with pytest.raises(ValueError, match="cannot detect the format from keys"):
        detect_format({"question": "q", "answer": "a"})
    with pytest.raises(ValueError, match="ambiguous"):
        detect_format(cf_rec(ood_rephrase="x"))
    with pytest.raises(ValueError, match="expected a JSON object"):
        detect_format(["not", "a", "dict"])


def test_autodetect_failure_names_file_and_record(tmp_path):
    path = write_json(tmp_path, "odd.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataFormatError, match=r"^odd\.json: record 0: cannot detect the format") as info:
        load_dataset(path)
    assert info.value.index == 0 and "zsre" in str(info.value)


def test_explicit_format_wrong_for_file(tmp_path):
    path = write_json(tmp_path, "cf.json", [cf_rec()])
    with pytest.raises(DataFormatError, match=r"cf\.json: record 0: missing field 'src'"):
        load_zsre(path)


# --------------------------------------------------------------------------------------------------
# arguments and limit


def test_bad_arguments(tmp_path):
    path = write_json(tmp_path, "z.json", [zsre_rec()])
    with pytest.raises(ValueError, match="unknown data format 'squad'"):
        load_dataset(path, format="squad")
    with pytest.raises(ValueError, match="dedupe"):
        load_dataset(path, dedupe="drop")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            load_dataset(path, limit=bad)


def test_limit_counts_file_records(tmp_path):
    recs = [zsre_rec(0), zsre_rec(1, alt=""), zsre_rec(2), zsre_rec(3, alt=5)]
    path = write_json(tmp_path, "z.json", recs)
    ds = load_zsre(path, limit=3, skip_invalid=True)
    assert [r.meta["source_index"] for r in ds] == [0, 2]
    assert [s.index for s in ds.skipped] == [1]
    assert len(ds) + len(ds.skipped) == 3
    assert len(load_zsre(path, limit=1)) == 1  # the invalid records after the limit are not read
    assert len(load_zsre(path, limit=0)) == 0


# --------------------------------------------------------------------------------------------------
# error paths


def test_missing_field(tmp_path):
    rec = zsre_rec(1)
    del rec["alt"]
    path = write_json(tmp_path, "zsre.json", [zsre_rec(0), rec])
    with pytest.raises(DataFormatError) as info:
        load_zsre(path)
    assert str(info.value) == "zsre.json: record 1: missing field 'alt'"
    assert (info.value.path, info.value.index, info.value.problem) == (str(path), 1, "missing field 'alt'")


@pytest.mark.parametrize(("value", "kind"), [(5, "int"), (None, "null"), (["x"], "list")])
def test_wrong_type(tmp_path, value, kind):
    path = write_json(tmp_path, "zsre.json", [zsre_rec(alt=value)])
    with pytest.raises(DataFormatError, match=rf"^zsre\.json: record 0: field 'alt' is not a string \(got {kind}\)$"):
        load_zsre(path)


@pytest.mark.parametrize("target", ["", "   ", "\n"])
def test_empty_target(tmp_path, target):
    path = write_json(tmp_path, "zsre_mend_eval.json", [zsre_rec(0), zsre_rec(1), zsre_rec(2, alt=target)])
    with pytest.raises(DataFormatError) as info:
        load_zsre(path)
    assert str(info.value) == "zsre_mend_eval.json: record 2: field 'alt' is empty"


def test_empty_prompt(tmp_path):
    path = write_json(tmp_path, "cf.json", [cf_rec(prompt=" ")])
    with pytest.raises(DataFormatError, match=r"cf\.json: record 0: field 'prompt' is empty"):
        load_counterfact(path)


def test_record_not_an_object(tmp_path):
    path = write_json(tmp_path, "h.json", [wise_rec(0), "just a string"])
    with pytest.raises(DataFormatError, match=r"h\.json: record 1: expected a JSON object, got str"):
        load_hallucination(path)


@pytest.mark.parametrize("top", [{"data": []}, "text", 3])
def test_file_not_a_list(tmp_path, top):
    path = write_json(tmp_path, "top.json", top)
    with pytest.raises(DataFormatError, match=r"^top\.json: expected a JSON list of records") as info:
        load_dataset(path)
    assert info.value.index is None
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_dataset(path, skip_invalid=True)  # file-level problems always raise


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"src": "a", "alt": ', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"^broken\.json: invalid JSON at line 1"):
        load_dataset(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes('[{"prompt": "caf\u00e9", "target": "x"}]'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin\.json: not UTF-8"):
        load_dataset(path)


def test_missing_file_is_not_a_format_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope.json")


def test_empty_list(tmp_path):
    path = write_json(tmp_path, "empty.json", [])
    with pytest.raises(DataFormatError, match="no records"):
        load_dataset(path)
    ds = load_zsre(path)
    assert len(ds) == 0 and ds.format == "zsre"


def test_invalid_json_line(tmp_path):
    path = write_lines(tmp_path, "r.jsonl", [json.dumps({"prompt": "P", "target": "T"}), "",
                                             '{"prompt": "Q", "target": ', json.dumps({"prompt": "R", "target": "S"})])
    with pytest.raises(DataFormatError, match=r"^r\.jsonl: record 1: line 3: invalid JSON"):
        load_dataset(path)
    ds = load_dataset(path, skip_invalid=True)
    assert [r.prompt for r in ds] == ["P", "R"]
    assert ds.skipped[0].index == 1 and "line 3: invalid JSON" in ds.skipped[0].reason


def test_invalid_first_json_line_with_autodetect(tmp_path):
    path = write_lines(tmp_path, "r.jsonl", ["not json", json.dumps({"prompt": "P", "target": "T"})])
    with pytest.raises(DataFormatError, match=r"r\.jsonl: record 0: line 1: invalid JSON"):
        load_dataset(path)
    assert len(load_jsonl(path, skip_invalid=True)) == 1


@pytest.mark.parametrize(("record", "problem"), [
    ({"prompt": "P", "target": "T", "paraphrase": "typo"}, r"unknown field\(s\) \['paraphrase'\]"),
    ({"prompt": "P", "target": "T", "paraphrases": ["ok", 3]},
     r"field 'paraphrases' item 1 is not a string \(got int\)"),
    ({"prompt": "P", "target": "T", "paraphrases": {"a": 1}}, r"field 'paraphrases' is not a string or a list"),
    ({"prompt": "P", "target": "T", "locality_prompts": ["a", "b"], "locality_answers": ["x"]},
     r"field 'locality_answers' has 1 items but 'locality_prompts' has 2"),
    ({"prompt": "P", "target": "T", "locality_answers": ["x"]},
     r"field 'locality_answers' has 1 items but 'locality_prompts' has 0"),
    ({"prompt": "P", "target": "T", "meta": [1]}, r"field 'meta' is not an object \(got list\)"),
    ({"prompt": "P", "target": "T", "subject": 4}, r"field 'subject' is not a string \(got int\)"),
    ({"prompt": "P"}, r"missing field 'target'"),
])
def test_jsonl_record_errors(tmp_path, record, problem):
    path = write_jsonl(tmp_path, "r.jsonl", [{"prompt": "A", "target": "B"}, record])
    with pytest.raises(DataFormatError, match=rf"^r\.jsonl: record 1: {problem}"):
        load_jsonl(path)


@pytest.mark.parametrize("case_id", ["7", True, 1.5])
def test_counterfact_case_id_type(tmp_path, case_id):
    path = write_json(tmp_path, "cf.json", [cf_rec(case_id=case_id)])
    with pytest.raises(DataFormatError, match=r"record 0: field 'case_id' is not an integer"):
        load_counterfact(path)


def test_zsre_answers_type(tmp_path):
    path = write_json(tmp_path, "z.json", [zsre_rec(answers=[1])])
    with pytest.raises(DataFormatError, match=r"record 0: field 'answers' item 0 is not a string"):
        load_zsre(path)


def test_skip_invalid_records_every_skip(tmp_path):
    recs = [wise_rec(0), wise_rec(1, target_new=""), 42, wise_rec(3, locality_prompt=None), wise_rec(4)]
    ds = load_hallucination(write_json(tmp_path, "h.json", recs), skip_invalid=True)
    assert [r.meta["source_index"] for r in ds] == [0, 4]
    assert ds.skipped == [
        SkippedRecord(1, "field 'target_new' is empty"),
        SkippedRecord(2, "expected a JSON object, got int"),
        SkippedRecord(3, "field 'locality_prompt' is not a string (got null)"),
    ]
    assert len(ds) + len(ds.skipped) == len(recs)


def test_skipped_records_are_logged(tmp_path, caplog):
    path = write_json(tmp_path, "h.json", [wise_rec(0), wise_rec(1, target_new="")])
    with caplog.at_level(logging.WARNING, logger="microedit_lens.data"):
        load_hallucination(path, skip_invalid=True)
    assert "skipped 1 record(s)" in caplog.text and "record 1" in caplog.text


# --------------------------------------------------------------------------------------------------
# empty auxiliary fields


def test_empty_locality_answer_omits_pair_with_note(tmp_path):
    path = write_json(tmp_path, "h.json", [wise_rec(0), wise_rec(1, locality_ground_truth="")])
    ds = load_hallucination(path)
    assert len(ds) == 2 and ds.skipped == []
    assert ds[1].locality_prompts == () and ds[1].locality_answers == ()
    assert ds.notes == [RecordNote(1, "field 'locality_ground_truth' is empty; locality pair omitted")]


def test_empty_paraphrase_and_subject_are_noted(tmp_path):
    ds = load_zsre(write_json(tmp_path, "z.json", [zsre_rec(rephrase=" ", subject="")]))
    assert ds[0].paraphrases == () and ds[0].subject is None
    assert {n.message for n in ds.notes} == {"field 'rephrase' is empty; omitted", "field 'subject' is empty; omitted"}


def test_jsonl_empty_list_items_are_noted(tmp_path):
    rec = {"prompt": "P", "target": "T", "paraphrases": ["a", ""], "locality_prompts": ["l1", "l2", " "],
           "locality_answers": ["x", "", "z"]}
    ds = load_jsonl(write_jsonl(tmp_path, "r.jsonl", [rec]))
    assert ds[0].paraphrases == ("a",)
    assert ds[0].locality_prompts == ("l1",) and ds[0].locality_answers == ("x",)
    assert [n.message for n in ds.notes] == [
        "field 'paraphrases' item 1 is empty; omitted",
        "locality pair 1 has an empty prompt or answer; omitted",
        "locality pair 2 has an empty prompt or answer; omitted",
    ]


# --------------------------------------------------------------------------------------------------
# duplicates


def dup_file(tmp_path: Path) -> Path:
    duplicate = cf_rec(2, prompt=cf_rec(0)["prompt"], ground_truth="X")
    return write_json(tmp_path, "cf.json", [cf_rec(0), cf_rec(1), duplicate])


def test_dedupe_error_names_both_records(tmp_path):
    with pytest.raises(DataFormatError, match=r"^cf\.json: record 2: duplicate of record 0") as info:
        load_counterfact(dup_file(tmp_path))
    assert info.value.index == 2
    with pytest.raises(DataFormatError, match="duplicate of record 0"):
        load_counterfact(dup_file(tmp_path), skip_invalid=True)  # skip_invalid does not cover duplicates


def test_dedupe_skip_and_keep(tmp_path):
    skipped = load_counterfact(dup_file(tmp_path), dedupe="skip")
    assert [r.meta["case_id"] for r in skipped] == [0, 1]
    assert len(skipped.skipped) == 1 and skipped.skipped[0].index == 2
    assert skipped.skipped[0].reason.startswith("duplicate of record 0")
    kept = load_counterfact(dup_file(tmp_path), dedupe="keep")
    assert [r.meta["case_id"] for r in kept] == [0, 1, 2] and kept.skipped == []


def test_dedupe_ignores_surrounding_whitespace(tmp_path):
    path = write_json(tmp_path, "z.json", [zsre_rec(0, alt="species"), zsre_rec(0, alt=" species")])
    with pytest.raises(DataFormatError, match="record 1: duplicate of record 0"):
        load_zsre(path)


def test_same_prompt_different_target_is_not_a_duplicate(tmp_path):
    path = write_json(tmp_path, "z.json", [zsre_rec(0, alt="a"), zsre_rec(0, alt="b")])
    assert len(load_zsre(path)) == 2


# --------------------------------------------------------------------------------------------------
# containers and errors


def test_dataset_container(tmp_path):
    ds = load_zsre(write_json(tmp_path, "z.json", [zsre_rec(i) for i in range(5)]))
    assert len(ds) == 5
    assert ds[0].target == "widget0" and ds[-1].target == "widget4"
    assert [r.target for r in ds] == [f"widget{i}" for i in range(5)]
    sliced = ds[1:3]
    assert isinstance(sliced, EditDataset) and [r.target for r in sliced] == ["widget1", "widget2"]
    assert (sliced.source, sliced.format) == (ds.source, ds.format)
    head = ds.head(2)
    assert isinstance(head, EditDataset) and head.records == ds.records[:2]
    assert len(ds.head(99)) == 5 and len(ds) == 5
    with pytest.raises(ValueError):
        ds.head(-1)
    assert repr(ds) == f"EditDataset(format='zsre', source={ds.source!r}, records=5, skipped=0, notes=0)"


def test_data_format_error():
    err = DataFormatError("/x/y/zsre_mend_eval.json", "field 'alt' is empty", 17)
    assert isinstance(err, ValueError)
    assert str(err) == "zsre_mend_eval.json: record 17: field 'alt' is empty"
    assert str(DataFormatError("/x/f.json", "bad")) == "f.json: bad"
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.path, copy.index, copy.problem) == (str(err), err.path, 17, err.problem)


def test_load_text_list(tmp_path):
    path = write_json(tmp_path, "loc.json", ["nq question: a b", "nq question: c d"])
    assert load_text_list(path) == ["nq question: a b", "nq question: c d"]
    assert load_text_list(path, limit=1) == ["nq question: a b"]


@pytest.mark.parametrize(("content", "problem"), [
    (["ok", 3], r"^loc\.json: record 1: expected a string, got int$"),
    (["ok", "  "], r"^loc\.json: record 1: string is empty$"),
    ({"a": "b"}, r"^loc\.json: expected a JSON list"),
])
def test_load_text_list_errors(tmp_path, content, problem):
    with pytest.raises(DataFormatError, match=problem):
        load_text_list(write_json(tmp_path, "loc.json", content))


# --------------------------------------------------------------------------------------------------
# the real benchmark files


@pytest.fixture(scope="module")
def real() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {REAL_DATA}")
    return REAL_DATA


def test_real_zsre_eval(real):
    ds = load_dataset(real / "zsre" / "zsre_mend_eval_portability_gpt4.json")
    assert ds.format == "zsre" and len(ds) >= 1000 and ds.skipped == []
    r = ds[0]
    assert r.prompt == "When was the inception of IAAF Combined Events Challenge?" and r.target == "2006"
    assert r.paraphrases == ("When was the IAAF Combined Events Challenge launched?",)
    assert r.subject == "IAAF Combined Events Challenge" and len(r.locality_prompts) == 1
    assert "portability" not in r.meta
    stream = load_zsre(real / "zsre" / "zsre_mend_eval_portability_gpt4.json", limit=1000)
    assert len(stream) == 1000 and stream.records == ds.records[:1000]


def test_real_zsre_train_has_two_empty_targets(real):
    path = real / "zsre" / "zsre_mend_train-1k.json"
    with pytest.raises(DataFormatError, match="record 534: field 'alt' is empty"):
        load_zsre(path)
    ds = load_zsre(path, skip_invalid=True)
    assert len(ds) == 998 and [s.index for s in ds.skipped] == [534, 723]


def test_real_wise_loc_prompts(real):
    prompts = load_text_list(real / "zsre" / "wise_loc_prompts_zsre_mend_train_first1000.json")
    assert len(prompts) == 1000 and all(p.startswith("nq question:") for p in prompts)


def test_real_counterfact(real):
    path = real / "counterfact" / "counterfact-edit.json"
    with pytest.raises(DataFormatError, match="record 4108: duplicate of record 1691"):
        load_dataset(path)
    ds = load_dataset(path, dedupe="keep")
    assert ds.format == "counterfact" and len(ds) == 10000
    assert ds[0].prompt == "The mother tongue of Danielle Darrieux is" and ds[0].target == "English"
    assert ds[0].meta == {"source_index": 0, "case_id": 0, "ground_truth": "French"}
    assert len(load_counterfact(path, dedupe="skip")) == 9996


def test_real_hallucination(real):
    ds = load_dataset(real / "hallucination" / "hallucination-edit.json")
    assert ds.format == "hallucination" and len(ds) == 600 and ds.skipped == []
    assert all(r.paraphrases == () for r in ds)
    assert len(ds.notes) == 7  # records whose locality_ground_truth is empty keep their edit
    assert len(load_hallucination(real / "hallucination" / "hallucination-train.json")) == 306


def test_real_temporal(real):
    for name in ("temporal-edit.json", "temporal-train.json"):
        ds = load_dataset(real / "temporal" / name)
        assert ds.format == "temporal" and len(ds) == 75 and all(len(r.paraphrases) == 1 for r in ds)


def test_reference_texts_from_a_text_list_or_a_benchmark(tmp_path):
    from microedit_lens.data import load_reference_texts

    (tmp_path / "l.json").write_text(json.dumps(["a b", "c d", "e f"]))
    assert load_reference_texts(tmp_path / "l.json", 2) == ["a b", "c d"]
    rec = {"locality_prompt": "l", "locality_ground_truth": "g"}
    recs = [{"prompt": "p1", "target_new": "t", **rec}, {"prompt": "p2", "target_new": "", **rec}, {"prompt": "p3", "target_new": "t", **rec}]
    (tmp_path / "h.json").write_text(json.dumps(recs))
    assert load_reference_texts(tmp_path / "h.json") == ["p1", "p3"]  # invalid record skipped, not fatal
