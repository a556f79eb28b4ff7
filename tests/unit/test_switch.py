import pytest
import torch

from microedit_lens.switch import SwitchedSAE, SwitchMode, ard, sparse_decode, topk_codes, valid_positions


def test_sparse_decode_matches_sae_decode(tiny_sae):
    z = torch.randn(3, 7, 32)
    feats = tiny_sae.encode(z)
    vals, idx = topk_codes(feats, tiny_sae.cfg.k)
    torch.testing.assert_close(sparse_decode(vals, idx, tiny_sae.W_dec, tiny_sae.b_dec), tiny_sae.decode(feats), rtol=1e-5, atol=1e-5)


def test_ard_hand_computed():
    z = torch.zeros(1, 3, 2)
    recon = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0]]])
    valid = valid_positions(1, 3, 1, z.device)
    # positions 1, 2: (1 + 4) / (alpha * 2)
    assert ard(recon, z, valid, alpha=10.0).item() == pytest.approx(5.0 / 20.0)
    # padding excluded; no valid position -> inf
    pad = torch.tensor([[False, False, True]])
    assert ard(recon, z, valid_positions(1, 3, 1, z.device, pad), alpha=10.0).item() == pytest.approx(1.0 / 10.0)
    assert ard(recon, z, valid_positions(1, 3, 5, z.device), alpha=1.0).item() == float("inf")


def test_switch_routes_per_input(tiny_sae):
    z = torch.randn(4, 5, 32)
    sw = SwitchedSAE(tiny_sae, tau=0.0, alpha=1.0)
    a = ard(sw.reconstruct(z), z, valid_positions(4, 5, 1, z.device), 1.0)
    sw.tau = float(a.median().detach())
    out = sw(z)
    on = a <= sw.tau
    assert torch.equal(sw.last_on, on)
    recon = sw.reconstruct(z)
    for i in range(4):
        assert torch.equal(out[i, 0], z[i, 0])  # position 0 is never replaced
        expect = recon[i, 1:] if on[i] else z[i, 1:]
        assert torch.equal(out[i, 1:], expect)
    with sw.mode_as(SwitchMode.NEVER):
        assert torch.equal(sw(z), z)
    with sw.mode_as("always"):
        assert torch.equal(sw(z)[:, 1:], recon[:, 1:])
    assert sw.mode is SwitchMode.AUTO


def test_bypass_mask_restores(tiny_sae):
    sw = SwitchedSAE(tiny_sae, tau=1e9, alpha=1.0)
    z = torch.randn(1, 4, 32)
    mask = torch.tensor([[False, False, True, True]])
    with sw.bypass(mask):
        out = sw(z)
        assert torch.equal(out[0, 2:], z[0, 2:])
    assert sw._token_mask is None


def test_reconstruct_matches_saelens_with_and_without_code_hooks(tiny_sae):
    torch.manual_seed(0)
    z = torch.randn(2, 5, tiny_sae.cfg.d_in)
    sw = SwitchedSAE(tiny_sae, tau=1.0, alpha=1.0)
    expected = tiny_sae.decode(tiny_sae.encode(z))
    torch.testing.assert_close(sw.reconstruct(z), expected, rtol=1e-5, atol=1e-5)
    seen = []

    def ablate_first(acts, hook):  # a hook on the codes sees the dense codes and its edit is decoded
        seen.append(acts.clone())
        acts[..., 0] = 0.0
        return acts

    tiny_sae.hook_sae_acts_post.add_hook(ablate_first)
    try:
        out = sw.reconstruct(z)
    finally:
        tiny_sae.hook_sae_acts_post.remove_hooks()
    torch.testing.assert_close(seen[0], tiny_sae.encode(z))
    feats = tiny_sae.encode(z)
    feats[..., 0] = 0.0
    torch.testing.assert_close(out, tiny_sae.decode(feats), rtol=1e-5, atol=1e-5)


def test_prefix_ard_is_the_ard_of_each_cut_input():
    torch.manual_seed(0)
    z, recon = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    from microedit_lens.switch import prefix_ard

    pre = prefix_ard(recon, z, valid_positions(2, 6, 1, z.device, pad), alpha=3.0)
    assert torch.isinf(pre[:, 0]).all()  # only position 0 so far: never in scope
    for b, n in ((0, 6), (1, 4)):
        for p in range(1, n):
            cut = ard(recon[b : b + 1, : p + 1], z[b : b + 1, : p + 1], valid_positions(1, p + 1, 1, z.device), 3.0)
            assert pre[b, p].item() == pytest.approx(cut.item(), rel=1e-6)


def test_switch_records_prefix_ard_only_when_asked(tiny_sae):
    sw = SwitchedSAE(tiny_sae, tau=1.0, alpha=1.0)
    z = torch.randn(2, 5, 32)
    sw(z)
    assert sw.last_prefix_ard is None
    with sw.recording_prefix_ard():
        sw(z)
    assert sw.last_prefix_ard.shape == (2, 5) and not sw.record_prefix_ard
    torch.testing.assert_close(sw.last_prefix_ard[:, -1], sw.last_ard)
