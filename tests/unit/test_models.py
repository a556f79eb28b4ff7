import copy

import pytest
import torch

from microedit_lens import ModelLoadError, load_model
from microedit_lens.models import relayout_for_inference, tiny_config


def test_tiny_config_model_is_hooked_sae_transformer():
    from sae_lens import HookedSAETransformer

    m = load_model(tiny_config())
    assert isinstance(m, HookedSAETransformer)
    assert m.cfg.default_prepend_bos is False
    assert "blocks.1.hook_resid_post" in m.hook_dict
    assert not any(p.requires_grad for p in m.parameters())


def test_relayout_is_bitwise_identical():

    cfg = tiny_config()
    torch.manual_seed(0)
    m = load_model(cfg)
    ref = copy.deepcopy(m)
    # undo the layout on the reference: contiguous copies of every parameter
    with torch.no_grad():
        for mod in ref.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, torch.nn.Parameter(p.detach().contiguous(), requires_grad=False))
    toks = torch.randint(0, cfg.d_vocab, (2, 9))
    assert torch.equal(m(toks), ref(toks))
    assert m.blocks[0].mlp.W_in.T.is_contiguous()
    relayout_for_inference(ref)
    assert torch.equal(ref(toks), m(toks))


def test_unknown_model_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load TransformerLens model 'no-such-model-xyz'"):
        load_model("no-such-model-xyz")


def test_bad_source_type():
    with pytest.raises(TypeError):
        load_model(3.5)


def test_sae_training_autocast_follows_the_cpu():
    from microedit_lens.models import bf16_is_native
    from microedit_lens.sae_training import TrainSAEConfig, _autocast

    assert _autocast(TrainSAEConfig(text_files=["a.txt"], output_dir="out")) == bf16_is_native("cpu")
    for forced in (True, False):
        assert _autocast(TrainSAEConfig(text_files=["a.txt"], output_dir="out", autocast_lm=forced)) is forced
