"""Fig. 5-6: where do edit prompts and locality prompts sit in the model's late residual stream?

Each prompt (cut to ``max_tokens`` tokens) is represented by its residual stream at a late layer
(``blocks.{layer}.hook_resid_post``), mean-pooled over positions >= 1. The two groups are embedded
in 2-D with t-SNE (a small exact implementation in numpy below, after a PCA to ``pca_dims``; no
scikit-learn) and their separation is quantified without the projection: the k-nearest-neighbour
label purity in the (PCA) residual space and in the 2-D embedding, against the purity expected by
chance for the group sizes, and the silhouette of the two groups in the residual space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.common import (
    check_prompts_field,
    collect_activations,
    late_layer,
    mean_pooled,
    new_figure,
    resid_hook_name,
    save_figure,
    stat_positions,
    tokenize,
)
from analyses.prompts import KNOWLEDGE_PROMPTS, LOCALITY_PROMPTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeometryConfig:
    edit_prompts: tuple[str, ...] = KNOWLEDGE_PROMPTS
    locality_prompts: tuple[str, ...] = LOCALITY_PROMPTS
    layer: int | None = None  # None: the 80 %-depth layer (24 of 30 for the embedded model)
    max_tokens: int = 32
    pca_dims: int = 50
    perplexity: float = 30.0  # lowered to (n - 1) / 3 for small inputs
    n_iter: int = 750
    learning_rate: float | None = None  # None: max(n / early_exaggeration / 4, 50)
    early_exaggeration: float = 12.0
    knn: int = 10
    seed: int = 0
    batch_size: int = 16
    edit_label: str = "edit prompts"
    locality_label: str = "locality prompts"
    title: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "edit_prompts", check_prompts_field("edit_prompts", self.edit_prompts, minimum=2))
        object.__setattr__(self, "locality_prompts", check_prompts_field("locality_prompts", self.locality_prompts, minimum=2))
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.pca_dims < 2:
            raise ValueError("pca_dims must be >= 2")
        if not self.perplexity > 1:
            raise ValueError("perplexity must be > 1")
        if self.n_iter < 1:
            raise ValueError("n_iter must be >= 1")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")
        if not self.early_exaggeration >= 1:
            raise ValueError("early_exaggeration must be >= 1")
        if self.knn < 1:
            raise ValueError("knn must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass(frozen=True)
class GeometryResult:
    config: GeometryConfig
    layer: int
    embedding: Float[Tensor, "n 2"]
    labels: Int[Tensor, " n"]  # 0 = edit prompt, 1 = locality prompt
    knn_purity_residual: float  # k-NN label purity in the PCA'd residual space
    knn_purity_embedding: float  # the same in the 2-D t-SNE embedding
    knn_purity_chance: float
    silhouette: float  # mean silhouette of the two groups in the PCA'd residual space, in [-1, 1]
    kl_divergence: float  # final t-SNE objective

    def headline(self) -> dict[str, float]:
        return {
            "layer": float(self.layer),
            "n_edit": float(int((self.labels == 0).sum())),
            "n_locality": float(int((self.labels == 1).sum())),
            "knn_purity_residual": self.knn_purity_residual,
            "knn_purity_tsne": self.knn_purity_embedding,
            "knn_purity_chance": self.knn_purity_chance,
            "silhouette_residual": self.silhouette,
            "tsne_kl": self.kl_divergence,
        }


# ------------------------------------------------------------------------------------- t-SNE


def pca(x: Float[np.ndarray, "n d"], dims: int) -> Float[np.ndarray, "n k"]:
    """Centre and project onto the top ``min(dims, n, d)`` principal components (deterministic sign)."""
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    k = min(dims, u.shape[1])
    u = u[:, :k] * np.sign(u[np.abs(u[:, :k]).argmax(axis=0), range(k)] + 1e-30)
    return u * s[:k]


def _squared_distances(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(axis=1)
    d = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def _joint_probabilities(d2: np.ndarray, perplexity: float, tol: float = 1e-5, max_steps: int = 100) -> np.ndarray:
    """Symmetrised input affinities P with each row's conditional entropy matched to log(perplexity)
    by bisection on the Gaussian precision."""
    n = d2.shape[0]
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        di = np.delete(d2[i], i)
        di = di - di.min()
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(max_steps):
            w = np.exp(-di * beta)
            s = w.sum()
            h = np.log(s) + beta * (di * w).sum() / s
            if abs(h - target) < tol:
                break
            if h > target:
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i, np.arange(n) != i] = w / s
    p = (p + p.T) / (2.0 * n)
    return np.maximum(p, 1e-12)


def tsne(
    x: Float[np.ndarray, "n d"], perplexity: float = 30.0, n_iter: int = 750, seed: int = 0,
    learning_rate: float | None = None, early_exaggeration: float = 12.0,
) -> tuple[Float[np.ndarray, "n 2"], float]:
    """Exact t-SNE (van der Maaten & Hinton 2008) with momentum, gains and early exaggeration, as in
    the reference implementation. Returns the embedding and the final KL divergence."""
    n = x.shape[0]
    if n < 3:
        raise ValueError("t-SNE needs at least 3 points")
    perp = min(perplexity, (n - 1) / 3.0)
    p = _joint_probabilities(_squared_distances(x.astype(np.float64)), max(perp, 1.01))
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 1e-4, size=(n, 2))
    lr = learning_rate if learning_rate is not None else max(n / early_exaggeration / 4.0, 50.0)
    update = np.zeros_like(y)
    gains = np.ones_like(y)
    exag_iters = min(250, n_iter // 3)
    kl = float("nan")
    for it in range(n_iter):
        pe = p * early_exaggeration if it < exag_iters else p
        num = 1.0 / (1.0 + _squared_distances(y))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        w = (pe - q) * num
        grad = 4.0 * (np.diag(w.sum(axis=1)) - w) @ y
        momentum = 0.5 if it < exag_iters else 0.8
        same = np.sign(grad) == np.sign(update)
        gains = np.where(same, gains * 0.8, gains + 0.2).clip(min=0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(axis=0)
        if it == n_iter - 1:
            kl = float((p * np.log(p / q)).sum())
    return y, kl


def knn_purity(x: Float[np.ndarray, "n d"], labels: Int[np.ndarray, " n"], k: int) -> float:
    """Mean share of each point's ``k`` nearest neighbours (Euclidean, self excluded) with its label."""
    d = _squared_distances(x.astype(np.float64))
    np.fill_diagonal(d, np.inf)
    k = min(k, x.shape[0] - 1)
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    return float((labels[nn] == labels[:, None]).mean())


def silhouette(x: Float[np.ndarray, "n d"], labels: Int[np.ndarray, " n"]) -> float:
    """Mean silhouette coefficient (Euclidean): near 1 for well-separated groups, near 0 when they
    overlap. Points of a one-member group count 0 (the usual convention)."""
    d = np.sqrt(_squared_distances(x.astype(np.float64)))
    scores = np.zeros(len(labels))
    groups = np.unique(labels)
    for i, lab in enumerate(labels):
        own = labels == lab
        if own.sum() < 2 or len(groups) < 2:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == g].mean() for g in groups if g != lab)
        scores[i] = (b - a) / max(a, b, 1e-12)
    return float(scores.mean())


def chance_purity(labels: Int[np.ndarray, " n"]) -> float:
    """Expected k-NN purity when neighbours are drawn at random (independent of k)."""
    n = labels.shape[0]
    counts = np.bincount(labels)
    return float(((counts[labels] - 1) / (n - 1)).mean())


# --------------------------------------------------------------------------------------- run


def prompt_embeddings(model: Any, prompts: tuple[str, ...], layer: int, max_tokens: int, batch_size: int) -> Float[Tensor, "n d_model"]:
    """Mean-pooled (positions >= 1) late-layer residuals of ``prompts`` cut to ``max_tokens``."""
    tokens, mask = tokenize(model, prompts, max_tokens)
    hook = resid_hook_name(layer)
    acts = collect_activations(model, tokens, [hook], batch_size)[hook]
    return mean_pooled(acts, stat_positions(mask, True))


def run(model: Any, cfg: GeometryConfig, sae: Any = None) -> GeometryResult:
    """t-SNE of edit vs locality prompts and their k-NN separation (``sae`` is unused)."""
    layer = late_layer(model, cfg.layer)
    prompts = cfg.edit_prompts + cfg.locality_prompts
    x = prompt_embeddings(model, prompts, layer, cfg.max_tokens, cfg.batch_size).double().numpy()
    labels = np.array([0] * len(cfg.edit_prompts) + [1] * len(cfg.locality_prompts))
    feats = pca(x, cfg.pca_dims)
    emb, kl = tsne(feats, cfg.perplexity, cfg.n_iter, cfg.seed, cfg.learning_rate, cfg.early_exaggeration)
    result = GeometryResult(
        config=cfg, layer=layer, embedding=torch.from_numpy(emb).float(), labels=torch.from_numpy(labels),
        knn_purity_residual=knn_purity(feats, labels, cfg.knn),
        knn_purity_embedding=knn_purity(emb, labels, cfg.knn),
        knn_purity_chance=chance_purity(labels), silhouette=silhouette(feats, labels), kl_divergence=kl,
    )
    logger.info("geometry: %d prompts, layer %d, kNN purity %.3f (chance %.3f)", len(prompts), layer, result.knn_purity_residual, result.knn_purity_chance)
    return result


def plot(result: GeometryResult, path: str | Path) -> Path:
    fig, ax = new_figure(5.5, 5.0)
    emb = result.embedding.numpy()
    lab = result.labels.numpy()
    cfg = result.config
    for value, name, marker in ((0, cfg.edit_label, "o"), (1, cfg.locality_label, "^")):
        pts = emb[lab == value]
        ax.scatter(pts[:, 0], pts[:, 1], s=12, marker=marker, alpha=0.7, label=f"{name} ({len(pts)})")
    ax.set_xticks([])
    ax.set_yticks([])
    head = cfg.title or "t-SNE of late-layer residuals"
    ax.set_title(
        f"{head} (layer {result.layer})\n{cfg.knn}-NN purity: residual {result.knn_purity_residual:.2f}, "
        f"t-SNE {result.knn_purity_embedding:.2f}, chance {result.knn_purity_chance:.2f}; silhouette {result.silhouette:.2f}", fontsize=9,
    )
    ax.legend(fontsize=7)
    return save_figure(fig, path)
