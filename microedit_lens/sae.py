"""SAE loading and the checks an editable SAE must pass.

:func:`load_sae` returns a SAELens :class:`~sae_lens.SAE`: the SAE shipped in this repository for the
embedded model (``None`` / ``"default"``), a directory written by ``SAE.save_model``/``microedit
train-sae``, or a SAELens ``release``/``sae_id`` pair (needs the hub).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE

logger = logging.getLogger(__name__)

DEFAULT_SAE_DIR = Path(__file__).parent / "assets" / "sae" / "smollm2-135m-l24-topk-16x-k32"


class SAECompatibilityError(ValueError):
    """The SAE cannot be used for editing on this model (wrong width, hook, architecture...)."""


def load_sae(source: str | os.PathLike[str] | None = None, sae_id: str | None = None, device: str = "cpu") -> SAE[Any]:
    """Load an SAE.

    Args:
        source: ``None``/``"default"`` for the SAE shipped for the embedded model; a directory with
            ``cfg.json`` + ``sae_weights.safetensors``; or a SAELens release name (with ``sae_id``).
        sae_id: the SAE id inside a SAELens release.
        device: where to put it.
    """
    if source is None or source == "default":
        if not (DEFAULT_SAE_DIR / "cfg.json").is_file():
            raise FileNotFoundError(f"the default SAE is missing from {DEFAULT_SAE_DIR}; reinstall the package")
        return SAE.load_from_disk(str(DEFAULT_SAE_DIR), device=device)
    path = Path(source)
    if path.is_dir():
        if not (path / "cfg.json").is_file():
            raise FileNotFoundError(f"{path} is not an SAE directory (no cfg.json)")
        return SAE.load_from_disk(str(path), device=device)
    if sae_id is None:
        raise FileNotFoundError(f"'{source}' is not a directory; for a SAELens release also pass sae_id")
    return SAE.from_pretrained(str(source), sae_id, device=device)


def hook_d_model(model: Any, hook_name: str) -> int:
    """Width of the activation at ``hook_name`` (checked by running the hook on one token)."""
    if hook_name not in model.hook_dict and hook_name not in getattr(model, "_acts_to_saes", {}):
        raise SAECompatibilityError(f"the model has no hook point named '{hook_name}'")
    seen: dict[str, int] = {}

    def grab(act: torch.Tensor, hook: Any) -> torch.Tensor:
        seen["d"] = act.shape[-1]
        return act

    layer = _hook_layer(hook_name)
    with torch.no_grad():
        model.run_with_hooks(
            torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device),
            fwd_hooks=[(hook_name, grab)],
            stop_at_layer=None if layer is None else layer + 1,
        )
    return seen["d"]


def _hook_layer(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def check_editable(sae: SAE[Any], model: Any, hook_name: str | None = None) -> str:
    """Raise :class:`SAECompatibilityError` unless ``sae`` can be edited at its hook on ``model``.
    Returns the hook name."""
    if not isinstance(sae, TopKSAE):
        raise SAECompatibilityError(
            f"MicroEdit needs a TopK SAE (sae_lens TopKSAE); got {type(sae).__name__} "
            f"(architecture '{sae.cfg.architecture()}'). Other activation functions have no fixed k."
        )
    hook = hook_name or sae.cfg.metadata.hook_name
    if not hook:
        raise SAECompatibilityError("the SAE's metadata names no hook; pass hook_name")
    d = hook_d_model(model, hook)
    if d != sae.cfg.d_in:
        raise SAECompatibilityError(f"SAE d_in={sae.cfg.d_in} does not match the width {d} of hook '{hook}'")
    if sae.cfg.normalize_activations not in ("none", None):
        raise SAECompatibilityError(
            f"SAE normalize_activations='{sae.cfg.normalize_activations}' at run time; fold it into the "
            "weights first (e.g. sae.fold_activation_norm_scaling_factor)"
        )
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise SAECompatibilityError("SAEs on reshaped (hook_z) activations are not supported")
    return hook


def editable_copy(sae: SAE[Any]) -> SAE[Any]:
    """A private copy of ``sae`` for editing (the user's SAE is never mutated).

    Decoder-norm rescaling (``rescale_acts_by_decoder_norm``) makes the TopK selection depend on
    ``W_dec``; editing decoder rows would then change which latents fire. The copy has that rescaling
    folded into the encoder (exactly equivalent outputs), so the selection depends on the encoder only.
    """
    import copy

    sae_copy = copy.deepcopy(sae)
    if getattr(sae_copy.cfg, "rescale_acts_by_decoder_norm", False):
        sae_copy.fold_W_dec_norm()
        sae_copy.cfg.rescale_acts_by_decoder_norm = False
    for p in sae_copy.parameters():
        p.requires_grad_(False)
    sae_copy.use_error_term = False
    return sae_copy
