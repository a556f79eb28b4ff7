"""The embedded SmolLM2-135M-Instruct: offline loading, HF parity, cache behaviour."""

import shutil

import pytest
import torch

from microedit_lens import models
from microedit_lens.models import load_hf_embedded, load_model


def test_logits_match_hf(smollm):
    hf, tok = load_hf_embedded()
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        a = hf(ids).logits
        b = smollm(ids)
    assert (a - b).abs().max().item() < 1e-3
    assert smollm.to_string(b[0, -1].argmax()) == " Paris"
    assert smollm.cfg.default_prepend_bos is False


def test_second_load_hits_the_cache(smollm, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_embedded", lambda info: calls.append(info))
    m = load_model()
    assert calls == []
    toks = torch.tensor([[504, 414, 46682]])
    with torch.no_grad():
        assert torch.equal(m(toks), smollm(toks))


def test_corrupt_cache_is_rebuilt(smollm, tmp_path, monkeypatch):  # smollm: the real cache exists
    info = models.embedded_model_info()
    assert (info.cache_dir / "DONE").is_file()
    monkeypatch.setenv("MICROEDIT_CACHE", str(tmp_path))
    new = models.embedded_model_info()
    shutil.copytree(info.cache_dir, new.cache_dir)
    (new.cache_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    m = load_model()
    toks = torch.tensor([[504, 414, 46682]])
    with torch.no_grad():
        logits = m(toks)
    assert torch.isfinite(logits).all()
    assert (new.cache_dir / "model.safetensors").stat().st_size > 100_000_000
