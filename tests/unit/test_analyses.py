"""The Section 2 studies (package ``analyses``) on the tiny random model and SAE: shapes, value
ranges, determinism, config validation, figures and the registry."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from analyses import ANALYSES, get_spec, run_analysis
from analyses import active_random_mutex as arm
from analyses import entanglement, geometry, masking, sparsity
from analyses.common import (
    agreement,
    chance_jaccard,
    collect_mlp_acts,
    jaccard_matrix,
    logits_with_neuron_masks,
    resolve_layers,
    stat_positions,
    tokenize,
)
from analyses.prompts import ENTANGLEMENT_STATEMENTS, ENTANGLEMENT_TOPICS, KNOWLEDGE_PROMPTS, LOCALITY_PROMPTS

PROMPTS = KNOWLEDGE_PROMPTS[:8]


@pytest.fixture(scope="module")
def tiny_model():
    """A freshly built tiny model, shadowing conftest's deep-copied one: SAELens wraps each
    ``block.mlp.forward`` in a closure over the original MLP, so MLP hook points of a deep copy never
    fire (see ``analyses.common.DeadHookError``). The analyses only add temporary hooks and never
    change weights, so one model per module is safe."""
    from microedit_lens.testing import tiny_model as build

    return build()


def _in_unit_interval(x: torch.Tensor | float) -> bool:
    t = torch.as_tensor(x)
    return bool(((t >= 0) & (t <= 1 + 1e-6)).all())


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ helpers


def test_agreement_identical_and_hand_computed():
    ref = torch.tensor([[[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]]])
    pos = torch.tensor([[True, True]])
    assert agreement(ref, ref.clone(), pos, k=5).as_dict() == {"top1": 1.0, "top5_exact": 1.0, "top5_jaccard": 1.0}
    other = ref.clone()
    other[0, 0] = torch.tensor([4.0, 5, 3, 2, 0, 1])  # top-1 swapped; top-5 set {0,1,2,3,5} vs {0,1,2,3,4}
    a = agreement(ref, other, pos, k=5)
    assert a.top1 == pytest.approx(0.5)
    assert a.topk_exact == pytest.approx(0.5)
    assert a.topk_jaccard == pytest.approx((4 / 6 + 1.0) / 2)
    # masked-out positions are ignored
    assert agreement(ref, other, torch.tensor([[False, True]]), k=5).top1 == 1.0
    with pytest.raises(ValueError):
        agreement(ref, other, torch.tensor([[False, False]]))


def test_jaccard_matrix_and_chance():
    a = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    m = jaccard_matrix(a)
    assert m[0, 1] == pytest.approx(1 / 3)
    assert torch.equal(m, m.T)
    assert torch.all(m.diagonal() == 1)  # incl. two empty sets
    assert m[0, 2] == 0
    assert chance_jaccard(1, 1, 2) == pytest.approx(0.5)
    assert chance_jaccard(3, 3, 3) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    sims = [len(set(torch.randperm(50, generator=gen)[:8].tolist()) & set(torch.randperm(50, generator=gen)[:8].tolist())) for _ in range(4000)]
    mc = float(np.mean([x / (16 - x) for x in sims]))
    assert chance_jaccard(8, 8, 50) == pytest.approx(mc, abs=0.01)
    with pytest.raises(ValueError):
        chance_jaccard(5, 1, 4)


def test_stat_positions_and_tokenize(tiny_model):
    toks, mask = tokenize(tiny_model, ["abcdef", "x"], max_tokens=4)
    assert toks.shape == (2, 4) and mask.sum(1).tolist() == [4, 1]
    pos = stat_positions(mask, skip_first=True)
    assert pos[0].tolist() == [False, True, True, True]
    assert pos[1].tolist() == [True, False, False, False]  # a one-token text keeps its token
    assert torch.equal(stat_positions(mask, skip_first=False), mask)


def test_resolve_layers(tiny_model):
    assert resolve_layers(tiny_model, None) == (0, 1)
    assert resolve_layers(tiny_model, (-1, 0, 1)) == (0, 1)
    with pytest.raises(ValueError):
        resolve_layers(tiny_model, (2,))


def test_unmasked_hooks_reproduce_clean_logits(tiny_model):
    toks, mask = tokenize(tiny_model, PROMPTS)
    pos = stat_positions(mask)
    clean = logits_with_neuron_masks(tiny_model, toks, pos, (0, 1), None)
    keep_all = logits_with_neuron_masks(tiny_model, toks, pos, (0, 1), lambda act, layer: torch.ones_like(act, dtype=torch.bool))
    torch.testing.assert_close(clean, keep_all)
    zero = logits_with_neuron_masks(tiny_model, toks, pos, (0, 1), lambda act, layer: torch.zeros_like(act, dtype=torch.bool))
    # position 0 (sink) is never masked: its logits stay identical
    torch.testing.assert_close(zero[:, 0], clean[:, 0])
    assert not torch.allclose(zero[pos], clean[pos])


def test_dead_mlp_hooks_are_reported():
    """A deep copy of a HookedSAETransformer has dead MLP hooks (SAELens binds them to the original
    modules); the analyses must say so instead of reporting perfect agreement."""
    import copy

    from analyses.common import DeadHookError
    from microedit_lens.testing import tiny_model

    model = copy.deepcopy(tiny_model())
    toks, mask = tokenize(model, PROMPTS[:2])
    seen: list[str] = []
    model.run_with_hooks(toks, fwd_hooks=[("blocks.0.mlp.hook_post", lambda a, hook: seen.append(hook.name))])
    if seen:
        pytest.skip("deep copies keep live MLP hooks in this SAELens version")
    with pytest.raises(DeadHookError):
        logits_with_neuron_masks(model, toks, stat_positions(mask), (0,), lambda a, layer: a > 0)
    with pytest.raises(DeadHookError):
        collect_mlp_acts(model, toks, (0,))


# ----------------------------------------------------------------------------------- sparsity


def test_sparsity_shapes_ranges_determinism(tiny_model, tmp_path):
    cfg = sparsity.SparsityConfig(prompts=PROMPTS, thresholds=(0.5, 0.01, 0.1))
    r = sparsity.run(tiny_model, cfg)
    assert r.thresholds == (0.01, 0.1, 0.5)
    assert r.share.shape == (tiny_model.cfg.n_layers, 3)
    assert _in_unit_interval(r.share)
    assert torch.all(r.share[:, :-1] >= r.share[:, 1:])  # more neurons above a lower threshold
    assert r.d_mlp == tiny_model.cfg.d_mlp
    assert torch.equal(r.share, sparsity.run(tiny_model, cfg).share)
    # hand check against the raw activations
    toks, mask = tokenize(tiny_model, PROMPTS)
    acts = collect_mlp_acts(tiny_model, toks, (1,))[1][stat_positions(mask)]
    assert r.share[1, 1].item() == pytest.approx((acts.abs() > 0.1).float().mean().item())
    assert r.n_tokens == int(stat_positions(mask).sum())
    assert all(_in_unit_interval(v) for k, v in r.headline().items() if k.startswith("share"))
    assert _png_ok(sparsity.plot(r, tmp_path / "a.png"))


# ------------------------------------------------------------------------------------ masking


def test_masking_ranges_and_full_keep(tiny_model, tmp_path):
    cfg = masking.MaskingConfig(prompts=PROMPTS, keep_fractions=(1.0, 0.05, 0.5))
    r = masking.run(tiny_model, cfg)
    assert r.keep_fractions == (0.05, 0.5, 1.0)
    for t in (r.top1, r.topk_exact, r.topk_jaccard):
        assert t.shape == (3,) and _in_unit_interval(t)
    assert r.agreement_at(2).as_dict() == {"top1": 1.0, "top5_exact": 1.0, "top5_jaccard": 1.0}
    assert _in_unit_interval([r.zeroed.top1, r.zeroed.topk_exact, r.zeroed.topk_jaccard])
    assert r.zeroed.top1 < 1.0  # zeroing every MLP neuron changes a random model's predictions
    assert torch.all(r.topk_exact <= r.topk_jaccard + 1e-6)  # an exact top-5 match has Jaccard 1
    r2 = masking.run(tiny_model, cfg)
    assert torch.equal(r.top1, r2.top1) and torch.equal(r.topk_jaccard, r2.topk_jaccard)
    one = masking.run(tiny_model, dataclasses.replace(cfg, layers=(1,)))
    assert one.layers == (1,)
    assert _png_ok(masking.plot(r, tmp_path / "b.png"))


def test_keep_top_fraction_counts():
    act = torch.randn(2, 3, 100)
    keep = masking.keep_top_fraction(0.05)(act, 0)
    assert torch.all(keep.sum(-1) == 5)
    a = act.abs()
    kept_min = torch.where(keep, a, torch.full_like(a, float("inf"))).amin(-1)
    dropped_max = torch.where(keep, torch.zeros_like(a), a).amax(-1)
    assert torch.all(kept_min >= dropped_max)  # per token, every kept |act| >= every dropped one
    assert torch.all(masking.keep_top_fraction(1e-6)(act, 0).sum(-1) == 1)  # at least one neuron


# ------------------------------------------------------------------------ active/random/mutex


def test_active_random_mutex(tiny_model, tmp_path):
    cfg = arm.ActiveRandomMutexConfig(prompts=PROMPTS, threshold=0.2, seed=3)
    r = arm.run(tiny_model, cfg)
    assert set(r.agreements) == set(arm.CONDITIONS)
    for a in r.agreements.values():
        assert _in_unit_interval([a.top1, a.topk_exact, a.topk_jaccard])
    assert 0 < r.active_share < 1
    r2 = arm.run(tiny_model, cfg)
    assert r.agreements == r2.agreements  # same seed -> same random neurons
    # threshold 0 keeps every non-zero neuron: the output is unchanged
    full = arm.run(tiny_model, dataclasses.replace(cfg, threshold=0.0))
    assert full.agreements["active"].top1 == 1.0
    assert _png_ok(arm.plot(r, tmp_path / "c.png"))


def test_random_keep_matches_active_count():
    act = torch.randn(2, 4, 64)
    n_active = arm.keep_above(0.5)(act, 0).sum(-1)
    rnd = arm.keep_random_like(0.5, seed=1)(act, 0)
    assert torch.equal(rnd.sum(-1), n_active)
    assert torch.equal(rnd, arm.keep_random_like(0.5, seed=1)(act, 0))
    assert torch.equal(arm.keep_below(0.5)(act, 0), ~arm.keep_above(0.5)(act, 0))


# ------------------------------------------------------------------------------- entanglement


def _check_overlap_matrix(m: torch.Tensor, n: int, unit_diag: bool) -> None:
    assert m.shape == (n, n)
    assert _in_unit_interval(m)
    torch.testing.assert_close(m, m.T)
    if unit_diag:
        torch.testing.assert_close(m.diagonal(), torch.ones(n))


def test_entanglement_neurons_and_sae(tiny_model, tiny_sae, tmp_path):
    cfg = entanglement.EntanglementConfig(neuron_k=8)
    r = entanglement.run(tiny_model, cfg, sae=tiny_sae)
    n = len(ENTANGLEMENT_STATEMENTS)
    assert r.layer == 0  # follows the SAE's hook
    torch.testing.assert_close(r.semantic, r.semantic.T)
    torch.testing.assert_close(r.semantic.diagonal(), torch.ones(n))
    assert torch.all(r.semantic.abs() <= 1 + 1e-6)
    assert r.sae is not None
    for u in (r.neurons, r.sae):
        _check_overlap_matrix(u.tokens, n, unit_diag=False)
        _check_overlap_matrix(u.last, n, unit_diag=True)
        assert 0 <= u.chance <= 1
        assert _in_unit_interval([u.unrelated_tokens, u.unrelated_last, u.related_tokens, u.related_last])
    assert r.neurons.mean_active == pytest.approx(8.0)
    assert r.sae.width == tiny_sae.cfg.d_sae and 0 < r.sae.mean_active <= tiny_sae.cfg.k
    assert r.mean_unrelated_overlap_sae == r.sae.unrelated_tokens
    h = r.headline()
    assert "neurons_unrelated_overlap_tokens" in h and "sae_latents_unrelated_overlap_tokens" in h
    r2 = entanglement.run(tiny_model, cfg, sae=tiny_sae)
    assert torch.equal(r.neurons.tokens, r2.neurons.tokens) and torch.equal(r.sae.last, r2.sae.last)
    assert _png_ok(entanglement.plot(r, tmp_path / "d.png"))


def test_entanglement_without_sae_and_threshold_rule(tiny_model, tmp_path):
    cfg = entanglement.EntanglementConfig(neuron_rule="threshold", neuron_threshold=0.1)
    r = entanglement.run(tiny_model, cfg)
    assert r.sae is None and r.mean_unrelated_overlap_sae is None
    assert r.layer == (4 * tiny_model.cfg.n_layers) // 5
    _check_overlap_matrix(r.neurons.last, len(cfg.statements), unit_diag=True)
    assert "sae_latents_unrelated_overlap_tokens" not in r.headline()
    assert _png_ok(entanglement.plot(r, tmp_path / "d2.png"))


def test_entanglement_pairs_and_token_average():
    cfg = entanglement.EntanglementConfig()
    assert len(cfg.related_pairs()) == 5
    assert len(cfg.related_pairs()) + len(cfg.unrelated_pairs()) == 45
    assert (0, 2) in cfg.unrelated_pairs()  # bananas vs geocentric Sun
    assert "potassium" in cfg.statements[0] and "geocentric" in cfg.statements[2]
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)  # IoU between its tokens: 1/3
    b = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    m = entanglement.token_averaged_overlap([a, b])
    assert m[0, 0] == pytest.approx(1 / 3) and m[1, 1] == 1.0
    assert m[0, 1] == pytest.approx((1.0 + 1 / 3) / 2) and m[1, 0] == m[0, 1]


# ----------------------------------------------------------------------------------- geometry


def test_tsne_separates_blobs_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (25, 10)), rng.normal(8, 1, (25, 10))])
    labels = np.array([0] * 25 + [1] * 25)
    y, kl = geometry.tsne(x, perplexity=10, n_iter=300, seed=1)
    assert y.shape == (50, 2) and math.isfinite(kl) and kl >= 0
    assert geometry.knn_purity(y, labels, 5) == 1.0
    y2, _ = geometry.tsne(x, perplexity=10, n_iter=300, seed=1)
    assert np.array_equal(y, y2)
    assert geometry.chance_purity(labels) == pytest.approx(24 / 49)
    assert geometry.silhouette(x, labels) > 0.7
    assert abs(geometry.silhouette(x, rng.permutation(labels))) < 0.1


def test_geometry_run(tiny_model, tmp_path):
    cfg = geometry.GeometryConfig(edit_prompts=KNOWLEDGE_PROMPTS[:12], locality_prompts=LOCALITY_PROMPTS[:10], n_iter=200, max_tokens=16)
    r = geometry.run(tiny_model, cfg)
    assert r.embedding.shape == (22, 2) and torch.isfinite(r.embedding).all()
    assert r.labels.tolist() == [0] * 12 + [1] * 10
    assert _in_unit_interval([r.knn_purity_residual, r.knn_purity_embedding, r.knn_purity_chance])
    assert -1 <= r.silhouette <= 1
    assert torch.equal(r.embedding, geometry.run(tiny_model, cfg).embedding)
    assert _png_ok(geometry.plot(r, tmp_path / "e.png"))


# ------------------------------------------------------------------------ configs + registry


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (sparsity.SparsityConfig, {"thresholds": ()}),
        (sparsity.SparsityConfig, {"thresholds": (-1.0,)}),
        (sparsity.SparsityConfig, {"prompts": ()}),
        (sparsity.SparsityConfig, {"layers": ()}),
        (masking.MaskingConfig, {"keep_fractions": (0.0,)}),
        (masking.MaskingConfig, {"keep_fractions": (1.5,)}),
        (masking.MaskingConfig, {"top_k": 0}),
        (arm.ActiveRandomMutexConfig, {"threshold": -0.1}),
        (arm.ActiveRandomMutexConfig, {"prompts": ("ok", "")}),
        (entanglement.EntanglementConfig, {"topics": ENTANGLEMENT_TOPICS[:-1]}),
        (entanglement.EntanglementConfig, {"neuron_rule": "median"}),
        (entanglement.EntanglementConfig, {"neuron_k": 0}),
        (entanglement.EntanglementConfig, {"highlight": (1, 1)}),
        (geometry.GeometryConfig, {"edit_prompts": ("one",)}),
        (geometry.GeometryConfig, {"perplexity": 1.0}),
        (geometry.GeometryConfig, {"max_tokens": 0}),
    ],
)
def test_config_validation(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_out_of_range_layer_is_rejected_at_run(tiny_model):
    with pytest.raises(ValueError, match="out of range"):
        masking.run(tiny_model, masking.MaskingConfig(prompts=PROMPTS, layers=(5,)))


def test_registry_runs_every_analysis(tiny_model, tiny_sae, tmp_path):
    small = {
        "sparsity": {"prompts": PROMPTS},
        "masking": {"prompts": PROMPTS, "keep_fractions": (0.1, 0.5)},
        "active_random_mutex": {"prompts": PROMPTS},
        "entanglement": {},
        "geometry": {"n_iter": 100},
    }
    assert set(ANALYSES) == set(small)
    for name, spec in ANALYSES.items():
        assert spec.name == name and spec.description and spec.figure.endswith(".png")
        spec.config_cls()  # defaults are valid
        result, png = run_analysis(name, tiny_model, sae=tiny_sae, out_dir=tmp_path, **small[name])
        assert png == tmp_path / spec.figure and _png_ok(png)
        head = result.headline()
        assert head and all(isinstance(v, float) for v in head.values())
    _, png = run_analysis("sparsity", tiny_model, out_dir=tmp_path, filename="other.png", prompts=PROMPTS)
    assert png.name == "other.png" and _png_ok(png)


def test_registry_errors(tiny_model):
    with pytest.raises(KeyError, match="unknown analysis"):
        get_spec("nope")
    with pytest.raises(ValueError, match="unknown option"):
        run_analysis("sparsity", tiny_model, thresholdz=(0.1,))


def test_make_figures_helpers(tmp_path):
    from analyses import make_figures

    assert make_figures.resolve_names(["geometry", "sparsity"]) == ["geometry_zsre", "geometry_hallucination", "sparsity"]
    assert make_figures.resolve_names([]) == list(make_figures.FIGURES)
    with pytest.raises(SystemExit):
        make_figures.resolve_names(["nope"])
    assert all(j.analysis in ANALYSES for j in make_figures.FIGURES.values())
    path = tmp_path / "h.json"
    make_figures.update_headline(path, {"a": {"headline": {"x": 1.0, "y": float("nan")}}})
    make_figures.update_headline(path, {"b": {"headline": {"z": 2.0}}})
    data = json.loads(path.read_text())
    assert data == {"a": {"headline": {"x": 1.0, "y": None}}, "b": {"headline": {"z": 2.0}}}
    assert make_figures.find_sae("none") is None


def test_json_style_overrides_become_tuples(tiny_model, tmp_path):
    """``microedit analyze --set KEY=JSON`` passes lists; configs normalise them to tuples."""
    result, _ = run_analysis("sparsity", tiny_model, out_dir=tmp_path, prompts=list(PROMPTS), thresholds=[0.1, 0.2], layers=[0])
    assert result.config.thresholds == (0.1, 0.2) and result.config.layers == (0,) and result.layers == (0,)
    cfg = entanglement.EntanglementConfig(highlight=[0, 2], statements=list(ENTANGLEMENT_STATEMENTS), topics=list(ENTANGLEMENT_TOPICS))
    assert cfg.highlight == (0, 2) and isinstance(cfg.statements, tuple) and isinstance(cfg.topics, tuple)
    hash(cfg)  # frozen and hashable
