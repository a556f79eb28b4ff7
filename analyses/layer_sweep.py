"""Fig. 3a: which layer to edit at? MicroEdit with one SAE per residual layer, same edits.

For each layer L in ``layers`` a TopK SAE of the same width, k and training budget at
``blocks.L.hook_resid_post`` edits the first ``n_edits`` records of a benchmark (default ZsRE,
tau calibrated on its training split) sequentially; the edits are scored with the WISE protocol
after the last one. Reported per layer: Rel, Gen, Loc, their average, seconds per edit, tau, and the
SAE's held-out quality (FVU, CE increase when spliced in, L0) when ``quality.json`` lies next to its
weights (written by ``microedit train-sae``).

SAEs are looked up in ``cache_dir`` (default ``$MICROEDIT_CACHE/sae_sweep``, else
``~/.cache/microedit_lens/sae_sweep``) as ``blocks.<L>.hook_resid_post-w<width>-k<k>-t<train_tokens>/``
(SAELens format: ``cfg.json`` + ``sae_weights.safetensors``). A missing one is trained there with the
project's trainer when ``train_missing`` is set (tens of minutes per SAE on a CPU; the same as
``microedit train-sae --text <data>/corpus <data>/wikitext/wikitext-2/valid.txt --hook blocks.L.hook_resid_post
--width W --k K --tokens N --lr LR --out <that folder>``), otherwise FileNotFoundError. ``run(...,
saes={layer: sae})`` uses given SAEs instead (tests, notebooks). The registry's single ``sae`` argument
is not used: the sweep needs SAEs trained alike at every layer, not the shipped one.

Regenerate the figure (embedded model; trains the missing SAEs first)::

    python -m analyses.make_figures layer_sweep             # docs/figures/fig3a_layer_sweep.png
    microedit analyze layer_sweep --set n_edits=50 --set 'layers=[6,15,24]'
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from analyses.common import check_layers_field, new_figure, resid_hook_name, resolve_layers, save_figure
from analyses.editing import (
    ZSRE_EDITS,
    ZSRE_REFERENCE,
    EditScores,
    Overrides,
    check_editor_overrides,
    check_positive_int,
    edit_and_score,
    load_edit_data,
    load_reference_texts,
    method_config,
    resolve_data_path,
    score_bars,
)

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$MICROEDIT_CACHE/sae_sweep``, else ``~/.cache/microedit_lens/sae_sweep``."""
    env = os.environ.get("MICROEDIT_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "microedit_lens") / "sae_sweep"


@dataclass(frozen=True)
class LayerSweepConfig:
    layers: tuple[int, ...] = (6, 15, 24)  # negative = from the end
    width: int = 2304  # d_sae of every SAE (4x d_model of the embedded model)
    k: int = 32
    train_tokens: int = 300_000
    lr: float = 3e-3
    n_edits: int = 50
    data: str = ZSRE_EDITS  # relative to data_root() unless absolute
    data_format: str | None = None  # None: detect
    reference: str = ZSRE_REFERENCE
    reference_limit: int = 500
    cache_dir: str | None = None  # None: default_cache_dir()
    train_missing: bool = True  # train a missing SAE (else FileNotFoundError)
    train_text: tuple[str, ...] = ("corpus", "wikitext/wikitext-2/valid.txt")  # training text, relative to data_root()
    model_source: str | None = None  # model the trainer loads; must be the model passed to run (None: embedded)
    editor_overrides: Overrides = ()  # MicroEditConfig fields
    batch_size: int = 32

    def __post_init__(self) -> None:
        layers = check_layers_field(self.layers)
        if layers is None:
            raise ValueError("layers must be a non-empty sequence of layer indices")
        object.__setattr__(self, "layers", layers)
        for name in ("width", "k", "train_tokens", "n_edits", "reference_limit", "batch_size"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        if self.k > self.width:
            raise ValueError(f"need k <= width, got k={self.k}, width={self.width}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        text = (self.train_text,) if isinstance(self.train_text, str) else tuple(self.train_text)
        if not text:
            raise ValueError("train_text is empty")
        object.__setattr__(self, "train_text", text)
        object.__setattr__(self, "editor_overrides", check_editor_overrides(self.editor_overrides))

    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    def sae_dir(self, layer: int) -> Path:
        """Where the SAE of (non-negative) ``layer`` is cached."""
        return self.cache_root() / f"{resid_hook_name(layer)}-w{self.width}-k{self.k}-t{self.train_tokens}"


def train_config(cfg: LayerSweepConfig, layer: int) -> Any:
    """The :class:`~microedit_lens.sae_training.TrainSAEConfig` of the SAE for ``layer`` (the CLI's
    ``microedit train-sae`` defaults plus this study's width, k, tokens and lr)."""
    from microedit_lens.sae_training import TrainSAEConfig

    return TrainSAEConfig(
        text_files=[str(resolve_data_path(p)) for p in cfg.train_text], output_dir=str(cfg.sae_dir(layer)),
        model=cfg.model_source, hook_name=resid_hook_name(layer), d_sae=cfg.width, k=cfg.k,
        training_tokens=cfg.train_tokens, lr=cfg.lr,
    )


def is_sae_dir(path: Path) -> bool:
    return (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file()


def ensure_sae(cfg: LayerSweepConfig, layer: int) -> Path:
    """The cached SAE folder of ``layer``, trained first if missing and ``cfg.train_missing``."""
    path = cfg.sae_dir(layer)
    if is_sae_dir(path):
        return path
    if not cfg.train_missing:
        raise FileNotFoundError(f"no SAE for layer {layer} at {path} (train_missing=False)")
    from microedit_lens.sae_training import train_sae

    logger.warning("layer_sweep: training the missing SAE for layer %d into %s (slow)", layer, path)
    train_sae(train_config(cfg, layer))
    return path


def read_quality(path: Path | None) -> dict[str, float]:
    """``quality.json`` of an SAE folder (written by the trainer), or ``{}``."""
    q = None if path is None else path / "quality.json"
    if q is None or not q.is_file():
        return {}
    return {k: float(v) for k, v in json.loads(q.read_text()).items() if isinstance(v, (int, float))}


@dataclass(frozen=True)
class LayerResult:
    layer: int
    hook_name: str
    sae_source: str  # the SAE folder, or "given"
    d_sae: int
    k: int
    fvu: float  # NaN when unknown
    ce_increase: float
    l0: float
    scores: EditScores

    def as_dict(self) -> dict[str, float]:
        p = f"L{self.layer}_"
        return {f"{p}fvu": self.fvu, f"{p}ce_increase": self.ce_increase, f"{p}l0": self.l0, **self.scores.as_dict(p)}


@dataclass(frozen=True)
class LayerSweepResult:
    config: LayerSweepConfig
    dataset: str
    layers: tuple[LayerResult, ...]

    def headline(self) -> dict[str, float]:
        out: dict[str, float] = {"n_edits": float(self.config.n_edits)}
        for r in self.layers:
            out.update(r.as_dict())
        best = max(self.layers, key=lambda r: -math.inf if math.isnan(r.scores.average) else r.scores.average)
        out["best_layer"] = float(best.layer)
        return out


def _layer_sae(cfg: LayerSweepConfig, layer: int, saes: Mapping[int, Any]) -> tuple[Any, Path | None]:
    from microedit_lens.sae import load_sae

    if layer in saes:
        sae = saes[layer]
        if sae.cfg.metadata.hook_name != resid_hook_name(layer):
            raise ValueError(f"the SAE given for layer {layer} sits at '{sae.cfg.metadata.hook_name}', not '{resid_hook_name(layer)}'")
        return sae, None
    path = ensure_sae(cfg, layer)
    return load_sae(path), path


def run(model: Any, cfg: LayerSweepConfig, sae: Any = None, saes: Mapping[int, Any] | None = None) -> LayerSweepResult:
    """Edit and score the same records with each layer's SAE. ``saes`` maps a layer (as resolved:
    non-negative) to an SAE to use instead of the cached one; ``sae`` is ignored (see the module
    docstring)."""
    if sae is not None:
        logger.warning("layer_sweep ignores the single `sae`; it uses one SAE per layer from %s", cfg.cache_root())
    given = {resolve_layers(model, (l,))[0]: s for l, s in (saes or {}).items()}
    layers = resolve_layers(model, cfg.layers)
    data = load_edit_data(cfg.data, cfg.n_edits, cfg.data_format)
    refs = load_reference_texts(cfg.reference, cfg.reference_limit)
    out = []
    for layer in layers:
        layer_sae, path = _layer_sae(cfg, layer, given)
        q = read_quality(path)
        logger.info("layer_sweep: layer %d, SAE %s", layer, path or "given")
        with edit_and_score(model, layer_sae, data.records, method_config(cfg.editor_overrides), refs, batch_size=cfg.batch_size) as er:
            scores = er.scores
        out.append(LayerResult(
            layer=layer, hook_name=resid_hook_name(layer), sae_source=str(path) if path else "given",
            d_sae=int(layer_sae.cfg.d_sae), k=int(layer_sae.cfg.k),
            fvu=q.get("fvu", math.nan), ce_increase=q.get("ce_increase", math.nan), l0=q.get("l0", math.nan),
            scores=scores,
        ))
    return LayerSweepResult(config=cfg, dataset=data.format, layers=tuple(out))


def plot(result: LayerSweepResult, path: str | Path) -> Path:
    """Grouped bars (Rel, Gen, Loc, Avg) per layer; SAE quality and seconds per edit under each group."""
    fig, ax = new_figure(1.8 + 2.2 * len(result.layers), 4.2)

    def tick(r: LayerResult) -> str:
        quality = "" if math.isnan(r.fvu) else f"\nFVU {r.fvu:.2f}, ΔCE {r.ce_increase:+.2f}"
        return f"layer {r.layer}{quality}\n{r.scores.seconds_per_edit:.2f} s/edit"

    score_bars(ax, [r.scores for r in result.layers], [tick(r) for r in result.layers])
    cfg = result.config
    ax.set_title(f"editing layer sweep: {result.dataset}, {cfg.n_edits} sequential edits, "
                 f"TopK SAEs w{cfg.width} k{cfg.k} ({cfg.train_tokens:,} tokens)", fontsize=9)
    return save_figure(fig, path)
