"""The studies (package ``analyses``) on the tiny random model and SAE: shapes, value ranges,
determinism, config validation, figures and the registry. The Section 4 studies edit a handful of
short synthetic records (small temp benchmark files) with a few optimisation steps per edit."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analyses import ANALYSES, get_spec, run_analysis
from analyses import active_random_mutex as arm
from analyses import ablations, ard_separation, entanglement, geometry, layer_sweep, masking, sparsity
from analyses.common import (
    agreement,
    auroc,
    average_ranks,
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
    y, kl = geometry.tsne(x, perplexity=10, n_iter=750, seed=1)  # 300 iterations: seed 1 ends in a local minimum (KL 0.79) with numpy 2.4
    assert y.shape == (50, 2) and math.isfinite(kl) and kl >= 0
    assert geometry.knn_purity(y, labels, 5) == 1.0
    y2, _ = geometry.tsne(x, perplexity=10, n_iter=750, seed=1)
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
        (layer_sweep.LayerSweepConfig, {"layers": ()}),
        (layer_sweep.LayerSweepConfig, {"k": 64, "width": 32}),
        (layer_sweep.LayerSweepConfig, {"lr": 0.0}),
        (layer_sweep.LayerSweepConfig, {"n_edits": 0}),
        (layer_sweep.LayerSweepConfig, {"train_text": ()}),
        (layer_sweep.LayerSweepConfig, {"editor_overrides": {"no_such_field": 1}}),
        (ard_separation.ArdSeparationConfig, {"datasets": ()}),
        (ard_separation.ArdSeparationConfig, {"formats": ("zsre",)}),
        (ard_separation.ArdSeparationConfig, {"references": ("a", "b", "c")}),
        (ard_separation.ArdSeparationConfig, {"n_edits": -1}),
        (ard_separation.ArdSeparationConfig, {"bins": 1}),
        (ard_separation.ArdSeparationConfig, {"editor_overrides": {"lr": -1.0}}),
        (ablations.AblationsConfig, {"variants": ("full", "no_such_variant")}),
        (ablations.AblationsConfig, {"k_values": (0, 8)}),
        (ablations.AblationsConfig, {"variants": (), "k_values": ()}),
        (ablations.AblationsConfig, {"dense_k": 0}),
        (ablations.AblationsConfig, {"n_edits": 2.5}),
    ],
)
def test_config_validation(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_out_of_range_layer_is_rejected_at_run(tiny_model):
    with pytest.raises(ValueError, match="out of range"):
        masking.run(tiny_model, masking.MaskingConfig(prompts=PROMPTS, layers=(5,)))


def test_registry_runs_every_analysis(tiny_model, tiny_sae, edit_files, tmp_path):
    cache = _sae_cache(tmp_path / "cache", tiny_model)
    small = {
        "sparsity": {"prompts": PROMPTS},
        "masking": {"prompts": PROMPTS, "keep_fractions": (0.1, 0.5)},
        "active_random_mutex": {"prompts": PROMPTS},
        "entanglement": {},
        "geometry": {"n_iter": 100},
        "layer_sweep": {**_sweep_overrides(edit_files, cache), "layers": (0, 1), "n_edits": 3},
        "ard_separation": {"datasets": (edit_files["zsre"],), "references": (edit_files["refs"],), "n_edits": 3,
                           "editor_overrides": EDIT},
        "ablations": {"data": edit_files["zsre"], "reference": edit_files["refs"], "n_edits": 3,
                      "variants": ("full", "no_switch"), "k_values": (), "editor_overrides": EDIT},
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
    args = make_figures.parse_args(["--n-edits", "7", "--zsre", "z.json"])
    for name in ("layer_sweep", "ard_separation", "ablations"):
        job = make_figures.FIGURES[name]
        cfg = get_spec(job.analysis).make_config(**job.overrides(args))  # the overrides fit the config
        assert cfg.n_edits == 7 and job.filename == get_spec(job.analysis).figure
    over = make_figures.FIGURES["ard_separation"].overrides(args)
    assert over["datasets"][0] == str(Path("z.json").resolve())  # relative to the cwd, made absolute
    assert over["datasets"][1] == "hallucination/hallucination-edit.json"


def test_json_style_overrides_become_tuples(tiny_model, tmp_path):
    """``microedit analyze --set KEY=JSON`` passes lists; configs normalise them to tuples."""
    result, _ = run_analysis("sparsity", tiny_model, out_dir=tmp_path, prompts=list(PROMPTS), thresholds=[0.1, 0.2], layers=[0])
    assert result.config.thresholds == (0.1, 0.2) and result.config.layers == (0,) and result.layers == (0,)
    cfg = entanglement.EntanglementConfig(highlight=[0, 2], statements=list(ENTANGLEMENT_STATEMENTS), topics=list(ENTANGLEMENT_TOPICS))
    assert cfg.highlight == (0, 2) and isinstance(cfg.statements, tuple) and isinstance(cfg.topics, tuple)
    hash(cfg)  # frozen and hashable


# ------------------------------------------------------------------- Section 4: editing studies

#: Few, fast optimisation steps: the tiny model only has to exercise the code paths.
EDIT = {"lr": 5e-2, "stage1_max_steps": 3, "stage2_max_steps": 8, "target_margin": 0.0, "revert_unrouted": False}
_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
_REFS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world and friends", "rain falls in spring",
         "numbers like 12 and 34", "open the door slowly", "music played all night", "light moves very fast"]


@pytest.fixture(scope="module")
def edit_files(tmp_path_factory):
    """Small benchmark files in the real formats: ZsRE (with paraphrases), hallucination (none), and
    a JSON list of reference texts."""
    d = tmp_path_factory.mktemp("edit_data")
    zsre = [{"src": f"{_WORDS[i]} is near", "alt": _WORDS[(i + 3) % 8], "rephrase": f"near {_WORDS[i]} is",
             "loc": f"nq question: the {_WORDS[(i + 5) % 8]} house", "loc_ans": "red"} for i in range(6)]
    hallu = [{"prompt": f"this {_WORDS[i]} was born in", "target_new": f"{_WORDS[(i + 2) % 8]} town",
              "locality_prompt": f"the {_WORDS[(i + 4) % 8]} is", "locality_ground_truth": "blue"} for i in range(4)]
    out = {}
    for name, data in (("zsre", zsre), ("hallucination", hallu), ("refs", _REFS)):
        out[name] = str(d / f"{name}.json")
        (d / f"{name}.json").write_text(json.dumps(data))
    return out


def _sae_cache(root, model, layers=(0, 1), width=128, k=4, tokens=1000):
    """A layer-sweep cache holding tiny SAEs under the names the study looks for (quality for layer 1 only)."""
    from microedit_lens.testing import tiny_sae

    cfg = layer_sweep.LayerSweepConfig(layers=layers, width=width, k=k, train_tokens=tokens, cache_dir=str(root))
    for layer in layers:
        path = cfg.sae_dir(layer)
        tiny_sae(d_in=model.cfg.d_model, d_sae=width, k=k, hook_name=f"blocks.{layer}.hook_resid_post", seed=layer).save_model(str(path))
        if layer == 1:
            (path / "quality.json").write_text(json.dumps({"fvu": 0.25, "ce_increase": 0.5, "l0": 4.0, "n_tokens": 10}))
    return root


def _sweep_overrides(edit_files, cache):
    return dict(width=128, k=4, train_tokens=1000, cache_dir=str(cache), train_missing=False,
                data=edit_files["zsre"], reference=edit_files["refs"], editor_overrides=EDIT)


def test_average_ranks_and_auroc_hand_cases():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(torch.tensor([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0  # perfectly separated
    assert auroc([0, 1], [3, 4]) == 0.0  # perfectly reversed
    assert auroc([1, 2, 3], [1, 2, 3]) == 0.5  # identical samples
    assert auroc([1, 2], [2, 3]) == pytest.approx(0.125)  # one tie out of four pairs, counted 1/2
    assert math.isnan(auroc([], [1.0]))
    with pytest.raises(ValueError):
        auroc([float("nan")], [1.0])
    # lower ARD = in scope; infinite ARD (no valid position) is simply the most out of scope
    assert ard_separation.in_scope_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, float("inf")])) == 1.0
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40), rng.integers(0, 5, 30)  # many ties
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auroc(pos, neg) == pytest.approx(brute)


def test_editor_overrides_are_normalised_and_checked():
    from analyses.editing import check_editor_overrides, method_config

    assert check_editor_overrides({"stage2_max_steps": 5, "lr": 0.1}) == (("lr", 0.1), ("stage2_max_steps", 5))
    assert check_editor_overrides(None) == ()
    with pytest.raises(ValueError, match="valid names"):
        check_editor_overrides({"nope": 1})
    with pytest.raises(ValueError):
        check_editor_overrides({"stage1_max_steps": -1})
    assert method_config((("lr", 0.1),), stage1_max_steps=0).stage1_max_steps == 0
    cfg = ablations.AblationsConfig(editor_overrides={"lr": 0.1}, variants=["full"], k_values=[64, 8, 8])
    assert cfg.editor_overrides == (("lr", 0.1),) and cfg.variants == ("full",) and cfg.k_values == (8, 64)
    hash(cfg)  # frozen and hashable after normalisation


def test_edit_and_score_is_the_lifelong_protocol(tiny_model, tiny_sae, edit_files):
    from analyses.editing import edit_and_score, load_edit_data, load_reference_texts
    from microedit_lens import MicroEditConfig
    from microedit_lens.lifelong import LifelongConfig, run_lifelong
    from microedit_lens.switch import SwitchMode

    data = load_edit_data(edit_files["zsre"], 4)
    refs = load_reference_texts(edit_files["refs"], 100)
    assert data.format == "zsre" and len(data.records) == 4 and data.has_paraphrases and refs == _REFS
    assert load_reference_texts(edit_files["zsre"], 2) == [r.prompt for r in data.records[:2]]  # a benchmark's prompts
    conf = MicroEditConfig(**EDIT)
    with edit_and_score(tiny_model, tiny_sae, data.records, conf, refs) as er:
        s = er.scores
        assert er.editor.is_attached and er.editor.n_edits == 4
        routed = er.route()
        always = er.score(SwitchMode.ALWAYS)
    assert not er.editor.is_attached  # closed: the plain model again
    ref = run_lifelong(tiny_model, tiny_sae, data.records, LifelongConfig(T=[4], generative=False),
                       method_config=conf, reference_texts=refs).runs[4]
    assert (s.reliability, s.generalization, s.locality) == pytest.approx((ref.reliability, ref.generalization, ref.locality))
    assert s.n_edits == 4 and s.mode == "auto" and always.mode == "always" and s.tau == routed.tau > 0
    for v in (s.reliability, s.generalization, s.locality, s.average, always.locality):
        assert 0 <= v <= 1
    assert s.seconds_per_edit > 0 and set(s.as_dict("x_")) >= {"x_reliability", "x_average", "x_tau"}
    assert routed.prompts.shape == (4,) and routed.paraphrases.shape == (4,) and routed.locality.shape == (4,)
    assert torch.all(routed.prompts >= 0)
    assert routed.spliced_rate(routed.locality, SwitchMode.ALWAYS) == 1.0
    assert routed.spliced_rate(routed.locality, SwitchMode.NEVER) == 0.0
    assert routed.spliced_rate(routed.locality, SwitchMode.AUTO) == routed.in_scope(routed.locality)
    with pytest.raises(ValueError):
        edit_and_score(tiny_model, tiny_sae, [], conf, refs)
    from transformer_lens.hook_points import HookPoint

    from microedit_lens import EditRequest

    with pytest.raises(ValueError):  # longer than the tiny model's context: the edit fails...
        edit_and_score(tiny_model, tiny_sae, [EditRequest("x" * 80, "y")], conf, refs)
    assert type(tiny_model.blocks[0].hook_resid_post) is HookPoint  # ...and the switch is detached again


def test_ard_separation_two_datasets(tiny_model, tiny_sae, edit_files, tmp_path):
    from microedit_lens import MicroEditor

    cfg = ard_separation.ArdSeparationConfig(
        datasets=(edit_files["zsre"], edit_files["hallucination"]), references=(edit_files["refs"],),
        n_edits=4, editor_overrides=EDIT, bins=10)
    r = ard_separation.run(tiny_model, cfg, sae=tiny_sae)
    zs, ha = r.datasets
    assert (zs.label, ha.label) == ("zsre", "hallucination")
    assert zs.edited_post.shape == zs.edited_pre.shape == zs.paraphrases.shape == zs.locality.shape == (4,)
    assert ha.paraphrases.numel() == 0 and math.isnan(ha.in_scope_paraphrases) and math.isnan(ha.auroc_paraphrases_vs_locality)
    for d in r.datasets:
        assert d.tau > 0
        for ard in (d.edited_pre, d.edited_post, d.locality):
            assert torch.all(ard >= 0)
        assert _in_unit_interval([d.in_scope_edited_pre, d.in_scope_edited, d.in_scope_locality,
                                  d.auroc_edited_vs_locality, d.auroc_edited_pre_vs_locality])
    assert _in_unit_interval([zs.in_scope_paraphrases, zs.auroc_paraphrases_vs_locality])
    # the pre-edit ARD is that of an unedited editor with the same SAE
    fresh = MicroEditor(tiny_model, tiny_sae, attach=False)
    from analyses.editing import load_edit_data

    prompts = [q.prompt for q in load_edit_data(edit_files["zsre"], 4).records]
    torch.testing.assert_close(zs.edited_pre, fresh.route(prompts).ard)
    assert zs.in_scope_edited == pytest.approx(float((zs.edited_post <= zs.tau).float().mean()))
    h = r.headline()
    assert {"zsre_auroc_edited_vs_locality", "hallucination_in_scope_locality", "zsre_reliability"} <= set(h)
    again = ard_separation.run(tiny_model, cfg, sae=tiny_sae)
    for a, b in zip(r.datasets, again.datasets):
        assert torch.equal(a.edited_post, b.edited_post) and torch.equal(a.locality, b.locality) and a.tau == b.tau
        assert a.scores.reliability == b.scores.reliability and a.scores.locality == b.scores.locality
    assert _png_ok(ard_separation.plot(r, tmp_path / "f.png"))
    one = dataclasses.replace(r, datasets=r.datasets[:1])
    assert _png_ok(ard_separation.plot(one, tmp_path / "f1.png"))


def test_with_inference_k_changes_only_the_copy(tiny_sae):
    x = torch.randn(5, tiny_sae.cfg.d_in)
    base = tiny_sae.encode(x)
    wide = ablations.with_inference_k(tiny_sae, 16)
    assert wide.cfg.k == 16 and tiny_sae.cfg.k == 4
    assert torch.equal(tiny_sae.encode(x), base)  # the original is untouched
    feats = wide.encode(x)
    assert torch.all((feats > 0).sum(-1) <= 16) and torch.all((feats > 0).sum(-1) > (base > 0).sum(-1))
    assert torch.all((base > 0) <= (feats > 0))  # the trained top-4 stay among the top-16
    torch.testing.assert_close(feats[base > 0], base[base > 0])
    with pytest.raises(ValueError):
        ablations.with_inference_k(tiny_sae, tiny_sae.cfg.d_sae + 1)


def test_ablations_variants_and_k_sweep(tiny_model, tiny_sae, edit_files, tmp_path):
    cfg = ablations.AblationsConfig(data=edit_files["zsre"], reference=edit_files["refs"], n_edits=4,
                                    k_values=(2, 4, 8), editor_overrides=EDIT)
    r = ablations.run(tiny_model, cfg, sae=tiny_sae)
    assert [x.name for x in r.rows] == ["full", "no_switch", "no_stage1", "no_topk", "k2", "k4", "k8"]
    assert r.trained_k == 4 and r.dense_k == tiny_sae.cfg.d_sae // 4 and r.row("no_topk").k == 32
    for row in r.rows:
        assert _in_unit_interval([row.reliability, row.generalization, row.locality, row.average,
                                  row.spliced_paraphrases, row.spliced_locality])
        assert row.tau > 0 and row.seconds_per_edit > 0
    full, k4 = r.row("full"), r.row("k4")
    assert (full.reliability, full.generalization, full.locality) == (k4.reliability, k4.generalization, k4.locality)
    assert full.seconds_per_edit == k4.seconds_per_edit  # one editing run shared
    ns = r.row("no_switch")
    assert ns.mode == "always" and ns.spliced_paraphrases == 1.0 and ns.spliced_locality == 1.0
    assert ns.seconds_per_edit == full.seconds_per_edit  # the full edits, scored with the switch always on
    assert r.row("k8").l0_reference > full.l0_reference  # more latents fire with a larger inference k
    assert [x.k for x in r.of_kind("k_sweep")] == [2, 4, 8]
    assert r.to_markdown().count("\n") == 2 + len(r.rows)
    assert {"full_reliability", "k8_locality", "no_topk_spliced_paraphrases"} <= set(r.headline())
    small = dataclasses.replace(cfg, variants=("no_stage1",), k_values=())
    alone = ablations.run(tiny_model, small, sae=tiny_sae).rows[0]  # deterministic, and independent of the other variants
    assert alone == dataclasses.replace(r.row("no_stage1"), seconds_per_edit=alone.seconds_per_edit)
    assert _png_ok(ablations.plot(r, tmp_path / "g.png"))
    with pytest.raises(ValueError, match="d_sae"):
        ablations.run(tiny_model, dataclasses.replace(cfg, k_values=(1000,)), sae=tiny_sae)


def test_layer_sweep_cache_and_injected_saes(tiny_model, tiny_sae, edit_files, tmp_path):
    from microedit_lens.testing import tiny_sae as build_sae

    cache = _sae_cache(tmp_path / "cache", tiny_model)
    cfg = layer_sweep.LayerSweepConfig(layers=(0, -1), n_edits=4, **_sweep_overrides(edit_files, cache))
    assert cfg.sae_dir(1) == cache / "blocks.1.hook_resid_post-w128-k4-t1000"
    r = layer_sweep.run(tiny_model, cfg, saes={0: tiny_sae})
    l0, l1 = r.layers
    assert (l0.layer, l1.layer) == (0, 1) and l0.sae_source == "given" and l1.sae_source == str(cfg.sae_dir(1))
    assert math.isnan(l0.fvu) and (l1.fvu, l1.ce_increase, l1.l0) == (0.25, 0.5, 4.0)
    for x in r.layers:
        assert _in_unit_interval([x.scores.reliability, x.scores.generalization, x.scores.locality])
        assert x.d_sae == 128 and x.k == 4 and x.scores.n_edits == 4
    h = r.headline()
    assert h["L1_fvu"] == 0.25 and h["best_layer"] in (0.0, 1.0) and "L0_locality" in h
    again = layer_sweep.run(tiny_model, cfg, saes={0: tiny_sae})
    assert [x.scores.locality for x in again.layers] == [x.scores.locality for x in r.layers]
    assert _png_ok(layer_sweep.plot(r, tmp_path / "h.png"))
    with pytest.raises(ValueError, match="sits at"):
        layer_sweep.run(tiny_model, cfg, saes={1: tiny_sae})  # an SAE at layer 0 given for layer 1
    missing = dataclasses.replace(cfg, cache_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="train_missing"):
        layer_sweep.run(tiny_model, missing, saes={0: build_sae()})


def test_layer_sweep_trains_like_the_cli(monkeypatch):
    monkeypatch.setenv("MICROEDIT_CACHE", "/tmp/mc")
    cfg = layer_sweep.LayerSweepConfig()
    assert cfg.sae_dir(15) == Path("/tmp/mc/sae_sweep/blocks.15.hook_resid_post-w2304-k32-t300000")
    t = layer_sweep.train_config(cfg, 15)
    assert (t.hook_name, t.d_sae, t.k, t.training_tokens, t.lr) == ("blocks.15.hook_resid_post", 2304, 32, 300_000, 3e-3)
    assert t.output_dir == str(cfg.sae_dir(15)) and t.model is None
    assert [Path(p).parts[-2:] for p in t.text_files] == [("data", "corpus"), ("wikitext-2", "valid.txt")]
    monkeypatch.delenv("MICROEDIT_CACHE")
    assert layer_sweep.default_cache_dir() == Path.home() / ".cache" / "microedit_lens" / "sae_sweep"
