import math

import pytest
import torch

from microedit_lens import EditRequest, MicroEditConfig
from microedit_lens import metrics
from microedit_lens.lifelong import LifelongConfig, LifelongRunner, run_lifelong


class FixedModel:
    """A fake 'model': logits that always predict token (last input token + 1)."""

    def __init__(self, tokenizer, vocab=64):
        from types import SimpleNamespace

        self.tokenizer = tokenizer
        self.cfg = SimpleNamespace(n_ctx=64, device="cpu")
        self.vocab = vocab

    def __call__(self, toks):
        nxt = (toks + 1) % self.vocab
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 10


def test_teacher_forced_hand_computed():
    from microedit_lens.testing import CharTokenizer

    tok = CharTokenizer()
    m = FixedModel(tok)
    # "ab" then " bc": after 'b' comes ' ' (predicted 'c'), after ' ' comes 'b' (predicted '!'), after 'b' comes 'c' (predicted 'c')
    tf = metrics.teacher_forced(m, ["ab"], ["bc"])
    assert tf.targets[0].tolist() == tok(" bc").input_ids
    assert tf.accuracy() == [pytest.approx(1 / 3)]
    # right padding in a batch gives the same per-pair results
    tf2 = metrics.teacher_forced(m, ["ab", "a much longer prompt"], ["bc", "x"])
    assert tf2.accuracy()[0] == pytest.approx(1 / 3)
    assert torch.equal(tf2.argmax[0], tf.argmax[0])
    # an answer the model predicts perfectly: accuracy 1, perplexity ~1
    tf3 = metrics.teacher_forced(m, ["ab "], ["abc"])
    assert tf3.accuracy() == [1.0]
    assert tf3.perplexity()[0] == pytest.approx(1 + 63 * math.exp(-10), rel=1e-5)  # softmax of logit 10 vs 63 zeros
    assert metrics.locality([torch.tensor([1, 2, 3])], [torch.tensor([1, 0, 3])]) == [pytest.approx(2 / 3)]


def test_greedy_exact_match():
    from microedit_lens.testing import CharTokenizer

    tok = CharTokenizer()
    m = FixedModel(tok)
    # after "ab " the fake model continues with "abc..."
    assert metrics.greedy_exact_match(m, ["ab ", "ab ", "xy"], ["abc", "zz", "abc"]) == [True, False, False]


def make_records(n):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [
        EditRequest(f"{words[i % 8]} is near", f"{words[(i + 3) % 8]}", paraphrases=(f"near {words[i % 8]}",),
                    locality_prompts=(f"the {words[(i + 5) % 8]} house",), locality_answers=("red",))
        for i in range(n)
    ]


CFG = dict(lr=5e-2, stage1_max_steps=3, stage2_max_steps=8, target_margin=0.0, revert_unrouted=False)  # applied updates (see test_editor.FAST)
REFS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world and friends", "rain falls in spring time"]


def test_chunking_T1_equals_independent_edits(tiny_model, tiny_sae):
    recs = make_records(4)
    res = run_lifelong(tiny_model, tiny_sae, recs, LifelongConfig(T=[1, 2], generative=False),
                       method_config=MicroEditConfig(**CFG), reference_texts=REFS)
    assert res.runs[1].n_chunks == 4 and res.runs[2].n_chunks == 2
    assert [r.index for r in res.runs[1].records] == [0, 1, 2, 3]
    # T=1 score of record 2 equals editing record 2 alone on a fresh editor
    runner = LifelongRunner(tiny_model, tiny_sae, "microedit", MicroEditConfig(**CFG), REFS)
    base = runner.baselines(recs, 8)
    runner.editor.edit(recs[2])
    alone = runner.score([recs[2]], [2], base, LifelongConfig(T=[1], generative=False), [(True, 0.0)])[0]
    runner.close()
    assert alone.reliability == res.runs[1].records[2].reliability
    assert alone.locality == res.runs[1].records[2].locality
    for r in res.runs.values():
        assert 0 <= r.reliability <= 1 and 0 <= r.locality <= 1 and r.ppl >= 1
    assert "| microedit |" in res.to_markdown()


def test_locality_baseline_is_pre_edit(tiny_model, tiny_sae):
    recs = make_records(2)
    runner = LifelongRunner(tiny_model, tiny_sae, "microedit", MicroEditConfig(**CFG, tau=1e9), REFS)
    base = runner.baselines(recs, 8)
    with runner.editor.detached():
        plain = metrics.teacher_forced(tiny_model, [recs[0].locality_prompts[0]], [recs[0].locality_answers[0]])
    assert torch.equal(base.loc[0][0], plain.argmax[0])
    runner.close()


def interrupted_run(model, sae, recs, cfg, after_edits: int, runner: LifelongRunner | None = None) -> None:
    """Run the protocol and interrupt it (KeyboardInterrupt) when edit number ``after_edits + 1`` starts."""
    runner = runner or LifelongRunner(model, sae, "microedit", MicroEditConfig(**CFG), REFS)
    calls = {"n": 0}
    real_edit = runner.editor.edit

    def flaky(req):
        calls["n"] += 1
        if calls["n"] == after_edits + 1:
            raise KeyboardInterrupt
        return real_edit(req)

    runner.editor.edit = flaky
    with pytest.raises(KeyboardInterrupt):
        runner.run(recs, cfg)
    runner.close()


def test_resume_reproduces_results(tiny_model, tiny_sae, tmp_path):
    recs = make_records(6)
    cfg_full = LifelongConfig(T=[3, 6], generative=False)
    full = run_lifelong(tiny_model, tiny_sae, recs, cfg_full, method_config=MicroEditConfig(**CFG), reference_texts=REFS)

    ck = tmp_path / "ck"
    cfg = LifelongConfig(T=[3, 6], generative=False, checkpoint_dir=str(ck), checkpoint_every=2)
    interrupted_run(tiny_model, tiny_sae, recs, cfg, after_edits=8)  # in the middle of the T=6 chunk
    assert (ck / "progress.json").is_file()
    resumed = run_lifelong(tiny_model, tiny_sae, recs, cfg, method_config=MicroEditConfig(**CFG), reference_texts=REFS)
    for T in (3, 6):
        a = [(r.reliability, r.generalization, r.locality, r.ppl) for r in full.runs[T].records]
        b = [(r.reliability, r.generalization, r.locality, r.ppl) for r in resumed.runs[T].records]
        assert a == b


def test_interruption_while_scoring_loses_no_edit_and_keeps_the_final_editor(tiny_model, tiny_sae, tmp_path):
    """A chunk longer than checkpoint_every is saved before it is scored: interrupted in the scoring,
    the run resumes without redoing an edit and gives the same numbers; keep_editor leaves the edited
    state (before scoring) in T<T>_final_editor."""
    from microedit_lens.methods.microedit import MicroEditor

    recs = make_records(4)
    full = run_lifelong(tiny_model, tiny_sae, recs, LifelongConfig(T=[4], generative=False),
                        method_config=MicroEditConfig(**CFG), reference_texts=REFS)
    ck = tmp_path / "ck"
    cfg = LifelongConfig(T=[4], generative=False, checkpoint_dir=str(ck), checkpoint_every=3, keep_editor=True)
    runner = LifelongRunner(tiny_model, tiny_sae, "microedit", MicroEditConfig(**CFG), REFS)
    w_after_edits = {}

    def interrupt(*args, **kwargs):
        w_after_edits["W"] = runner.editor.sae.W_dec.detach().clone()
        raise KeyboardInterrupt

    runner.score = interrupt
    with pytest.raises(KeyboardInterrupt):
        runner.run(recs, cfg)
    runner.close()
    edits = {"n": 0}
    runner = LifelongRunner(tiny_model, tiny_sae, "microedit", MicroEditConfig(**CFG), REFS)
    real_edit = runner.editor.edit

    def counted(req):
        edits["n"] += 1
        return real_edit(req)

    runner.editor.edit = counted
    resumed = runner.run(recs, cfg)
    runner.close()
    assert edits["n"] == 0
    key = lambda r: (r.reliability, r.generalization, r.locality, r.ppl)
    assert [key(r) for r in resumed.runs[4].records] == [key(r) for r in full.runs[4].records]
    assert not (ck / "T4_editor").exists()
    kept = MicroEditor.load(ck / "T4_final_editor", tiny_model, sae=tiny_sae, attach=False)
    assert kept.n_edits == 4 and torch.equal(kept.sae.W_dec, w_after_edits["W"])
    with pytest.raises(ValueError, match="checkpoint_dir"):
        LifelongConfig(keep_editor=True)


def test_shared_prefix_equals_separate_runs(tiny_model, tiny_sae, tmp_path):
    """T=3 and T=5 over 5 records are one chunk each: scoring T=3 at the 3rd edit of the T=5 stream
    gives exactly the numbers of a separate T=3 run, also across an interruption."""
    recs = make_records(5)
    kw = dict(method_config=MicroEditConfig(**CFG), reference_texts=REFS)
    separate = run_lifelong(tiny_model, tiny_sae, recs, LifelongConfig(T=[3, 5], generative=False, share_prefixes=False), **kw)
    ck = tmp_path / "ck"
    cfg = LifelongConfig(T=[5, 3], generative=False, checkpoint_dir=str(ck), checkpoint_every=1)
    interrupted_run(tiny_model, tiny_sae, recs, cfg, after_edits=3)  # after the T=3 prefix was scored
    shared = run_lifelong(tiny_model, tiny_sae, recs, cfg, **kw)
    assert list(shared.runs) == [3, 5]
    for T in (3, 5):
        a = [(r.index, r.reliability, r.generalization, r.locality, r.ppl) for r in separate.runs[T].records]
        b = [(r.index, r.reliability, r.generalization, r.locality, r.ppl) for r in shared.runs[T].records]
        assert a == b and shared.runs[T].n_records == T


def test_logits_at_matches_full_forward_on_a_hooked_model(tiny_model):
    from microedit_lens.metrics import logits_at

    toks = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 2])
    with torch.no_grad():
        full = tiny_model(toks)[rows, cols]
        torch.testing.assert_close(logits_at(tiny_model, toks, rows, cols), full, rtol=1e-5, atol=1e-5)


def test_runner_detaches_when_calibration_fails(tiny_model, tiny_sae):
    from microedit_lens.switch import SwitchedSAE

    with pytest.raises(ValueError):
        LifelongRunner(tiny_model, tiny_sae, "microedit", MicroEditConfig(**CFG), ["x" * 10_000])
    assert not any(isinstance(m, SwitchedSAE) for m in tiny_model.modules())


def test_runner_rejects_an_empty_record_list(tiny_model, tiny_sae):
    runner = LifelongRunner(tiny_model, tiny_sae, "microedit", MicroEditConfig(**CFG), REFS)
    with pytest.raises(ValueError, match="no records"):
        runner.run([], LifelongConfig(T=[1], generative=False))
    runner.close()


def test_results_round_trip_through_json_and_merge(tiny_model, tiny_sae, tmp_path):
    from microedit_lens.lifelong import SweepResult

    recs = make_records(4)
    kw = dict(method_config=MicroEditConfig(**CFG), reference_texts=REFS, dataset_name="toy")
    a = run_lifelong(tiny_model, tiny_sae, recs, LifelongConfig(T=[1], generative=False), **kw)
    b = run_lifelong(tiny_model, tiny_sae, recs, LifelongConfig(T=[2, 4], generative=False), **kw)
    back = SweepResult.from_json(a.to_json(tmp_path / "a.json"))
    assert back.runs[1].summary() == pytest.approx(a.runs[1].summary(), nan_ok=True)
    from dataclasses import asdict, replace

    for x, y in zip(back.runs[1].records, a.runs[1].records, strict=True):
        assert asdict(x) == pytest.approx(asdict(y), nan_ok=True)
    merged = SweepResult.merge([back, SweepResult.from_json(b.to_json(tmp_path / "b.json"))])
    assert sorted(merged.runs) == [1, 2, 4] and set(merged.config["per_T"]) == {"1", "2", "4"}
    assert merged.to_markdown().count("|") > 3 * 4
    with pytest.raises(ValueError, match="T=1"):
        SweepResult.merge([back, back])
    elsewhere = replace(SweepResult.from_json(tmp_path / "b.json"), dataset="/some/other/folder/toy")
    assert sorted(SweepResult.merge([back, elsewhere]).runs) == [1, 2, 4]  # the same file, named from elsewhere
    with pytest.raises(ValueError, match="cannot merge"):
        SweepResult.merge([back, replace(elsewhere, dataset="other")])
    with pytest.raises(ValueError, match="no per-record"):
        SweepResult.from_json(a.to_json(tmp_path / "c.json", with_records=False))


def _failing_runner(model, sae, bad_prompt: str) -> LifelongRunner:
    """A runner whose editor raises NumericalEditError (after rolling back) on ``bad_prompt``."""
    from microedit_lens.types import NumericalEditError

    runner = LifelongRunner(model, sae, "microedit", MicroEditConfig(**CFG), REFS)
    real = runner.editor._edit_one

    def edit_one(request, seq):
        if request.prompt == bad_prompt:
            raise NumericalEditError("loss became NaN (injected)")
        return real(request, seq)

    runner.editor._edit_one = edit_one
    return runner


def test_a_failed_edit_is_reported_and_the_stream_goes_on(tiny_model, tiny_sae, tmp_path):
    recs = make_records(4)
    runner = _failing_runner(tiny_model, tiny_sae, recs[1].prompt)
    res = runner.run(recs, LifelongConfig(T=[4], generative=False))
    assert runner.editor.n_edits == 0  # rolled back after scoring, as always
    runner.close()
    rows = res.runs[4].records
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert "NaN (injected)" in rows[1].edit_error and not rows[1].edit_success
    assert all(r.edit_error == "" for r in rows if r.index != 1)
    assert res.runs[4].edit_errors == 1 and res.runs[4].summary()["edit_errors"] == 1
    # the same stream, interrupted after the failed edit and resumed, gives the same numbers
    ck = tmp_path / "ck"
    cfg = LifelongConfig(T=[4], generative=False, checkpoint_dir=str(ck), checkpoint_every=1)
    interrupted_run(tiny_model, tiny_sae, recs, cfg, after_edits=3, runner=_failing_runner(tiny_model, tiny_sae, recs[1].prompt))
    runner = _failing_runner(tiny_model, tiny_sae, recs[1].prompt)
    resumed = runner.run(recs, cfg)
    runner.close()
    key = lambda r: (r.index, r.reliability, r.generalization, r.locality, r.ppl, r.edit_error)
    assert [key(r) for r in resumed.runs[4].records] == [key(r) for r in rows]


def test_eval_cli_runs_the_protocol_and_keeps_the_editor(tiny_model, tiny_sae, tmp_path, monkeypatch):
    """`microedit eval` end to end on the tiny model: results.json has each T's means under the
    documented names, and --keep-editor leaves the edited state of the stream."""
    import json

    import microedit_lens
    from microedit_lens.cli import main
    from microedit_lens.methods.microedit import MicroEditor

    monkeypatch.setattr(microedit_lens, "load_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr(microedit_lens, "load_sae", lambda *a, **k: tiny_sae)
    data = tmp_path / "reqs.jsonl"
    data.write_text("\n".join(json.dumps(r.to_dict()) for r in make_records(4)))
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(REFS))
    out, ck = tmp_path / "results.json", tmp_path / "ck"
    rc = main(["eval", "--data", str(data), "--T", "1", "4", "--reference", str(refs), "--no-generative",
               "--config", json.dumps(CFG), "--checkpoint-dir", str(ck), "--keep-editor", "--out", str(out)])
    assert rc == 0
    runs = json.loads(out.read_text())["results"]
    for T in ("1", "4"):
        assert {"reliability", "generalization", "locality"} <= set(runs[T])
    kept = MicroEditor.load(ck / "T4_final_editor", tiny_model, sae=tiny_sae, attach=False)
    assert kept.n_edits == 4 and MicroEditor.load(ck / "T1_final_editor", tiny_model, sae=tiny_sae, attach=False).n_edits == 1


def _editor_above_block_0(model, refs, n_edits=3):
    """An editor whose SAE sits in block 1 of the 2-block tiny model (block 0 is then never changed)."""
    from microedit_lens import MicroEditor
    from microedit_lens.testing import tiny_sae

    ed = MicroEditor(model, tiny_sae(hook_name="blocks.1.hook_resid_post"), MicroEditConfig(**CFG))
    ed.calibrate(refs)
    ed.edit(make_records(n_edits))
    return ed


def test_lower_cache_scores_equal_full_passes(tiny_model):
    """Scoring that starts at the switch's block from cached lower blocks gives the full passes'
    teacher-forced argmax and NLL, and the same greedy exact matches (decoding steps run over
    prefixes of the cached sequences), with some inputs in scope and some out."""
    ed = _editor_above_block_0(tiny_model, REFS)
    assert ed.unchanged_blocks == 1
    prompts = ["alpha is near", "near beta", "the gamma house", "delta is near", "some other text", "kappa is near"]
    answers = ["delta", "epsilon", "red", "omega", "here", "alpha"]
    ed.tau = float(ed.route([p + " " + a for p, a in zip(prompts, answers)]).ard.median())
    on = ed.route(prompts).on
    assert on.any() and not on.all()
    with ed.attached():
        full = metrics.teacher_forced(tiny_model, prompts, answers, 4, ed.padding)
        lower = metrics.LowerCache(tiny_model, 1, batch_size=3)
        cached = metrics.teacher_forced(tiny_model, prompts, answers, 4, ed.padding, lower)
        assert len(lower) == len(prompts)
        for a, b, na, nb in zip(full.argmax, cached.argmax, full.nll, cached.nll):
            assert torch.equal(a, b)
            torch.testing.assert_close(na, nb, rtol=1e-5, atol=1e-5)
        for steps in (0, 2):
            want = metrics.greedy_exact_match(tiny_model, prompts, answers, 4, ed.padding, ed.prefix_logits_at, steps)
            assert metrics.greedy_exact_match(tiny_model, prompts, answers, 4, ed.padding, ed.prefix_logits_at, steps, lower) == want
        assert metrics.greedy_exact_match(tiny_model, prompts, answers, 4, ed.padding, lower=lower) == \
            metrics.greedy_exact_match(tiny_model, prompts, answers, 4, ed.padding)
    ed.detach()


def test_lower_cache_checks_its_inputs_and_scopes_entries(tiny_model):
    from microedit_lens.testing import CharTokenizer

    for layer in (0, 3):
        with pytest.raises(ValueError, match="layer"):
            metrics.LowerCache(tiny_model, layer)
    with pytest.raises(ValueError, match="TransformerLens"):
        metrics.LowerCache(FixedModel(CharTokenizer()), 1)
    lower = metrics.LowerCache(tiny_model, 1)
    lower.add([[1, 2, 3]])
    with lower.scoped():
        lower.add([[4, 5], [1, 2, 3]])
        assert len(lower) == 2
    assert len(lower) == 1
    toks, pad = metrics._pad([[1, 2], [9, 9]], 0)
    with pytest.raises(ValueError, match="prefix"):
        lower.inputs(toks, pad, [[1, 2, 3], [1, 2, 3]])
    x = lower.inputs(toks[:1], pad[:1], [[1, 2, 3]])
    full = tiny_model(torch.tensor([[1, 2]]), stop_at_layer=1)
    assert x.start == 1 and torch.equal(x.resid, full)


def test_lifelong_scores_with_and_without_the_lower_cache(tiny_model):
    """The protocol's numbers do not depend on the lower cache (to float rounding)."""
    from microedit_lens.testing import tiny_sae

    recs = make_records(4)
    out = {}
    for on in (True, False):
        res = run_lifelong(tiny_model, tiny_sae(hook_name="blocks.1.hook_resid_post"), recs,
                           LifelongConfig(T=[2, 4], lower_cache=on), method_config=MicroEditConfig(**CFG), reference_texts=REFS)
        out[on] = [(r.reliability, r.generalization, r.locality, r.rel_generative) for run in res.runs.values() for r in run.records]
        ppl = [r.ppl for run in res.runs.values() for r in run.records]
        out[on, "ppl"] = ppl
    assert out[True] == out[False]
    assert out[True, "ppl"] == pytest.approx(out[False, "ppl"], rel=1e-5)
