"""Helpers shared by the Section 2 studies: tokenising, collecting activations, masking MLP neurons
through hooks, the three output-agreement metrics, set-overlap (Jaccard) matrices, and figure I/O.

Conventions used by every study:

* Texts are tokenised right-padded without BOS (:func:`microedit_lens.editor.batch_tokens`).
* Position 0 of the embedded model is an attention sink with outsized activations; with
  ``skip_first=True`` (the default everywhere) it is excluded from every statistic and never masked.
* Rank statistics (:func:`average_ranks`, :func:`auroc`) are hand-written (no scikit-learn).
* Figures are drawn on a bare :class:`matplotlib.figure.Figure` (Agg canvas): no pyplot, no global
  backend switch, nothing left open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from microedit_lens.editor import batch_tokens

#: A rule choosing which neurons to keep: (activations at one layer, layer index) -> keep mask.
KeepFn = Callable[[Tensor, int], Tensor]


class DeadHookError(RuntimeError):
    """Hook points that exist on the model never fired during its forward pass.

    Known cause: ``copy.deepcopy`` of a :class:`sae_lens.HookedSAETransformer`. SAELens wraps every
    ``block.mlp.forward`` in a lambda closing over the *original* MLP, so a deep copy's MLPs run the
    original's weights and hook points: hooks added to the copy's ``mlp.hook_*`` are silently
    ignored. Build a fresh model instead of deep-copying one.
    """

    def __init__(self, hook_names: Sequence[str]):
        super().__init__(
            f"hook point(s) {list(hook_names)[:4]} never fired; is this a deep-copied HookedSAETransformer "
            "(its MLPs still run the original model's modules)? Load a fresh model instead."
        )
        self.hook_names = list(hook_names)


# --------------------------------------------------------------------------------------- layers


def mlp_hook_name(layer: int) -> str:
    """TransformerLens name of the MLP neuron activations (after the gate for gated MLPs)."""
    return f"blocks.{layer}.mlp.hook_post"


def resid_hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def hook_layer(hook_name: str) -> int | None:
    """The block index in a ``blocks.{l}.…`` hook name (``None`` for other hooks)."""
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def resolve_layers(model: Any, layers: Sequence[int] | None) -> tuple[int, ...]:
    """``None`` -> every layer; otherwise the given layers (negative indices count from the end),
    sorted and de-duplicated. Raises ValueError for an out-of-range layer."""
    n = model.cfg.n_layers
    if layers is None:
        return tuple(range(n))
    out = set()
    for layer in layers:
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} is out of range for a {n}-layer model")
        out.add(layer % n)
    if not out:
        raise ValueError("layers is empty")
    return tuple(sorted(out))


def late_layer(model: Any, layer: int | None = None) -> int:
    """``layer`` checked against the model, or by default the layer at 80 % depth (24 of 30 for the
    embedded model: the layer of its SAE)."""
    if layer is None:
        return (4 * model.cfg.n_layers) // 5
    return resolve_layers(model, (layer,))[0]


def check_layers_field(layers: Sequence[int] | None) -> tuple[int, ...] | None:
    """Validate a config's ``layers`` field (range checks need the model; see :func:`resolve_layers`)."""
    if layers is None:
        return None
    out = tuple(int(x) for x in layers)
    if not out:
        raise ValueError("layers must be None (all layers) or a non-empty sequence")
    return out


def check_prompts_field(name: str, prompts: Sequence[str], minimum: int = 1) -> tuple[str, ...]:
    out = tuple(prompts)
    if len(out) < minimum:
        raise ValueError(f"{name} needs at least {minimum} prompt(s), got {len(out)}")
    if any(not isinstance(p, str) or not p.strip() for p in out):
        raise ValueError(f"{name} contains an empty or non-string prompt")
    return out


# ----------------------------------------------------------------------------------- tokens


def tokenize(
    model: Any, texts: Sequence[str], max_tokens: int | None = None
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Right-padded token ids and mask (no BOS), each text cut to its first ``max_tokens`` tokens."""
    toks, mask = batch_tokens(model, texts)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        toks, mask = toks[:, :max_tokens].contiguous(), mask[:, :max_tokens].contiguous()
    return toks, mask


def stat_positions(mask: Bool[Tensor, "batch pos"], skip_first: bool = True) -> Bool[Tensor, "batch pos"]:
    """Positions that enter statistics: real tokens, minus position 0 when ``skip_first``. A text of
    a single token keeps its only position (so every text contributes)."""
    out = mask.clone()
    if skip_first and out.shape[1] > 1:
        multi = mask.sum(dim=1) > 1
        out[multi, 0] = False
    return out


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


# ------------------------------------------------------------------------------- activations


def collect_activations(
    model: Any, tokens: Int[Tensor, "batch pos"], hook_names: Sequence[str], batch_size: int = 32
) -> dict[str, Float[Tensor, "batch pos d"]]:
    """Activations at ``hook_names`` (``run_with_cache`` with a ``names_filter``), stopping the
    forward pass after the last block needed. Returned on CPU in float32."""
    names = tuple(dict.fromkeys(hook_names))
    if not names:
        raise ValueError("no hook names given")
    missing = [h for h in names if h not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no hook point(s) {missing}")
    layers = [hook_layer(h) for h in names]
    stop = None if any(x is None for x in layers) else max(x for x in layers if x is not None) + 1
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    wanted = set(names)
    parts: dict[str, list[Tensor]] = {h: [] for h in names}
    device = model.cfg.device
    with torch.no_grad():
        for sl in iter_batches(tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(
                tokens[sl].to(device), names_filter=lambda n: n in wanted, stop_at_layer=stop
            )
            silent = [h for h in names if h not in cache]
            if silent:
                raise DeadHookError(silent)
            for h in names:
                parts[h].append(cache[h].detach().float().cpu())
    return {h: torch.cat(v) for h, v in parts.items()}


def collect_mlp_acts(
    model: Any, tokens: Int[Tensor, "batch pos"], layers: Sequence[int], batch_size: int = 32
) -> dict[int, Float[Tensor, "batch pos d_mlp"]]:
    """MLP neuron activations (``blocks.{l}.mlp.hook_post``) per layer."""
    acts = collect_activations(model, tokens, [mlp_hook_name(l) for l in layers], batch_size)
    return {l: acts[mlp_hook_name(l)] for l in layers}


def mean_pooled(
    acts: Float[Tensor, "batch pos d"], positions: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "batch d"]:
    """Mean of ``acts`` over the selected positions of each row."""
    w = positions.to(acts.dtype).unsqueeze(-1)
    return (acts * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def last_positions(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Index of the last real token of each row (right padding)."""
    return mask.sum(dim=1).long() - 1


# -------------------------------------------------------------------------- masking + outputs


def logits_with_neuron_masks(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    positions: Bool[Tensor, "batch pos"],
    layers: Sequence[int],
    keep: KeepFn | None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits with the MLP neurons at ``layers`` zeroed wherever ``keep`` says so, at the selected
    ``positions`` only (other positions, e.g. the position-0 sink and padding, run unchanged).
    ``keep=None`` gives the clean logits."""
    device = model.cfg.device
    pos = positions.to(device).unsqueeze(-1)

    fired: set[int] = set()

    def make_hook(layer: int) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            assert keep is not None
            fired.add(layer)
            kept = keep(act, layer).to(device) | ~pos
            return act * kept.to(act.dtype)

        return hook

    hooks = [] if keep is None else [(mlp_hook_name(l), make_hook(l)) for l in layers]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens.to(device), fwd_hooks=hooks)
    if keep is not None and fired != set(layers):
        raise DeadHookError([mlp_hook_name(l) for l in layers if l not in fired])
    return logits.float().cpu()


@dataclass(frozen=True)
class Agreement:
    """Agreement of next-token predictions with the unmodified model, over the selected positions.

    ``top1``: the argmax token is the same. ``topk_exact``: the ordered top-k lists are identical.
    ``topk_jaccard``: mean Jaccard index of the two top-k sets. All in [0, 1].
    """

    top1: float
    topk_exact: float
    topk_jaccard: float
    k: int = 5

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}top1": self.top1,
            f"{prefix}top{self.k}_exact": self.topk_exact,
            f"{prefix}top{self.k}_jaccard": self.topk_jaccard,
        }


def agreement(
    reference: Float[Tensor, "batch pos d_vocab"],
    other: Float[Tensor, "batch pos d_vocab"],
    positions: Bool[Tensor, "batch pos"],
    k: int = 5,
) -> Agreement:
    """The three agreement metrics of ``other`` against ``reference`` at ``positions``."""
    if reference.shape != other.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    if not positions.any():
        raise ValueError("no positions selected")
    ref = reference[positions].topk(k, dim=-1).indices
    oth = other[positions].topk(k, dim=-1).indices
    top1 = (ref[:, 0] == oth[:, 0]).float().mean().item()
    exact = (ref == oth).all(dim=-1).float().mean().item()
    inter = (ref.unsqueeze(-1) == oth.unsqueeze(-2)).any(dim=-1).sum(dim=-1).float()
    jac = (inter / (2 * k - inter)).mean().item()
    return Agreement(top1=top1, topk_exact=exact, topk_jaccard=jac, k=k)


# ---------------------------------------------------------------------------------- overlaps


def jaccard_matrix(
    a: Bool[Tensor, "n d"], b: Bool[Tensor, "m d"] | None = None
) -> Float[Tensor, "n m"]:
    """Pairwise Jaccard index (IoU) of the rows of two boolean matrices (sets of active units). Two
    empty sets count as identical (1)."""
    b = a if b is None else b
    af, bf = a.float(), b.float()
    inter = af @ bf.T
    union = af.sum(1, keepdim=True) + bf.sum(1).unsqueeze(0) - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))


def cosine_matrix(x: Float[Tensor, "n d"]) -> Float[Tensor, "n n"]:
    """Pairwise cosine similarity of the rows of ``x`` (diagonal exactly 1)."""
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (xn @ xn.T).clamp(-1.0, 1.0)
    sim.fill_diagonal_(1.0)
    return sim


def chance_jaccard(k1: int, k2: int, d: int) -> float:
    """Expected Jaccard index of two independent uniformly random subsets of sizes ``k1`` and ``k2``
    of ``d`` units (hypergeometric intersection): the overlap that carries no information."""
    if not (0 <= k1 <= d and 0 <= k2 <= d) or d < 1:
        raise ValueError(f"need 0 <= k1, k2 <= d, got k1={k1}, k2={k2}, d={d}")
    if k1 == 0 and k2 == 0:
        return 1.0
    log_total = _log_comb(d, k2)
    out = 0.0
    for x in range(max(0, k1 + k2 - d), min(k1, k2) + 1):
        logp = _log_comb(k1, x) + _log_comb(d - k1, k2 - x) - log_total
        out += math.exp(logp) * x / (k1 + k2 - x)
    return out


def _log_comb(n: int, r: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def pair_mean(matrix: Float[Tensor, "n n"], pairs: Sequence[tuple[int, int]]) -> float:
    """Mean of ``matrix[i, j]`` over ``pairs`` (NaN when there are none)."""
    if not pairs:
        return float("nan")
    return float(torch.stack([matrix[i, j] for i, j in pairs]).mean().item())


# ------------------------------------------------------------------------------ rank statistics


def _flat_float64(values: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def average_ranks(values: Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    """1-based ranks of ``values`` in ascending order; tied values share the mean of their ranks
    (``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``). Infinities rank at the ends; NaN raises ValueError."""
    x = _flat_float64(values)
    if np.isnan(x).any():
        raise ValueError("cannot rank NaN values")
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or xs[end] != xs[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0  # mean of the ranks start+1 .. end
            start = end
    return ranks


def auroc(positive: Sequence[float] | np.ndarray | Tensor, negative: Sequence[float] | np.ndarray | Tensor) -> float:
    """Area under the ROC curve of a score that should be *higher* for ``positive`` than for
    ``negative`` items: P(score_pos > score_neg) + P(tie) / 2, from the Mann-Whitney U statistic on
    average ranks. 1 = perfectly separated, 0.5 = no separation (e.g. identical samples), 0 =
    perfectly reversed. NaN when either group is empty. For a score where *lower* means positive
    (a distance), pass the negated values."""
    pos, neg = _flat_float64(positive), _flat_float64(negative)
    n_pos, n_neg = len(pos), len(neg)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ------------------------------------------------------------------------------------ figures


def new_figure(width: float = 6.0, height: float = 4.0, nrows: int = 1, ncols: int = 1) -> tuple[Figure, Any]:
    """A Figure with an Agg canvas and its axes (``Axes`` or an array of them)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created) and return the path."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def heatmap(
    ax: Axes, matrix: Float[Tensor, "n m"], labels: Sequence[str], title: str,
    vmin: float | None = 0.0, vmax: float | None = 1.0, annotate: bool = True,
) -> None:
    """A labelled heatmap with the values written in the cells."""
    data = matrix.detach().cpu().numpy()
    im = ax.imshow(data, vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(labels)), labels=list(labels), rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels=list(labels), fontsize=6)
    if annotate and data.shape[0] <= 16:
        mid = (data.max() + data.min()) / 2
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="black" if data[i, j] > mid else "white")
    ax.figure.colorbar(im, ax=ax, shrink=0.7)


def short_label(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
