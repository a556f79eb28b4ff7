"""The switched SAE hook: an SAE that replaces a residual-stream hook point only for inputs it
reconstructs well (Average Reconstruction Distance, ARD, at most ``tau``) and passes every other input
through untouched.

It occupies the same slot SAELens's ``HookedSAETransformer.add_sae`` uses (the hook point is swapped
for a module that carries the SAE's own hook points), so ``model.acts_to_saes``, ``reset_saes``,
``run_with_cache`` (``...hook_sae_acts_post``, ``...hook_sae_recons``) keep working, and it adds two
hook points of its own: ``hook_switch_ard`` (per-input ARD, shape [batch]) and ``hook_switch_on``
(per-input decision, shape [batch]).
"""

from __future__ import annotations

import enum
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from jaxtyping import Bool, Float, Int
from torch import nn
from transformer_lens.hook_points import HookPoint


class SwitchMode(str, enum.Enum):
    """How the switch routes inputs."""

    AUTO = "auto"
    """ARD <= tau: the SAE reconstruction replaces the activation; otherwise pass through."""
    ALWAYS = "always"
    """Always splice the reconstruction (the 'without the switch' ablation)."""
    NEVER = "never"
    """Never splice (the model is exactly the plain model; ARD is still computed and hooked)."""


def valid_positions(
    batch: int, seq: int, skip_first: int, device: torch.device, bypass: Bool[torch.Tensor, "batch pos"] | None = None
) -> Bool[torch.Tensor, "batch pos"]:
    """Positions that count for ARD and may be replaced: position >= ``skip_first`` (position 0 is an
    attention sink with a residual norm ~100x the rest) and not bypassed (padding, special tokens)."""
    valid = torch.arange(seq, device=device).expand(batch, seq) >= skip_first
    if bypass is not None:
        valid = valid & ~bypass.to(device)
    return valid


def ard(
    recon: Float[torch.Tensor, "batch pos d"],
    z: Float[torch.Tensor, "batch pos d"],
    valid: Bool[torch.Tensor, "batch pos"],
    alpha: float,
) -> Float[torch.Tensor, " batch"]:
    """Average Reconstruction Distance per input: ``sum_s ||recon_s - z_s||^2 / (alpha * S)`` over the
    valid positions ``s`` (S = their count). Inputs with no valid position get ARD = +inf (never in
    scope)."""
    return _average(_masked_sq_error(recon, z, valid).sum(-1), valid.sum(-1), alpha)


def prefix_ard(
    recon: Float[torch.Tensor, "batch pos d"],
    z: Float[torch.Tensor, "batch pos d"],
    valid: Bool[torch.Tensor, "batch pos"],
    alpha: float,
) -> Float[torch.Tensor, "batch pos"]:
    """ARD of every prefix: entry ``[b, p]`` is :func:`ard` of input ``b`` cut after position ``p``
    (+inf while the prefix has no valid position). The hook's activations are causal, so this is the
    ARD the switch would compute on that shorter input."""
    return _average(_masked_sq_error(recon, z, valid).cumsum(-1), valid.cumsum(-1), alpha)


def _masked_sq_error(recon: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return ((recon.float() - z.float()) ** 2).sum(-1) * valid


def _average(sq: torch.Tensor, n: torch.Tensor, alpha: float) -> torch.Tensor:
    out = sq / (alpha * n.clamp(min=1))
    return torch.where(n > 0, out, torch.full_like(out, float("inf")))


def topk_codes(feats: Float[torch.Tensor, "... d_sae"], k: int) -> tuple[Float[torch.Tensor, "... k"], Int[torch.Tensor, "... k"]]:
    """Values and indices of a TopK SAE's (at most k) non-zero activations."""
    vals, idx = feats.topk(k, dim=-1, sorted=False)
    return vals, idx


def sparse_decode(
    vals: Float[torch.Tensor, "... k"], idx: Int[torch.Tensor, "... k"], W_dec: Float[torch.Tensor, "d_sae d"], b_dec: Float[torch.Tensor, " d"]
) -> Float[torch.Tensor, "... d"]:
    """``W_dec^T h + b_dec`` for a k-sparse ``h`` given as (values, indices): k rows gathered instead of
    a dense d_sae x d matmul. Equal to ``SAE.decode`` for TopK SAEs without decoder-norm rescaling."""
    rows = W_dec[idx]  # [..., k, d]
    return torch.einsum("...k,...kd->...d", vals.to(rows.dtype), rows) + b_dec


class SwitchedSAE(nn.Module):
    """A hook-point replacement that runs a TopK SAE and switches per input on its ARD.

    Holds the SAE outside the module tree (like SAELens's wrapper) so cache names stay
    ``<hook>.hook_sae_acts_post`` etc. Position 0 is never replaced and never counted.
    """

    def __init__(self, sae: Any, tau: float, alpha: float, mode: SwitchMode = SwitchMode.AUTO, skip_first: int = 1):
        super().__init__()
        self.__dict__["_sae"] = sae
        for name, hook in sae.hook_dict.items():
            if name not in ("hook_sae_error", "hook_sae_output"):
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.hook_switch_ard = HookPoint()
        self.hook_switch_on = HookPoint()
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.mode = SwitchMode(mode)
        self.skip_first = skip_first
        # attributes SAELens's HookedSAETransformer reads from its wrappers
        self.use_error_term = False
        self.exclude_special_tokens: bool | list[int] = False
        self._token_mask: torch.Tensor | None = None
        self._captured_input: torch.Tensor | None = None
        self.last_ard: torch.Tensor | None = None
        self.last_on: torch.Tensor | None = None
        self.record_prefix_ard = False
        """When True, every forward also stores :func:`prefix_ard` in ``last_prefix_ard``."""
        self.last_prefix_ard: torch.Tensor | None = None

    @property
    def sae(self) -> Any:
        return self.__dict__["_sae"]

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Boolean [batch, pos] mask, True = bypass (padding): not replaced, not counted in ARD."""
        self._token_mask = mask

    def capture_input(self, x: torch.Tensor) -> None:  # SAELens wrapper interface (transcoders)
        self._captured_input = x

    @contextmanager
    def bypass(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Temporarily set the bypass mask (e.g. ``attention_mask == 0`` for right-padded batches)."""
        prev = self._token_mask
        self._token_mask = mask
        try:
            yield
        finally:
            self._token_mask = prev

    @contextmanager
    def mode_as(self, mode: SwitchMode | str) -> Iterator[None]:
        prev = self.mode
        self.mode = SwitchMode(mode)
        try:
            yield
        finally:
            self.mode = prev

    @contextmanager
    def recording_prefix_ard(self) -> Iterator[None]:
        """Store the ARD of every prefix of the next forward passes' inputs (``last_prefix_ard``)."""
        prev = self.record_prefix_ard
        self.record_prefix_ard = True
        try:
            yield
        finally:
            self.record_prefix_ard = prev

    def reconstruct(self, z: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch pos d"]:
        """SAE reconstruction through the SAE's own hook points (input, acts_pre, acts_post, recons).

        Same computation as SAELens's ``TopKSAE.encode`` + ``decode`` (the SAE has no decoder-norm
        rescaling: the editor folds it), with one TopK instead of two: the dense ``acts_post`` tensor is
        only built when a hook is attached to it (caching or editing codes), and then the codes are
        read back from what the hooks return."""
        sae = self.sae
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # not folded: SAELens's own path
            return sae.decode(sae.encode(z))
        sae_in = sae.process_sae_in(z)
        pre = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + sae.b_enc)
        vals, idx = topk_codes(pre, sae.cfg.k)
        vals = vals.relu()
        if sae.hook_sae_acts_post.fwd_hooks:
            feats = sae.hook_sae_acts_post(torch.zeros_like(pre).scatter_(-1, idx, vals))
            vals, idx = topk_codes(feats, sae.cfg.k)
        recon = sparse_decode(vals, idx, sae.W_dec, sae.b_dec)
        return sae.hook_sae_recons(recon)

    def forward(self, z: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch pos d"]:
        self._captured_input = None
        recon = self.reconstruct(z)
        b, s = z.shape[:2]
        valid = valid_positions(b, s, self.skip_first, z.device, self._token_mask)
        dist = self.hook_switch_ard(ard(recon, z, valid, self.alpha))
        if self.record_prefix_ard:
            self.last_prefix_ard = prefix_ard(recon, z, valid, self.alpha).detach()
        if self.mode is SwitchMode.AUTO:
            on = dist <= self.tau
        else:
            on = torch.full_like(dist, self.mode is SwitchMode.ALWAYS, dtype=torch.bool)
        on = self.hook_switch_on(on)
        self.last_ard, self.last_on = dist.detach(), on.detach()
        replace = (on[:, None] & valid)[..., None]
        out = torch.where(replace, recon.to(z.dtype), z)
        return self.hook_sae_output(out)
