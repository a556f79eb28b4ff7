"""Train a TopK SAE for a hooked model with SAELens's own trainer, offline, from local text files.

``train_sae(TrainSAEConfig(...))`` tokenizes the given text files into fixed-length windows, holds a
fraction out for measurement, runs ``sae_lens.LanguageModelSAETrainingRunner`` with
``override_model``/``override_dataset`` (no hub access), folds the decoder-norm rescaling into the
weights (the editor rewrites decoder rows and must not change which latents fire), measures the result
on held-out text and writes the SAE (``SAE.load_from_disk`` format) plus a model card.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass
class TrainSAEConfig:
    """How to train one TopK SAE."""

    text_files: list[str]
    """Plain-text files (or folders, searched recursively for ``*.txt``/``*.raw``) to train on."""
    output_dir: str
    """Where the SAE (``cfg.json`` + ``sae_weights.safetensors``) and ``MODEL_CARD.md`` are written."""
    model: str | None = None
    """Model source for :func:`microedit_lens.load_model` (``None`` = embedded SmolLM2)."""
    hook_name: str = "blocks.24.hook_resid_post"
    """TransformerLens hook point whose activations the SAE reconstructs."""
    d_sae: int = 9216
    """Number of latents."""
    k: int = 32
    """Active latents per token."""
    training_tokens: int = 3_000_000
    """Tokens to train on (positions >= 1 only)."""
    context_size: int = 128
    """Tokens per window; position 0 of each window (attention sink) is excluded."""
    heldout_fraction: float = 0.02
    """Share of every training file's windows held out for measurement."""
    heldout_files: list[str] = field(default_factory=list)
    """Extra text files used only for measurement (e.g. WikiText-2 test)."""
    lr: float = 1e-3
    aux_loss_coefficient: float = 1 / 32
    train_batch_size_tokens: int = 2048
    lr_warm_up_steps: int = 50
    autocast_lm: bool | None = None
    """Run the LM in bf16 autocast while harvesting activations (~1.7x faster on a CPU with AVX-512;
    far slower on an AVX2-only one). ``None`` (auto, since session 15): where the CPU runs bf16
    natively (``models.bf16_is_native``). The shipped SAE was trained with ``True``."""
    n_eval_windows: int = 256
    seed: int = 42
    n_checkpoints: int = 0

    def __post_init__(self) -> None:
        if not self.text_files:
            raise ValueError("text_files is empty: give at least one text file or folder")
        if self.k <= 0 or self.d_sae <= 0 or self.k > self.d_sae:
            raise ValueError(f"need 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if not 0.0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")
        if self.context_size < 4:
            raise ValueError(f"context_size must be >= 4, got {self.context_size}")
        if self.training_tokens <= 0:
            raise ValueError("training_tokens must be positive")


@dataclass
class SAEQuality:
    """Quality of an SAE measured on held-out windows (positions >= 1)."""

    n_tokens: int
    l0: float
    fvu: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    dead_fraction: float

    @property
    def ce_increase(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def ce_recovered(self) -> float:
        denom = self.ce_zero_ablation - self.ce_clean
        return float("nan") if denom == 0 else (self.ce_zero_ablation - self.ce_spliced) / denom

    def to_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(ce_increase=self.ce_increase, ce_recovered=self.ce_recovered)
        return d


def expand_text_files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".raw") and q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"text file or folder not found: {p}")
    return out


def tokenize_windows(tokenizer: Any, files: Sequence[Path], context_size: int) -> dict[str, list[list[int]]]:
    """Tokenize each file (paragraph by paragraph) and cut it into windows of ``context_size``."""
    windows: dict[str, list[list[int]]] = {}
    eos = tokenizer.eos_token_id
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        ids: list[int] = []
        batch = 512
        for i in range(0, len(paras), batch):
            for row in tokenizer(paras[i : i + batch], add_special_tokens=False).input_ids:
                ids.extend(row)
                if eos is not None:
                    ids.append(eos)
        windows[str(f)] = [ids[j : j + context_size] for j in range(0, len(ids) - context_size + 1, context_size)]
    return windows


def split_windows(
    windows: dict[str, list[list[int]]], heldout_fraction: float, seed: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Hold out the last ``heldout_fraction`` of each file's windows (contiguous, so no overlap with
    training text), shuffle the rest."""
    train, held = [], []
    for _, ws in sorted(windows.items()):
        n_held = int(math.ceil(len(ws) * heldout_fraction)) if heldout_fraction > 0 else 0
        train.extend(ws[: len(ws) - n_held])
        held.extend(ws[len(ws) - n_held :])
    random.Random(seed).shuffle(train)
    return train, held


@torch.no_grad()
def measure_sae(model: Any, sae: Any, windows: torch.Tensor, batch_size: int = 16) -> SAEQuality:
    """L0, FVU, and next-token CE clean / with the SAE spliced in / with the hook zero-ablated, all
    over positions >= 1 of ``windows`` (shape [n, ctx])."""
    hook = sae.cfg.metadata.hook_name
    sums = dict(n=0, l0=0.0, sse=0.0, ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, n_ce=0)
    x_sum = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    x_sq = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)

    def ce(logits: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        lp = logits[:, 1:-1].log_softmax(-1)  # predictions made at positions 1..S-2
        return -lp.gather(-1, toks[:, 2:, None]).squeeze(-1)

    for i in range(0, len(windows), batch_size):
        toks = windows[i : i + batch_size]
        logits, cache = model.run_with_cache(toks, names_filter=[hook])
        z = cache[hook][:, 1:].float()
        acts = sae.encode(z)
        recon = sae.decode(acts)
        sums["l0"] += (acts > 0).sum().item()
        sums["sse"] += ((recon - z) ** 2).sum().item()
        sums["n"] += z.shape[0] * z.shape[1]
        x_sum += z.reshape(-1, z.shape[-1]).sum(0).double()
        x_sq += (z.double() ** 2).sum().item()
        fired |= (acts > 0).reshape(-1, acts.shape[-1]).any(0)

        def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
            out = act.clone()
            out[:, 1:] = sae.decode(sae.encode(act[:, 1:])).to(act.dtype)
            return out

        def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
            out = act.clone()
            out[:, 1:] = 0
            return out

        sums["ce_clean"] += ce(logits, toks).sum().item()
        sums["ce_sae"] += ce(model.run_with_hooks(toks, fwd_hooks=[(hook, splice)]), toks).sum().item()
        sums["ce_zero"] += ce(model.run_with_hooks(toks, fwd_hooks=[(hook, zero)]), toks).sum().item()
        sums["n_ce"] += toks.shape[0] * (toks.shape[1] - 2)
    n = sums["n"]
    mean = x_sum / n
    total_var = x_sq - n * float((mean**2).sum())
    return SAEQuality(
        n_tokens=n,
        l0=sums["l0"] / n,
        fvu=sums["sse"] / total_var,
        ce_clean=sums["ce_clean"] / sums["n_ce"],
        ce_spliced=sums["ce_sae"] / sums["n_ce"],
        ce_zero_ablation=sums["ce_zero"] / sums["n_ce"],
        dead_fraction=1.0 - fired.float().mean().item(),
    )


def fold_for_editing(sae: Any) -> None:
    """Fold decoder-norm rescaling into the weights so that the set of firing latents no longer
    depends on ``W_dec`` (editing rows must not change which latents fire)."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        sae.fold_W_dec_norm()
        sae.cfg.rescale_acts_by_decoder_norm = False


def _runner_config(cfg: TrainSAEConfig, d_in: int, model_name: str) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig

    batches = max(1, cfg.train_batch_size_tokens // (cfg.context_size - 1))
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=cfg.d_sae,
            k=cfg.k,
            aux_loss_coefficient=cfg.aux_loss_coefficient,
            rescale_acts_by_decoder_norm=True,
            normalize_activations="expected_average_only_in",
            apply_b_dec_to_input=True,
        ),
        model_name=model_name,
        hook_name=cfg.hook_name,
        dataset_path="local-text",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=cfg.context_size,
        seqpos_slice=(1, None),
        prepend_bos=False,
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.train_batch_size_tokens,
        store_batch_size_prompts=16,
        n_batches_in_buffer=8 * batches,  # SAELens: buffer tokens = this x (context_size - 1)
        lr=cfg.lr,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_scheduler_name="cosineannealing",
        lr_end=cfg.lr / 10,
        lr_decay_steps=max(1, cfg.training_tokens // cfg.train_batch_size_tokens // 5),
        dead_feature_window=200,
        feature_sampling_window=500,
        n_batches_for_norm_estimate=20,
        autocast_lm=_autocast(cfg),
        device="cpu",
        seed=cfg.seed,
        dtype="float32",
        n_checkpoints=cfg.n_checkpoints,
        checkpoint_path=str(Path(cfg.output_dir) / "checkpoints"),
        output_path=str(Path(cfg.output_dir) / "_runner_output"),
        logger=LoggingConfig(log_to_wandb=False),
        verbose=True,
    )


def train_sae(cfg: TrainSAEConfig) -> tuple[Path, SAEQuality]:
    """Train, fold, measure and save an SAE; returns the output folder and its held-out quality."""
    from datasets import Dataset
    from sae_lens import SAE, LanguageModelSAETrainingRunner

    from microedit_lens.models import load_model

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model)
    files = expand_text_files(cfg.text_files)
    windows = tokenize_windows(model.tokenizer, files, cfg.context_size)
    train, held = split_windows(windows, cfg.heldout_fraction, cfg.seed)
    for f in expand_text_files(cfg.heldout_files) if cfg.heldout_files else []:
        held.extend(tokenize_windows(model.tokenizer, [f], cfg.context_size)[str(f)])
    random.Random(cfg.seed + 1).shuffle(held)
    n_avail = len(train) * (cfg.context_size - 1)
    logger.info("%d files -> %d training windows (%d usable tokens), %d held-out windows",
                len(files), len(train), n_avail, len(held))
    if n_avail < cfg.training_tokens:
        logger.warning("only %d tokens available for %d requested; windows will repeat", n_avail, cfg.training_tokens)
    dataset = Dataset.from_dict({"input_ids": train})
    runner_cfg = _runner_config(cfg, model.cfg.d_model, getattr(model.cfg, "model_name", "model"))
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=model)
    runner.run()
    t_train = time.perf_counter() - t0

    out = Path(cfg.output_dir)
    sae = SAE.load_from_disk(str(out / "_runner_output"), device="cpu")
    fold_for_editing(sae)
    sae.save_model(str(out))
    sae = SAE.load_from_disk(str(out), device="cpu")
    eval_windows = torch.tensor(held[: cfg.n_eval_windows])
    quality = measure_sae(model, sae, eval_windows)
    write_model_card(out, cfg, quality, n_windows_train=len(train), seconds=t_train, files=files)
    logger.info("SAE quality: %s", quality.to_dict())
    return out, quality


def write_model_card(
    out: Path, cfg: TrainSAEConfig, q: SAEQuality, n_windows_train: int, seconds: float, files: Sequence[Path]
) -> None:
    """Write ``MODEL_CARD.md`` and ``quality.json`` beside the SAE weights."""
    (out / "quality.json").write_text(json.dumps(q.to_dict(), indent=1))
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    names = sorted({Path(f).parent.name + "/" + Path(f).name for f in files})
    card = f"""# TopK SAE for {cfg.model or "SmolLM2-135M-Instruct (embedded)"} at `{cfg.hook_name}`

Trained with SAELens's `LanguageModelSAETrainingRunner` (offline: `override_model`, `override_dataset`)
by `microedit train-sae`. Decoder-norm rescaling and activation normalisation are folded into the
weights, so the latents that fire depend only on `W_enc`, `b_enc`, `b_dec` (the editor may rewrite
decoder rows without changing them).

| field | value |
|---|---|
| architecture | TopK, k = {cfg.k} |
| width (d_sae) | {cfg.d_sae} ({cfg.d_sae // 576 if cfg.d_sae % 576 == 0 else cfg.d_sae}x d_model where d_model = 576) |
| hook | `{cfg.hook_name}` |
| training tokens | {cfg.training_tokens:,} (positions >= 1 of {cfg.context_size}-token windows; {n_windows_train:,} windows available) |
| optimiser | Adam, lr {cfg.lr}, warm-up {cfg.lr_warm_up_steps} steps, cosine decay to lr/10, batch {cfg.train_batch_size_tokens} tokens, aux-loss coefficient {cfg.aux_loss_coefficient:.4f} |
| LM precision while harvesting | {"bf16 autocast" if _autocast(cfg) else "fp32"} |
| training wall time | {seconds / 60:.1f} min on a 2-core CPU |

## Held-out quality ({q.n_tokens:,} tokens, positions >= 1)

| metric | value |
|---|---|
| L0 | {q.l0:.1f} |
| FVU (fraction of variance unexplained) | {q.fvu:.3f} |
| next-token CE clean | {q.ce_clean:.3f} nats |
| next-token CE with SAE spliced in | {q.ce_spliced:.3f} nats (+{q.ce_increase:.3f}) |
| next-token CE with the hook zero-ablated | {q.ce_zero_ablation:.3f} nats |
| CE loss recovered | {q.ce_recovered:.3f} |
| latents never firing on held-out text | {q.dead_fraction:.1%} |

Held-out text: the last {cfg.heldout_fraction:.0%} of every training file (never trained on)
{"plus " + ", ".join(cfg.heldout_files) if cfg.heldout_files else ""}.

## Corpus
{len(names)} files: {", ".join(names)}

Measure again with `microedit sae-quality --sae {out}`.
"""
    (out / "MODEL_CARD.md").write_text(card)


def sae_from_checkpoint(path: str | Path) -> Any:
    """An inference TopK SAE from a SAELens trainer checkpoint folder: loads the training weights,
    folds the activation scaling factor and the decoder-norm rescaling (as the final save does)."""
    from sae_lens import SAE

    path = Path(path)
    sae = SAE.load_from_disk(str(path), device="cpu")
    scaler = path / "activation_scaler.json"
    if scaler.is_file():
        factor = json.loads(scaler.read_text()).get("scaling_factor")
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(float(factor))
    fold_for_editing(sae)
    return sae


def _autocast(cfg: TrainSAEConfig) -> bool:
    """``cfg.autocast_lm``, with ``None`` resolved for the CPU the LM runs on."""
    from microedit_lens.models import resolve_bf16

    return resolve_bf16(cfg.autocast_lm, "cpu")
