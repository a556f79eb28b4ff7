"""The SAE shipped for the embedded model."""

import pytest
import torch
from sae_lens import TopKSAE

from microedit_lens import MicroEditor, SAECompatibilityError, load_sae
from microedit_lens.testing import tiny_sae


def test_default_sae_attaches_through_saelens(smollm, default_sae):
    assert isinstance(default_sae, TopKSAE)
    assert default_sae.cfg.rescale_acts_by_decoder_norm is False  # folded before shipping
    assert default_sae.cfg.normalize_activations == "none"
    toks = smollm.to_tokens("The capital of France is", prepend_bos=False)
    with torch.no_grad():
        logits, cache = smollm.run_with_cache_with_saes(toks, saes=[default_sae])
        plain = smollm(toks)
    hook = default_sae.cfg.metadata.hook_name
    acts = cache[f"{hook}.hook_sae_acts_post"]
    assert acts.shape[-1] == default_sae.cfg.d_sae
    assert ((acts[0, 1:] > 0).sum(-1) <= default_sae.cfg.k).all()
    assert not smollm.acts_to_saes  # run_with_saes cleans up
    assert torch.equal(smollm(toks), plain)


def test_width_mismatch_is_a_clear_error(smollm):
    with pytest.raises(SAECompatibilityError, match="d_in=32 does not match the width 576"):
        MicroEditor(smollm, tiny_sae(d_in=32, hook_name="blocks.24.hook_resid_post"))
