"""The benchmark scripts' own computations (benchmarks/ is not a package: loaded by path)."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from microedit_lens import EditRequest, MicroEditConfig, MicroEditor

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def _load_script(name: str) -> ModuleType:
    """A benchmark script as a module, with benchmarks/ on the path while it loads (for ``_common``)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


ard_parts = _load_script("ard_parts")
late_edits = _load_script("late_edits")
scope_drift = _load_script("scope_drift")
scope_spectrum = _load_script("scope_spectrum")


def test_subject_positions(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok("who founded acme corp?").input_ids
    mask = ard_parts.subject_positions(tok, ids, "acme corp")
    assert "".join(c for c, m in zip("who founded acme corp?", mask) if m) == "acme corp"
    assert not ard_parts.subject_positions(tok, ids, "zeta").any()
    assert not ard_parts.subject_positions(tok, ids, None).any()


def test_parts_sum_to_the_switch_ard(tiny_model, tiny_sae, reference_texts):
    """subject + other + target = the ARD the switch computes for prompt + target, over tau, under the
    current decoder; under the unedited decoder it is the pre-edit ARD."""
    ed = MicroEditor(tiny_model, tiny_sae, MicroEditConfig(lr=5e-2, stage1_max_steps=5, stage2_max_steps=15, target_margin=0.0, revert_unrouted=False))
    ed.calibrate(reference_texts)
    before = ed.route(["abc def xyz"]).ard.item() / ed.tau
    ed.edit(EditRequest("abc def", "xyz", subject="def"))
    parts, unedited = ard_parts.parts_over_tau(ed, "abc def", "xyz", "def", (ed.sae.W_dec, ed._W_dec0))
    assert all(p >= 0 for p in parts) and parts[0] > 0
    assert sum(parts) == pytest.approx(ed.route(["abc def xyz"]).ard.item() / ed.tau, rel=1e-5)
    assert sum(unedited) == pytest.approx(before, rel=1e-5)
    assert not torch.equal(ed.sae.W_dec, ed._W_dec0)


def test_late_edits_times_edits_and_counts_solves(tiny_model, tiny_sae, reference_texts):
    """timed_edits makes the edits and counts the constraint solves; the solve is restored after."""
    original = MicroEditor.__dict__["_solve_constraints"]
    ed = MicroEditor(tiny_model, tiny_sae)
    ed.calibrate(reference_texts)
    out = late_edits.timed_edits(ed, [EditRequest("abc def", "xyz"), EditRequest("ghi jkl", "uvw")])
    assert ed.n_edits == 2 and out["edits"] == 2 and len(out["seconds"]) == 2 and len(out["steps"]) == 2
    assert out["solves"] > 0 and out["solve_entries_max"] >= out["solve_entries_mean"] > 0
    assert MicroEditor.__dict__["_solve_constraints"] is original


def test_scope_drift_counts_moves_against_the_switch(tiny_model, tiny_sae, reference_texts):
    """The memory-bank ARD scope_drift counts with is the ARD the switch computes for the edit
    sequence; the moves add up to the change in the in-scope count."""
    ed = MicroEditor(tiny_model, tiny_sae, MicroEditConfig(lr=5e-2, stage1_max_steps=5, stage2_max_steps=15, target_margin=0.0, revert_unrouted=False))
    ed.calibrate(reference_texts)
    ed.edit([EditRequest("abc def", "xyz"), EditRequest("ghi jkl", "uvw")])
    ard = scope_drift.earlier_ard(ed)
    assert ard == pytest.approx(ed.route(["abc def xyz", "ghi jkl uvw"]).ard.double(), rel=1e-4)
    out = scope_drift.scope_drift(ed, [EditRequest("mno pqr", "stu")])
    assert ed.n_edits == 3 and out["start"]["after_edits"] == 2 and len(out["edits"]) == 1
    step = out["edits"][0]
    assert step["tau"] == ed.tau and step["seconds"] >= 0 and out["s_per_edit"] == step["seconds"]
    assert step["in_scope"] - out["start"]["in_scope"] == step["out_to_in"] - step["in_to_out"]


def test_scope_spectrum_spread_of_each_constraint():
    """spread: per scope constraint its positions and rows, the share of its gradient's squared norm
    in its leading singular terms (rising to 1 at full rank) and the top-4 positions' cosine (1 when
    it has at most 4 positions); recording restores the constraint builder."""
    from microedit_lens.editor import SelectedScope
    from microedit_lens.methods.microedit import _Constraints

    torch.manual_seed(0)
    n, m, d = 30, 10, 8
    A = torch.rand(n, m) * (torch.rand(n, m) > 0.5)
    A[:, 0] += 0.1
    con = torch.tensor([0] * 26 + [1] * 4)
    scope = SelectedScope(A.to_sparse(), torch.randn(n, d), torch.rand(n), con, torch.rand(2).double(), torch.tensor([3, 5]))
    rows = scope_spectrum.spread(scope, torch.tensor([0, 1]), torch.zeros(m, d, dtype=torch.float64))
    assert [r["positions"] for r in rows] == [26, 4] and rows[0]["rows"] == m and 0 < rows[1]["rows"] <= m
    for r in rows:
        assert 0 < r["share_1"] <= r["share_4"] <= r["share_8"] <= r["share_16"] == pytest.approx(1.0)
    assert rows[1]["cos_top4_positions"] == pytest.approx(1.0) and rows[0]["cos_top4_positions"] < 1.0
    original = _Constraints.__dict__["scope"]
    got = []
    with scope_spectrum.recording(got):
        _Constraints.scope(scope, torch.tensor([1]), torch.zeros(m, d, dtype=torch.float64))
    assert len(got) == 1 and got[0]["positions"] == 4 and _Constraints.__dict__["scope"] is original
