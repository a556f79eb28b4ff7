"""MicroEdit on the embedded model: 20 counterfactual edits made sequentially, then all scored."""

import pytest
import torch

from microedit_lens import MicroEditor, metrics
from microedit_lens.facts import REFERENCE_PROMPTS, demo_requests


@pytest.fixture(scope="module")
def edited(smollm, default_sae):
    editor = MicroEditor(smollm, default_sae)
    editor.calibrate(REFERENCE_PROMPTS)
    reqs = demo_requests()
    locs = [p for r in reqs for p in r.locality_prompts]
    with editor.detached():
        loc_pre = metrics.teacher_forced(smollm, locs, [""] * len(locs)).argmax
    results = editor.edit(reqs)
    yield editor, reqs, results, locs, loc_pre
    editor.detach()


def test_every_target_is_the_argmax_after_all_edits(edited, smollm):
    editor, reqs, results, _, _ = edited
    tf = metrics.teacher_forced(smollm, [r.prompt for r in reqs], [r.target for r in reqs], padding=editor.padding)
    rel = tf.accuracy()
    assert metrics.mean(rel) == 1.0, [(r.prompt, a) for r, a in zip(reqs, rel) if a < 1]


def test_unrelated_prompts_keep_their_argmax(edited, smollm):
    editor, _, _, locs, loc_pre = edited
    post = metrics.teacher_forced(smollm, locs, [""] * len(locs), padding=editor.padding).argmax
    assert metrics.mean(metrics.locality(loc_pre, post)) >= 0.99


def test_generalization_is_reported(edited, smollm):
    editor, reqs, _, _, _ = edited
    pairs = [(p, r.target) for r in reqs for p in r.paraphrases]
    gen = metrics.mean(metrics.teacher_forced(smollm, [p for p, _ in pairs], [t for _, t in pairs], padding=editor.padding).accuracy())
    print(f"\nGeneralization on {len(pairs)} paraphrases after 20 sequential edits: {gen:.2f}")
    assert 0.0 <= gen <= 1.0


def test_detach_restores_the_plain_model(edited, smollm):
    editor, reqs, _, _, _ = edited
    toks = torch.tensor([smollm.tokenizer(reqs[0].prompt, add_special_tokens=False).input_ids])
    with editor.detached():
        plain = smollm(toks)
        assert smollm.to_string(plain[0, -1].argmax()) == " Paris"
    assert editor.is_attached
