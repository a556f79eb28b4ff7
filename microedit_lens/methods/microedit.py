"""MicroEdit: lifelong knowledge editing by rewriting the decoder rows of a switched TopK SAE.

Per edit (prompt x, target y) the LLM and the SAE encoder stay frozen and only the decoder rows of the
latents active on the edit sequence are trained (the row mask ``M^(t)`` of the paper's Eq. 13-14):

1. *distance regularisation*: minimise ``L_rec`` (the ARD of the edit sequence);
2. *reconstruction editing*: minimise ``L_rec + L_edit`` (``L_edit`` = NLL of y after x with the
   reconstruction substituted at the hook).

At inference the :class:`~microedit_lens.switch.SwitchedSAE` replaces the activation with its
reconstruction only for inputs whose ARD is at most ``tau``.

Deviations from the paper, all configurable (see ``docs/METHOD.md``):

* **Anchors and the projected row update.** Edits share decoder rows, so a later edit rewrites rows an
  earlier one relied on. The tokens of every earlier edit (together ``memory_weight`` per edit) and of
  reference text (together ``reference_weight``) are anchored. With ``row_update="projected"`` (default)
  both stages optimise the edit's own loss, as in the paper, and the change they made to the edit
  sequence's reconstruction is then realised *exactly* by the masked-row update that moves the anchored
  reconstructions least (a weighted least-squares solve with that equality constraint); with
  ``"gradient"`` the anchor terms are added to the Adam loss instead. Only the masked rows are trained,
  exactly as in the paper; the anchors decide *how* they move. Because a TopK code depends on the
  frozen encoder only, anchors need no LLM forward pass: they are sparse matmuls over stored codes.
* **Keeping earlier targets** (``keep_targets``): the projected update also holds, to first order, the
  log-prob of the earlier target tokens it would lower most (linear constraints from gradients stored
  when each edit was made); see :meth:`MicroEditor._keep_targets`.
* **Tracking tau** (``track_tau``): tau follows the calibration quantile of reference text's ARD
  under the current decoder, within a hysteresis band (``track_tau_band``) so that the quantile's
  edit-to-edit noise does not drop earlier edits out of scope.
* **Stopping rules.** Stage 1 stops once ARD <= ``ard_margin * tau``; stage 2 once every target token
  is the argmax with a log-prob margin of ``target_margin`` and ARD <= ``ard_margin * tau``.
* **lr.** The paper's 5e-5 (LLaMA-3-8B, 4096-wide rows) does not move 576-wide SmolLM2 rows within
  tens of steps; the default here is 1e-2.
* **tau** is calibrated as a low quantile of the ARD of reference prompts unless set explicitly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file

from microedit_lens.editor import (AnchorBank, EditSequence, HookSite, MemoryBank, RowHistory, SelectedScope, SelectedSensitivities,
                                   SensitivityBank, batch_tokens, entries_of, largest_gradient_positions, pad_ids, tokenize_request)
from microedit_lens.methods.base import EditMethod, register_method
from microedit_lens.metrics import ModelInput, logits_at
from microedit_lens.models import resolve_bf16
from microedit_lens.sae import check_editable, editable_copy
from microedit_lens.switch import SwitchedSAE, SwitchMode, ard, sparse_decode, topk_codes, valid_positions
from microedit_lens.types import EditError, EditRequest, EditResult, NumericalEditError, StageStats

logger = logging.getLogger(__name__)


ROW_UPDATES = ("projected", "minimal", "gradient")
FLOOR_REPAIR_NATS = 1.0
"""``keep_floor``: the most one edit raises an earlier token's estimated log-odds back towards the floor."""
PSD_PIVOT_CUT = 1e-8
"""Constraint solves: the least Cholesky pivot (relative to the largest diagonal entry) taken as well
conditioned; below it the solve falls back to the eigendecomposition (:func:`_solve_psd`)."""
HOLD_RIDGES = (1e-6, 1e-5, 1e-4, 1e-3)
"""``damp_holds``: the ridges (relative to the mean diagonal of the constraints' Gram matrix) tried in
turn on a held step that would take the edit's own ARD above tau."""
REFRESH_BATCH_ATOMS = 8192
"""Re-measuring sensitivities: sequences with the same number of target tokens are batched while
(sequences x longest x target tokens), the size of the batched backward pass, stays within this."""


@dataclass
class MicroEditConfig:
    """Hyper-parameters of MicroEdit. Paper defaults are noted where ours differ."""

    lr: float = 1e-2
    """Adam learning rate for the decoder rows (paper: 5e-5 on LLaMA-3-8B)."""
    alpha: float = 600.0
    """ARD normaliser: ARD = sum_s ||z_hat_s - z_s||^2 / (alpha * S) (paper: 600)."""
    tau: float | None = None
    """Switch threshold. ``None``: set by :meth:`MicroEditor.calibrate` (paper: 0.5-0.55 on LLaMA-3-8B)."""
    tau_quantile: float = 0.02
    """Quantile of reference prompts' ARD used as tau by :meth:`MicroEditor.calibrate`."""
    track_tau: bool = True
    """With a calibrated tau: after every edit, set tau again to the ``tau_quantile`` quantile of the
    reference texts' ARD *under the current decoder* (edits raise unrelated inputs' ARD, so a tau fixed
    before the edits lets ever fewer inputs through; tracking keeps the share of reference text in
    scope at the quantile). Costs a sparse matmul over the stored reference codes per edit."""
    track_tau_floor: bool = True
    """``track_tau`` only: never track below the calibrated tau (follow unrelated inputs' ARD up, not
    down). Without it, a decoder that the edits' repair makes reconstruct reference-like text *better*
    lowers tau and drops earlier edits out of scope (docs/RESULTS.md: hallucination T=100 mean PPL 60
    without the floor, 7.4 with it; ZsRE T=1000 unchanged)."""
    track_tau_band: float | None = 2.0
    """``track_tau`` only: hysteresis. After an edit tau keeps its value while it lies between the
    ``tau_quantile`` and the ``track_tau_band * tau_quantile`` (at most 1) quantiles of the reference ARD under the
    current decoder, and moves to the nearer bound when outside. ``None``: tau is set to the
    ``tau_quantile`` quantile after every edit. The low quantile is a handful of reference texts and
    jumps a few % per edit; each dip drops the earlier edits that sit just under tau out of scope, and
    nothing brings them back (docs/RESULTS.md, session 22). The band bounds the reference share in
    scope at ``track_tau_band * tau_quantile``."""
    stage1_max_steps: int = 30
    """Max Adam steps of stage 1 (distance regularisation). 0 disables stage 1."""
    stage2_max_steps: int = 60
    """Max Adam steps of stage 2 (reconstruction editing)."""
    ard_margin: float = 0.7
    """Stages stop only once ARD <= ard_margin * tau (headroom for later edits)."""
    target_margin: float = 3.0
    """Stage 2 stops only once each target token beats every other token by this log-prob margin
    (3 since session 7, with the minimal update; 1 before)."""
    rec_weight: float = 1.0
    edit_weight: float = 1.0
    memory_weight: float = 1.0
    """Weight of the anchor on earlier edits' reconstructions (0 = the paper's plain method)."""
    reference_weight: float = 30.0
    """Weight of the anchor on reference-text reconstructions (0 = off). Reference tokens together
    weigh this much; every earlier edit's tokens together weigh ``memory_weight``."""
    row_update: str = "minimal"
    """How anchors shape the row update. ``"projected"``: both stages optimise the edit's own loss (the
    paper's objective, Adam on the masked rows); the resulting change of the edit sequence's
    reconstruction is then realised by the row update that least disturbs the anchored
    reconstructions (an equality-constrained weighted least-squares solve over the masked rows).
    ``"minimal"``: no Adam; the least anchored change (the projection's metric) that makes the edit
    itself succeed, by Gauss-Newton steps on linearised target log-probs with the edit's ARD as a
    penalty (docs/METHOD.md; the default since session 7). ``"gradient"``: the anchors are added to the
    Adam loss of both stages."""
    minimal_steps: int = 10
    """``row_update="minimal"`` only: at most this many linearised steps."""
    minimal_step_nats: float = 4.0
    """``row_update="minimal"`` only: the most a step asks any target log-prob to rise (stays near the
    linear regime); the ask is the deficit to ``target_margin`` plus 0.5."""
    own_positions: int | None = 32
    """``row_update="minimal"`` only: per target token of the edit, its linearised log-prob uses the
    gradient at only this many positions of the edit sequence, those with the largest gradient norm
    (the rest carry < 0.5% of the squared norm on 100-150-token hallucination prompts; the cost of a
    step grows with the square of tokens x positions). ``None``: every position."""
    ridge: float = 0.1
    """Projection only: ridge on the row change, relative to the mean squared code of the edit's
    trainable latents (keeps rows no anchor uses from moving more than needed)."""
    repair: bool = True
    """Projection only: also pull anchored reconstructions that earlier edits moved back towards
    their targets, within the rows this edit trains."""
    repair_rate: float = 1.0
    """``repair`` only: the share of that pull applied per edit (1 = solve for it in full)."""
    keep_targets: int = 512
    """Projection only: at most this many target tokens of earlier edits, those whose log-prob the
    row update would lower most to first order, are held exactly (a linear equality constraint
    each, from the gradient of the token's log-prob w.r.t. the reconstruction stored when its edit
    was made). 0 = off."""
    keep_positions: int = 4
    """keep_targets only: per target token, the constraint uses the positions with the largest
    gradient (most of a token's sensitivity is at a few positions; cost grows with the square)."""
    refresh_every: int = 200
    """keep_targets only: every this many edits, re-measure the stored sensitivities (and levels) of
    every edit so far at the current decoder, so that they are not stale and the levels' first-order
    drift does not accumulate; done when the next edit starts (never after a stream's last edit).
    0 = never (the default before session 17). A refresh runs the layers after the hook forward and
    backward once per stored edit, batched, from the codes the memory stores (~0.05 s per stored ZsRE
    edit on one core with bf16 steps, ~0.09 s in fp32 on a shared core), so its total cost grows with
    the square of the stream: ~3% of a 1000-edit ZsRE stream's time, an estimated hour over a
    5000-edit one. ZsRE T=1000, session 17, same machine and code: Rel 0.87 -> 0.92, generative exact
    match 0.67 -> 0.81 (docs/RESULTS.md); streams of 200 edits or fewer never refresh."""
    keep_floor: float | None = 2.0
    """keep_targets with a floor (log-odds, nats): instead of holding the earlier target tokens an
    update would lower most at zero change, keep every earlier target token's *estimated log-odds*
    (``log p/(1-p)`` when its edit was made, plus the first-order change of every later edit) at or
    above this floor. Tokens an update would take below it are set to it by the constraint (so a
    token that earlier edits already took below it is raised, by at most ``FLOOR_REPAIR_NATS`` per
    edit); tokens that stay above it are free. The stored gradients are then those of the log-odds.
    Must be set from an editor's first edit. ``None``: the zero-change holds (the default before
    session 7; it is what works with ``row_update="projected"``, where the floor measured no gain)."""
    keep_scope: float | None = 0.9
    """Keep every earlier edit in scope: its sequence's ARD (exact, from the codes and the error the
    memory stores) may not rise above ``keep_scope * tau`` under a row update (a first-order
    constraint, like ``keep_floor``'s, added to the held steps of the ``minimal`` and ``projected``
    updates; an edit already above it stays where it is, one already out of scope is left). Later
    edits otherwise raise earlier edits' ARD (ZsRE, 900 edits: median ARD/tau 0.54 when made, 0.82
    after; 10% above tau, off the switch). Must be set from an editor's first edit (the memory stores
    the errors from then on). ``None``: off (the default before session 13). ZsRE T=1000 with 0.9 and
    ``scope_positions=4``: Rel 0.83 -> 0.88 at 4.2 instead of 2.6 s/edit (docs/RESULTS.md, "Session 13")."""
    scope_positions: int | None = None
    """``keep_scope`` only: per constrained earlier edit, the constraint uses only this many of its
    positions, those with the largest ARD gradient x code norm on the trained rows (a held step then
    costs about what the floor's holds cost; ZsRE T=1000: the last 100 edits take 7.7 instead of 17
    s/edit, Rel 0.88 instead of 0.90). ``None``: every position that uses the trained rows (with
    ``scope_rank``, at the cost of ``scope_rank`` positions). 4 was the default in sessions 13-26."""
    scope_rank: int | None = 4
    """``keep_scope`` only: per constrained earlier edit, the constraint uses the ``scope_rank`` leading
    singular terms of its ARD gradient w.r.t. the trained rows (over the positions ``scope_positions``
    leaves, so with ``scope_positions=None`` over all of them) instead of one term per position: the
    cost of ``scope_rank`` positions, the direction of all of them (four positions of a 150-position
    hallucination prompt carry a cosine of 0.43 of it, four singular terms 0.93). The default since
    session 27, with ``scope_positions=None``: ZsRE T=1000 Rel 0.92 -> 0.94 at the same time per edit;
    hallucination, 6 edits on a 170-edit editor: the previous 100 edits stay 0.88 in scope (0.82 with
    ``scope_positions=4``), as with every position at half its time (docs/RESULTS.md, "Session 27").
    ``None``: one term per position."""
    max_latent_rate: float | None = None
    """Train only latents that fire on at most this share of reference tokens (measured by
    :meth:`MicroEditor.calibrate`); frequent 'format' latents are then left to every input alike.
    ``None``: train every active latent (the paper's mask)."""
    skip_first: int = 1
    """Leading positions never replaced nor counted in ARD (position 0 is an attention sink)."""
    seed: int = 0
    bf16_steps: bool | None = None
    """Run the layers after the hook in a bf16 copy of the model during optimisation steps (residual
    hooks; costs one bf16 copy of the weights); the final success check uses the model itself.
    ``None`` (auto, since session 15): bf16 where the model's device computes it natively (CUDA with
    bf16, or a CPU oneDNN runs bf16 on: AVX-512 / AMX), fp32 elsewhere: on an AVX2-only CPU a bf16
    matmul took 30x as long as fp32 and a demo edit 2x as long. ``MicroEditor.bf16_steps`` says
    what was chosen; ``save`` stores that choice, so a loaded editor (a resumed run) keeps it on any
    machine. ``True`` was the fixed default before session 15."""
    revert_unrouted: bool = True
    """Do not apply an edit whose update misses its stopping rule with the edit sequence's ARD above
    tau (the tau in force when the edit began): the switch would not route the prompt through the
    edited decoder, so the update could not make the edit, only disturb earlier edits and unrelated
    reconstructions. The decoder, memory and tau stay as they were; the edit log keeps an entry with
    ``EditResult.reverted`` set (no rows), so that edit numbers stay those of the requests. Such an
    update had raised the reference ARD so much (CounterFact T=2000, session 23: one edit took its
    own ARD from 56.6 to 333.4 and tau from 15 to 57.6) that 200 later edits met a disturbed decoder.
    ``False``: apply every finite update (the behaviour before session 24)."""
    damp_holds: bool = True
    """A held step of the ``minimal`` update that would take the edit's own ARD above tau is solved
    again with its constraints damped (a ridge of ``HOLD_RIDGES``, relative to the mean diagonal of
    their Gram matrix, tried in turn until the ARD is under tau): with ~1000 near-dependent holds
    (earlier target tokens and scopes in a crowded decoder) the exact least-norm correction can be
    huge (CounterFact, edit 1606 of session 24's replay: Gram eigenvalues down to 3e-10 of the
    largest, the edit's ARD 24 -> 2.3e5, so the update was not applied). The damped step holds the
    earlier edits to within the ridge instead of exactly. Steps whose exact solve stays under tau
    are unchanged. ``False``: the exact solve only (the behaviour before session 25)."""
    keep_history: bool = True
    """Keep per-edit row snapshots (undo/rollback to any edit). Without them only rollback(0) works,
    which saves ~m x d floats per edit (long benchmark runs)."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.tau is not None and not (self.tau > 0):
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not 0.0 < self.tau_quantile < 1.0:
            raise ValueError(f"tau_quantile must be in (0, 1), got {self.tau_quantile}")
        if self.track_tau_band is not None and not (self.track_tau_band >= 1.0 and math.isfinite(self.track_tau_band)):
            raise ValueError(f"track_tau_band must be None or a finite number >= 1, got {self.track_tau_band}")
        if self.stage1_max_steps < 0 or self.stage2_max_steps < 1:
            raise ValueError("stage1_max_steps must be >= 0 and stage2_max_steps >= 1")
        if not 0.0 < self.ard_margin <= 1.0:
            raise ValueError(f"ard_margin must be in (0, 1], got {self.ard_margin}")
        for name in ("rec_weight", "edit_weight", "memory_weight", "reference_weight", "target_margin", "repair_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_latent_rate is not None and not 0.0 < self.max_latent_rate <= 1.0:
            raise ValueError(f"max_latent_rate must be in (0, 1], got {self.max_latent_rate}")
        if self.skip_first < 0:
            raise ValueError("skip_first must be >= 0")
        if self.row_update not in ROW_UPDATES:
            raise ValueError(f"row_update must be one of {ROW_UPDATES}, got {self.row_update!r}")
        if self.keep_targets < 0 or self.keep_positions < 1:
            raise ValueError(f"keep_targets must be >= 0 and keep_positions >= 1, got {self.keep_targets}, {self.keep_positions}")
        if self.minimal_steps < 1 or not self.minimal_step_nats > 0:
            raise ValueError(f"minimal_steps must be >= 1 and minimal_step_nats > 0, got {self.minimal_steps}, {self.minimal_step_nats}")
        if self.own_positions is not None and self.own_positions < 1:
            raise ValueError(f"own_positions must be >= 1 or None, got {self.own_positions}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if self.keep_floor is not None and not math.isfinite(self.keep_floor):
            raise ValueError(f"keep_floor must be finite or None, got {self.keep_floor}")
        if not self.ridge > 0:
            raise ValueError(f"ridge must be positive, got {self.ridge}")
        if self.scope_positions is not None and self.scope_positions < 1:
            raise ValueError(f"scope_positions must be >= 1 or None, got {self.scope_positions}")
        if self.scope_rank is not None and self.scope_rank < 1:
            raise ValueError(f"scope_rank must be >= 1 or None, got {self.scope_rank}")
        if self.keep_scope is not None and not 0.0 < self.keep_scope <= 1.0:
            raise ValueError(f"keep_scope must be in (0, 1] or None, got {self.keep_scope}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MicroEditConfig":
        """A saved config; fields added after it was saved take the value that reproduces what the
        saving version did (e.g. ``keep_targets=0``), not today's default."""
        return cls(**{**_ADDED_LATER, **d})


_ADDED_LATER: Mapping[str, Any] = MappingProxyType({"keep_targets": 0, "keep_positions": 4, "track_tau": False, "repair_rate": 1.0,
                                                    "track_tau_floor": False, "minimal_steps": 10, "minimal_step_nats": 4.0,
                                                    "keep_floor": None, "refresh_every": 0, "own_positions": None,
                                                    "keep_scope": None, "scope_positions": None, "scope_rank": None,
                                                    "track_tau_band": None, "revert_unrouted": False,
                                                    "damp_holds": False})
"""Config fields introduced after the first saved format, with the behaviour of editors saved before."""


@dataclass
class Calibration:
    """Result of :meth:`MicroEditor.calibrate`."""

    tau: float
    quantile: float
    ard: Float[torch.Tensor, " n"]
    n_tokens: int


@dataclass
class Routing:
    """Per-input switch decisions of :meth:`MicroEditor.route`."""

    ard: Float[torch.Tensor, " n"]
    on: torch.Tensor
    tau: float


@dataclass
class _EditProblem:
    """Everything one edit optimises over."""

    seq: EditSequence
    z: Float[torch.Tensor, "1 seq d"]
    valid: torch.Tensor  # [seq] bool
    rows: torch.Tensor  # [m] sorted latent ids
    A: Float[torch.Tensor, "seq m"]
    z_fixed: Float[torch.Tensor, "seq d"]
    R0: Float[torch.Tensor, "m d"]
    idx: torch.Tensor  # [seq, k]
    vals: torch.Tensor  # [seq, k]
    anchors: list[tuple[float, Any]] = field(default_factory=list)
    sensitivities: SelectedSensitivities | None = None
    scope: SelectedScope | None = None
    """With ``keep_scope``: the earlier edits that use the trained rows, and their ARD."""

    @property
    def holds(self) -> bool:
        """Whether there is anything of earlier edits for a held step to keep."""
        return any(c is not None and c.n_constraints > 0 for c in (self.sensitivities, self.scope))


class MicroEditor(EditMethod):
    """MicroEdit on a TransformerLens/SAELens hooked model and a SAELens TopK SAE.

    >>> editor = MicroEditor(model, sae)            # attaches the switched SAE
    >>> editor.calibrate(reference_prompts)         # tau from unrelated text (or set cfg.tau)
    >>> editor.edit(EditRequest("The Eiffel Tower is in", "Rome"))
    >>> editor.undo(); editor.save("edits/"); MicroEditor.load("edits/", model)

    The user's SAE is never modified (the editor trains a private copy); the model is only changed by
    :meth:`attach` (a hook point swapped for the switch), which :meth:`detach` reverses exactly.
    """

    name = "microedit"
    config_class = MicroEditConfig

    def __init__(self, model: Any, sae: Any, config: MicroEditConfig | None = None, hook_name: str | None = None, attach: bool = True):
        self.cfg = config or MicroEditConfig()
        self.model = model
        self.hook_name = check_editable(sae, model, hook_name)
        self.base_fingerprint = _fingerprint(sae)
        self.sae = editable_copy(sae)
        self.site = HookSite(model, self.hook_name)
        self.bf16_steps = resolve_bf16(self.cfg.bf16_steps, model.cfg.device)
        """Whether optimisation steps run in the bf16 copy (``cfg.bf16_steps``, resolved)."""
        tau = self.cfg.tau if self.cfg.tau is not None else float("-inf")
        self.switch = SwitchedSAE(self.sae, tau=tau, alpha=self.cfg.alpha, skip_first=self.cfg.skip_first)
        d, k = self.sae.cfg.d_in, self.sae.cfg.k
        self.history = RowHistory()
        self.memory = MemoryBank(d, k)
        self.reference = AnchorBank(d, k)
        self.sensitivity = SensitivityBank(d, k)
        self.results: list[EditResult] = []
        self._W_dec0 = self.sae.W_dec.detach().clone()
        self._touched = torch.zeros(self.sae.cfg.d_sae, dtype=torch.bool)
        self._reference_error: _ReferenceError | None = None
        self.latent_rate: torch.Tensor | None = None
        """Share of reference tokens each latent fires on (set by calibrate)."""
        self._original_hook: Any = None
        if attach:
            self.attach()

    # ------------------------------------------------------------------ attach / detach
    @property
    def is_attached(self) -> bool:
        return _get_deep(self.model, self.hook_name) is self.switch

    def attach(self) -> None:
        if self.is_attached:
            return
        current = _get_deep(self.model, self.hook_name)
        if self.hook_name in getattr(self.model, "_acts_to_saes", {}):
            raise RuntimeError(f"another SAE is attached at '{self.hook_name}'; remove it first (model.reset_saes)")
        self._original_hook = current
        _set_deep(self.model, self.hook_name, self.switch)
        if hasattr(self.model, "_acts_to_saes"):
            self.model._acts_to_saes[self.hook_name] = self.switch
        self.model.setup()

    def detach(self) -> None:
        if not self.is_attached:
            return
        _set_deep(self.model, self.hook_name, self._original_hook)
        getattr(self.model, "_acts_to_saes", {}).pop(self.hook_name, None)
        self.model.setup()

    @property
    def tau(self) -> float | None:
        return None if self.switch.tau == float("-inf") else self.switch.tau

    @tau.setter
    def tau(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"tau must be positive, got {value}")
        self.switch.tau = float(value)

    @property
    def n_edits(self) -> int:
        return len(self.results)

    # ------------------------------------------------------------------ codes
    def _codes(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return topk_codes(self.sae.encode(z), self.sae.cfg.k)

    @torch.no_grad()
    def _clean_and_codes(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self.detached():
            z = self.site.clean_activation(tokens)
        vals, idx = self._codes(z)
        return z, vals, idx

    # ------------------------------------------------------------------ calibration / routing
    def _measure(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Per batch of texts, under the current decoder and with nothing attached: (valid positions,
        codes idx, codes vals, reconstruction, clean activation, ARD per text)."""
        for i in range(0, len(texts), batch_size):
            toks, mask = batch_tokens(self.model, texts[i : i + batch_size])
            z, vals, idx = self._clean_and_codes(toks)
            recon = sparse_decode(vals, idx, self.sae.W_dec, self.sae.b_dec)
            valid = valid_positions(*toks.shape, self.cfg.skip_first, z.device, ~mask)
            yield valid, idx, vals, recon, z, ard(recon, z, valid, self.cfg.alpha)

    @torch.no_grad()
    def route(self, texts: Sequence[str], batch_size: int = 32) -> Routing:
        """ARD and switch decision for each text under the current decoder (nothing is attached)."""
        ards = [a for *_, a in self._measure(texts, batch_size)]
        a = torch.cat(ards) if ards else torch.zeros(0)
        return Routing(a, a <= self.switch.tau, self.switch.tau)

    @torch.no_grad()
    def calibrate(self, texts: Sequence[str], quantile: float | None = None, set_tau: bool = True, batch_size: int = 32) -> Calibration:
        """Measure the ARD of reference (unrelated) texts; set ``tau`` to its ``quantile`` (unless
        ``cfg.tau`` was given or ``set_tau`` is False) and store their codes as reference anchors.

        Use texts other than the ones you score locality on."""
        if not texts:
            raise ValueError("calibrate needs at least one reference text")
        q = self.cfg.tau_quantile if quantile is None else quantile
        self.reference = AnchorBank(self.sae.cfg.d_in, self.sae.cfg.k)
        ards, n_tok = [], 0
        fired = torch.zeros(self.sae.cfg.d_sae)
        errors, owner = [], []
        for i, (valid, idx, vals, recon, z, a) in enumerate(self._measure(texts, batch_size)):
            ards.append(a)
            self.reference.add(-1, idx[valid], vals[valid], recon[valid], weight=1.0)
            errors.append((recon[valid] - z[valid]).float())
            owner.append(valid.nonzero()[:, 0] + i * batch_size)
            fired.index_add_(0, idx[valid][vals[valid] > 0].reshape(-1).cpu(), torch.ones(int((vals[valid] > 0).sum())))
            n_tok += int(valid.sum())
        # every reference token weighs 1/n_tok: the anchor is a mean over reference tokens
        self.reference.scale_weights(1.0 / max(n_tok, 1))
        self.latent_rate = fired / max(n_tok, 1)
        a = torch.cat(ards)
        self._reference_error = _ReferenceError(torch.cat(errors), torch.cat(owner).cpu(), len(texts), q)
        tau = self._tracked_tau() if self.cfg.track_tau else float(torch.quantile(a[torch.isfinite(a)], q))
        if set_tau and self.cfg.tau is None:
            self.tau = tau
        return Calibration(tau=tau if self.cfg.tau is None else self.cfg.tau, quantile=q, ard=a, n_tokens=n_tok)

    def _tracked_tau(self) -> float:
        """The calibration quantile of the reference texts' ARD under the current decoder."""
        return self._tracked_quantiles(1.0)[0]

    @torch.no_grad()
    def _tracked_quantiles(self, *scales: float) -> list[float]:
        """The ``scale * quantile`` quantiles of the reference texts' ARD under the current decoder:
        stored calibration errors plus the drift the touched rows cause (exact: codes are fixed);
        with ``track_tau_floor`` none below its value at calibration."""
        ref = self._reference_error
        if ref is None:
            raise ValueError("track_tau needs the reference errors from calibrate(reference_texts)")
        err = ref.error.clone()
        rows = self._touched.nonzero().squeeze(1)
        if rows.numel() and len(self.reference):
            sel = self.reference.select(rows, self.sae.W_dec, self.sae.b_dec)
            err[sel.index] += sel.residual
        qs = torch.tensor([min(s * ref.quantile, 1.0) for s in scales], dtype=torch.float64)
        now = self._reference_quantiles(ref, err, qs)
        if self.cfg.track_tau_floor:
            now = torch.maximum(now, self._reference_quantiles(ref, ref.error, qs))
        return now.tolist()

    def _reference_quantiles(self, ref: "_ReferenceError", err: Float[torch.Tensor, "n d"], qs: Float[torch.Tensor, " q"]) -> Float[torch.Tensor, " q"]:
        sq = torch.zeros(ref.n_texts, dtype=torch.float64).index_add_(0, ref.owner, (err.double() ** 2).sum(-1))
        n = torch.zeros(ref.n_texts, dtype=torch.float64).index_add_(0, ref.owner, torch.ones(len(ref.owner), dtype=torch.float64))
        return torch.quantile(sq[n > 0] / (self.cfg.alpha * n[n > 0]), qs)

    def _retrack_tau(self, previous: float | None) -> None:
        """After an edit (or a rollback): tau to the calibration quantile, or with ``track_tau_band``
        ``previous`` (``None``: the low bound) clamped into the band."""
        if not (self.cfg.track_tau and self.cfg.tau is None and self._reference_error is not None):
            return
        if self.cfg.track_tau_band is None:
            self.tau = self._tracked_tau()
            return
        low, high = self._tracked_quantiles(1.0, self.cfg.track_tau_band)
        self.tau = low if previous is None else min(max(previous, low), high)

    def retrack_tau(self, quantile: float | None = None) -> float:
        """Set tau now to the ``quantile`` (default: the calibration's) quantile of the reference texts'
        ARD under the current decoder, and keep that quantile for tracking (``track_tau``) and
        :meth:`save`. Needs :meth:`calibrate` first. Returns the new tau."""
        if self._reference_error is None:
            raise ValueError("retrack_tau needs the reference errors of calibrate(reference_texts)")
        if quantile is not None:
            if not 0.0 < quantile < 1.0:
                raise ValueError(f"quantile must be in (0, 1), got {quantile}")
            self._reference_error.quantile = quantile
        self.tau = self._tracked_tau()
        return self.tau

    def prepare(self, reference_texts: Sequence[str]) -> None:
        self.calibrate(reference_texts)

    @contextmanager
    def padding(self, pad_mask: Any) -> Iterator[None]:
        with self.switch.bypass(pad_mask):
            yield

    @property
    def unchanged_blocks(self) -> int:
        """The blocks below the one holding the hook point: the switch changes nothing before it."""
        return self.site.layer or 0

    @torch.no_grad()
    def prefix_logits_at(
        self, tokens: "Int[torch.Tensor, 'b s'] | ModelInput", pad_mask: Bool[torch.Tensor, "b s"], rows: Int[torch.Tensor, " n"], cols: Int[torch.Tensor, " n"]
    ) -> Float[torch.Tensor, "n vocab"]:
        """Logits as if every input ended at ``cols[i]``, in two passes: the per-input switch makes one
        decision per input, so position ``p`` of a longer input may be routed otherwise than the input
        cut after ``p``. Cut there, the decision is ``prefix ARD <= tau`` and the output is that of a
        pass with the switch forced on or off (the model is causal once the decision is fixed); so run
        both passes and take, per position, the one its prefix ARD picks (ARD from the forced-on pass:
        the hook's input is the same in both). Follows the switch's own rule (``mode``, ``tau``), not
        interventions on ``hook_switch_on``."""
        if not self.is_attached or self.switch.mode is not SwitchMode.AUTO:  # one routing for every prefix
            with self.padding(pad_mask):
                return logits_at(self.model, tokens, rows, cols)
        with self.padding(pad_mask), self.switch.recording_prefix_ard(), self.switch.mode_as(SwitchMode.ALWAYS):
            on_logits = logits_at(self.model, tokens, rows, cols)
            on = self.switch.last_prefix_ard[rows, cols] <= self.switch.tau
        if bool(on.all()):
            return on_logits
        with self.padding(pad_mask), self.switch.mode_as(SwitchMode.NEVER):
            off_logits = logits_at(self.model, tokens, rows, cols)
        return torch.where(on[:, None], on_logits, off_logits)

    # ------------------------------------------------------------------ editing
    def edit(self, requests: EditRequest | Sequence[EditRequest]) -> list[EditResult]:
        reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
        for i, r in enumerate(reqs):
            if not isinstance(r, EditRequest):
                raise TypeError(f"request {i} is a {type(r).__name__}, not an EditRequest")
        if self.tau is None:
            raise ValueError("tau is not set: pass MicroEditConfig(tau=...) (the paper's fixed threshold) "
                             "or call editor.calibrate(reference_texts) first")
        seqs = []
        for i, r in enumerate(reqs):  # validate everything before touching the decoder
            try:
                seqs.append(tokenize_request(self.model, r))
            except ValueError as exc:
                raise ValueError(f"request {i}: {exc}") from None
        out: list[EditResult] = []
        for i, (r, s) in enumerate(zip(reqs, seqs)):
            try:
                res = self._edit_one(r, s)
            except EditError as exc:
                raise type(exc)(f"request {i}: {exc}", i, out) from None
            out.append(res)
            self.results.append(res)
        return out

    def _sequence_codes(self, seq: EditSequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean activation [1, seq, d], valid positions [seq], code values and indices [seq, k])."""
        z, vals, idx = self._clean_and_codes(seq.tokens[None])
        return z, valid_positions(1, len(seq.tokens), self.cfg.skip_first, z.device)[0], vals[0], idx[0]

    def _problem(self, seq: EditSequence) -> _EditProblem:
        z, valid, vals, idx = self._sequence_codes(seq)
        active = (vals > 0) & valid[:, None]
        rows = torch.unique(idx[active])
        if self.cfg.max_latent_rate is not None:
            if self.latent_rate is None:
                raise ValueError("max_latent_rate needs latent firing rates: call calibrate(reference_texts) first")
            rows = rows[self.latent_rate[rows.cpu()].to(rows.device) <= self.cfg.max_latent_rate]
        if rows.numel() == 0:
            raise EditError("no trainable SAE latent is active on the edit sequence (only one token long, or "
                            "every active latent is more frequent than max_latent_rate)")
        W, b = self.sae.W_dec, self.sae.b_dec
        trainable = active & torch.isin(idx, rows)
        z_fixed = sparse_decode(vals * ~trainable, idx, W, b)
        A = torch.zeros(len(seq.tokens), rows.numel(), dtype=W.dtype)
        p, j = trainable.nonzero(as_tuple=True)
        A.index_put_((p, torch.searchsorted(rows, idx[p, j])), vals[p, j].to(W.dtype), accumulate=True)
        prob = _EditProblem(seq, z, valid, rows, A, z_fixed, W[rows].detach().clone(), idx, vals)
        for weight, bank in ((self.cfg.memory_weight, self.memory), (self.cfg.reference_weight, self.reference)):
            if weight > 0 and len(bank):
                prob.anchors.append((weight, bank.select(rows, W, b)))
        if self._keeps_targets and len(self.sensitivity):
            prob.sensitivities = self.sensitivity.select(rows)
        if self.cfg.keep_scope is not None and self._holds_earlier and len(self.memory):
            prob.scope = self.memory.scope(rows, W, b, self.cfg.alpha)
        return prob

    @property
    def _holds_earlier(self) -> bool:
        """Whether the row update has held steps (what keeps earlier targets and scopes)."""
        return self.cfg.row_update in ("projected", "minimal")

    @property
    def _keeps_targets(self) -> bool:
        return self._holds_earlier and self.cfg.keep_targets > 0

    def _objective(self, prob: _EditProblem, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (z_hat [seq, d], ARD of the edit sequence, weighted anchor loss)."""
        z_hat = prob.z_fixed + prob.A @ R
        v = prob.valid
        rec = ((z_hat[v] - prob.z[0, v]) ** 2).sum() / (self.cfg.alpha * v.sum())
        anchors = prob.anchors if self.cfg.row_update == "gradient" else []
        anchor = sum((w * a.loss(R - prob.R0) for w, a in anchors), start=torch.zeros(()))
        return z_hat, rec, anchor / self.cfg.alpha

    def _target_stats(self, prob: _EditProblem, z_hat: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL of the target, min log-prob margin of target over the best other token)."""
        tgt_lp, margin = self._token_margins(prob, z_hat, fast)
        return -tgt_lp.mean(), margin.min()

    def _target_logits(self, prob: _EditProblem, z_hat: torch.Tensor, fast: bool = False) -> Float[torch.Tensor, "n_target vocab"]:
        """Logits (float32) at the positions predicting the target, with ``z_hat`` substituted at the
        valid positions of the hook (differentiable in ``z_hat``). ``fast``: in the bf16 copy
        (``bf16_steps``)."""
        resid = torch.where(prob.valid[None, :, None], z_hat[None].to(prob.z.dtype), prob.z)
        with self.detached():
            logits = self.site.logits_from(resid, prob.seq.tokens[None], fast=fast and self.bf16_steps, positions=prob.seq.target_positions)
        return logits[0].float()

    def _token_margins(self, prob: _EditProblem, z_hat: torch.Tensor, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per target token: (log-prob, log-prob margin over the best other token)."""
        lp = self._target_logits(prob, z_hat, fast).log_softmax(-1)
        tgt = prob.seq.target_ids[:, None]
        tgt_lp = lp.gather(-1, tgt).squeeze(-1)
        other = lp.scatter(-1, tgt, float("-inf")).max(-1).values
        return tgt_lp, tgt_lp - other

    @torch.no_grad()
    def _token_log_odds(self, prob: _EditProblem, z_hat: torch.Tensor) -> Float[torch.Tensor, " n_target"]:
        """Each target token's log-odds ``log p / (1 - p)`` with ``z_hat`` substituted (full precision)."""
        return _log_odds(self._target_logits(prob, z_hat), prob.seq.target_ids)

    def _target_gradients(self, prob: _EditProblem, z_hat: torch.Tensor, fast: bool = False, log_odds: bool = False) -> Float[torch.Tensor, "n_target seq d"]:
        """Gradient of each target token's log-prob (``log_odds``: log-odds) w.r.t. the reconstruction
        at every position: one forward pass and one batched backward pass (a vector-Jacobian product
        per token, vmapped, through the blocks only: :meth:`_token_gradients`). ``fast``: in the bf16
        copy (``bf16_steps``)."""
        zh = z_hat.detach()[None].clone().requires_grad_(True)
        with torch.enable_grad():
            resid = torch.where(prob.valid[None, :, None], zh.to(prob.z.dtype), prob.z)
        grad, _ = self._token_gradients(zh, resid, prob.seq.tokens[None], prob.seq.target_positions[None],
                                        prob.seq.target_ids[None], log_odds, fast=fast and self.bf16_steps)
        return grad[:, 0].float()

    def _token_gradients(self, leaf: torch.Tensor, resid: Float[torch.Tensor, "batch seq d"], tokens: Int[torch.Tensor, "batch seq"],
                         positions: Int[torch.Tensor, "batch n_t"], targets: Int[torch.Tensor, "batch n_t"], log_odds: bool,
                         fast: bool = False) -> tuple[Float[torch.Tensor, "n_t batch seq d"], Float[torch.Tensor, "batch_n_t vocab"]]:
        """Gradient w.r.t. ``leaf`` (what ``resid``, the activation at the hook, was computed from) of
        each row's target token j's log-prob (``log_odds``: log-odds) at ``positions[:, j]``, batched
        over j; and the logits there (flattened rows x tokens, detached). A token's score depends on
        the final residual at its own position only, so the unembedding's part is one plain backward
        pass and the batched pass runs through the blocks only (batched through the unembedding it
        cost n_t times more; docs/RESULTS.md, "Session 16")."""
        n_t, tgt = targets.shape[1], targets.flatten()
        with torch.enable_grad(), self.detached():
            h = self.site.final_resid(resid, tokens, positions, fast=fast)  # [B, n_t, d_model]
            h_leaf = h.detach().requires_grad_(True)
            logits = self.site.unembed(h_leaf, fast).flatten(0, 1)  # [B*n_t, vocab]
            lp = _log_odds(logits, tgt) if log_odds else logits.log_softmax(-1).gather(-1, tgt[:, None]).squeeze(-1)
            (g_h,) = torch.autograd.grad(lp.sum(), h_leaf)  # each row's own score: rows are independent
            picks = torch.eye(n_t, dtype=h.dtype)[:, None, :, None] * g_h[None]  # [n_t, B, n_t, d]: token j of every row
            (grad,) = torch.autograd.grad(h, leaf, grad_outputs=picks, is_grads_batched=True)  # [n_t, B, seq, d]
        return grad.detach(), logits.detach()

    def _run_stage(self, prob: _EditProblem, R: torch.Tensor, steps: int, with_edit: bool) -> StageStats:
        opt = torch.optim.Adam([R], lr=self.cfg.lr)
        ard_goal = self.cfg.ard_margin * self.switch.tau
        t0, first, last, n = time.perf_counter(), float("nan"), float("nan"), 0
        for n in range(steps + 1):
            z_hat, rec, anchor = self._objective(prob, R)
            loss = self.cfg.rec_weight * rec + anchor
            done = rec.item() <= ard_goal
            if with_edit:
                nll, margin = self._target_stats(prob, z_hat, fast=True)
                loss = loss + self.cfg.edit_weight * nll
                done = done and margin.item() >= self.cfg.target_margin
            if not torch.isfinite(loss):
                raise NumericalEditError(f"non-finite loss ({loss.item()}) at step {n}; the edit was rolled back")
            first = loss.item() if n == 0 else first
            last = loss.item()
            if done or n == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return StageStats(steps=n, loss_start=first, loss_end=last, seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def _project(self, prob: _EditProblem, R: torch.Tensor) -> torch.Tensor:
        """Rows that give the edit sequence exactly the reconstruction ``R`` gives it, changing the
        anchored reconstructions least: minimise ``sum_anchors w ||r_p + A_p dR||^2 + mu ||dR||^2``
        subject to ``A_e dR = A_e (R - R0)`` (A_e: the edit's codes on the trained rows)."""
        Ae = prob.A[prob.valid].to(torch.float64)
        dR0 = R.to(torch.float64) - prob.R0.to(torch.float64)
        D = Ae @ dR0
        H, b = self._anchor_system(prob)
        L = torch.linalg.cholesky(H)
        X = torch.cholesky_solve(Ae.T.contiguous(), L)  # H^-1 A_e^T  [m, S]
        y = torch.cholesky_solve(b, L)  # H^-1 b  [m, d]
        M = Ae @ X
        M.diagonal().add_(1e-10 * float(M.diagonal().mean()))
        nu = torch.linalg.solve(M, D + Ae @ y)
        dR = X @ nu - y
        if prob.holds:
            dR = self._keep_targets(prob, dR, L, X, Ae, M)
        return _rows_after(prob, dR)

    def _anchor_system(self, prob: _EditProblem) -> tuple[Float[torch.Tensor, "m m"], Float[torch.Tensor, "m d"]]:
        """The anchors' quadratic in the row change: ``sum w ||r_p + A_p dR||^2 + mu ||dR||^2 =
        <dR, H dR> + 2 <b, dR> + const`` (float64; ``b`` only with ``repair``, scaled by its rate)."""
        f8 = torch.float64
        Ae = prob.A[prob.valid].to(f8)
        m, d = prob.R0.shape
        H = torch.zeros(m, m, dtype=f8)
        b = torch.zeros(m, d, dtype=f8)
        for w, anc in prob.anchors:
            if anc.residual.shape[0] == 0:
                continue
            # A^T W A and A^T W r as sparse x dense products (a position's code uses few trained rows)
            A = anc.A.to(f8).coalesce()
            r_, c_ = A.indices()
            wAt = torch.sparse_coo_tensor(torch.stack([c_, r_]), A.values() * (w * anc.weight.to(f8))[r_], (m, A.shape[0]), check_invariants=False)
            H += torch.sparse.mm(wAt, A.to_dense())
            if self.cfg.repair:
                b += self.cfg.repair_rate * torch.sparse.mm(wAt, anc.residual.to(f8))
        mu = self.cfg.ridge * float((Ae**2).sum(0).mean()) / max(Ae.shape[0], 1)
        H.diagonal().add_(mu)
        return H, b

    @staticmethod
    def _solve_constraints(cons: "_Constraints", P: Any, rhs: Float[torch.Tensor, " j"], ridge: float = 0.0) -> Float[torch.Tensor, "m d"]:
        """The least correction ``sum_j lambda_j P C_j`` (metric ``P^-1``) whose first-order effect on
        constraint ``j`` (``<C_j, .>``, ``C_j = sum_{e in j} a_e g_e^T``) is ``rhs_j``: ``K lambda = rhs``,
        ``K_ij = <C_i, P C_j>``, from ``P a`` per distinct atom and ``g_e . g_f`` (``C_j`` is low rank).

        ``a_e^T P a_f`` is formed per entry pair (one dense ``[n, m] @ [m, n]`` product) where most
        entries have their own atom (held tokens and scope: one atom per stored position), and per
        atom pair then gathered where many entries share few atoms (the edit's own tokens all read the
        same sequence); a sparse product followed by the gather cost 2x the first way on the held
        steps of a crowded decoder (docs/RESULTS.md, "Session 16"). ``ridge`` > 0: the damped solve
        ``(K + ridge * mean(diag K) I) lambda = rhs`` (the constraints met to within the ridge)."""
        PA = P(cons.At)  # P a per distinct atom  [m, U]
        U, n = cons.At.shape[1], len(cons.atom)
        if 2 * U > n:
            pair = cons.At[:, cons.atom].T @ PA[:, cons.atom]
        else:
            pair = (cons.At.T @ PA)[cons.atom][:, cons.atom]
        pair.mul_(cons.gram)  # <a_e g_e^T, P a_f g_f^T>  [n, n]
        J, seg = cons.n_constraints, cons.seg
        K = torch.zeros(J, J, dtype=torch.float64).index_add_(1, seg, torch.zeros(J, n, dtype=torch.float64).index_add_(0, seg, pair))
        if ridge > 0:
            K.diagonal().add_(ridge * float(K.diagonal().mean()))
        lam = _solve_psd(K, rhs.double())
        Z = torch.zeros(U, cons.G.shape[1], dtype=torch.float64).index_add_(0, cons.atom, lam[seg][:, None] * cons.G)
        return PA @ Z

    def _keep_targets(self, prob: _EditProblem, dR: torch.Tensor, L: torch.Tensor, X: torch.Tensor, Ae: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """Add to the projected update the least (in the projection's metric) correction that zeroes
        the first-order log-prob change of the earlier target tokens it would lower most.

        With ``P = H^-1 - X M^-1 X^T`` (the metric restricted to updates that keep the edit's own
        reconstruction), the correction is ``sum_j lambda_j P C_j`` with ``K lambda = -c``,
        ``K_ij = <C_i, P C_j>`` and ``c_j = <C_j, dR>``; ``C_j = sum_{p in j} a_p g_p^T`` is low rank, so
        everything is computed from ``P a_p`` and ``g_p . g_q``."""
        def P(At: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(At, L) - X @ torch.linalg.solve(M, X.T @ At)

        return self._hold_threatened(prob, P, dR)

    def _hold_threatened(self, prob: _EditProblem, P: Any, base: torch.Tensor,
                         own: "_Constraints | None" = None, ask: torch.Tensor | None = None, ridge: float = 0.0) -> torch.Tensor:
        """``base`` plus the least correction (metric ``P^-1``) that raises the edit's own tokens by
        ``ask`` (``own``, if given), takes the earlier target tokens the result would lower most (up
        to ``keep_targets``; with ``keep_floor``: those it would take below the floor) where they
        must be (:meth:`_held_change`) and, with ``keep_scope``, keeps the earlier edits whose ARD it
        would take above their ceiling at it (:meth:`_scope_targets`). A correction can push other
        earlier tokens or edits out, so the sets are re-checked twice, each time solved from ``base``
        with everything chosen so far (the ARD, quadratic in the rows, linearised at the last result).
        ``ridge``: those solves damped (:meth:`_solve_constraints`)."""
        sens, scope = prob.sensitivities, prob.scope
        new = base if own is None else base + self._solve_constraints(own, P, ask)
        chosen = held_scope = torch.zeros(0, dtype=torch.long)
        at_base = None
        scope_target = None if scope is None else self._scope_targets(scope)
        for _ in range(3):
            grew = False
            if sens is not None and sens.n_constraints:
                chosen, grew = self._more_threatened(sens, new, chosen)
            if scope is not None and scope.n_constraints:
                scope_now = scope.after(new)
                held_scope, grew_scope = self._more_out_of_scope(scope_now - scope_target, held_scope)
                grew = grew or grew_scope
            if not grew:
                break
            parts = [] if own is None else [(own, ask)]
            if len(chosen):
                at_base = sens.change(base) if at_base is None else at_base
                parts.append((_Constraints.held(sens, chosen), self._held_change(sens, chosen) - at_base[chosen]))
            if len(held_scope):
                # ARD(base + c) ~ ARD(new) + <grad ARD(new), base + c - new> = target, in units of tau
                # (the constraint solve's eigenvalue cut-off is relative: keep its scale near the tokens')
                lin = _Constraints.scope(scope, held_scope, new, scale=1.0 / self.switch.tau, positions=self.cfg.scope_positions,
                                          rank=self.cfg.scope_rank)
                parts.append((lin, (scope_target[held_scope] - scope_now[held_scope]) / self.switch.tau + lin.change(new - base)))
            cons, rhs = parts[0]
            for c, r in parts[1:]:
                cons, rhs = cons.concat(c), torch.cat([rhs, r])
            new = base + self._solve_constraints(cons, P, rhs, ridge)
        return new

    def _more_out_of_scope(self, over: Float[torch.Tensor, " n_constraints"], chosen: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``chosen`` plus the earlier edits whose ARD after the update is above their target by
        ``over`` > 0, most first (up to ``keep_targets`` in all, at least 64); and whether any was added
        or a chosen one is still above its target by more than 0.1% of tau (the linearisation's error)."""
        off = bool(len(chosen)) and bool((over[chosen] > 1e-3 * self.switch.tau).any())
        over = over.index_fill(0, chosen, -math.inf)
        worst = torch.argsort(over, descending=True)[: max(self.cfg.keep_targets, 64) - len(chosen)]
        worst = worst[over[worst] > 0]
        return torch.cat([chosen, worst]), len(worst) > 0 or off

    def _scope_targets(self, scope: SelectedScope) -> Float[torch.Tensor, " n_constraints"]:
        """The most ARD each earlier edit may have after the update: the ``keep_scope`` ceiling or, for
        an edit above it but still in scope (ARD <= tau), its ARD now. An edit already out of scope is
        not held (``inf``): asking the update to lower such edits (by 0.05 tau each, session 13)
        filled the held set with them and let in-scope edits fall out (CounterFact, 1500 edits:
        113 of the in-scope edits fell out over the next 8 edits, against 9 when they are left;
        docs/RESULTS.md, "Session 14")."""
        tau = self.switch.tau
        return scope.ard.clamp_min(self.cfg.keep_scope * tau).masked_fill(scope.ard > tau, math.inf)

    def _more_threatened(self, sens: SelectedSensitivities, dR: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``chosen`` plus the earlier target tokens (up to ``keep_targets`` in all) that ``dR`` lowers
        most to first order (by more than 1e-4); and whether any was added."""
        c = sens.change(dR)
        if self.cfg.keep_floor is not None:
            if sens.level is None:
                raise ValueError("keep_floor needs token levels, stored only by edits made with keep_floor set")
            after = sens.level + c  # estimated log-odds after dR
            after[chosen] = math.inf
            worst = torch.argsort(after)[: self.cfg.keep_targets - len(chosen)]
            worst = worst[after[worst] < self.cfg.keep_floor]
            return torch.cat([chosen, worst]), len(worst) > 0
        c[chosen] = 0.0
        worst = torch.argsort(c)[: self.cfg.keep_targets - len(chosen)]
        worst = worst[c[worst] < -1e-4]
        return torch.cat([chosen, worst]), len(worst) > 0

    def _held_change(self, sens: SelectedSensitivities, chosen: torch.Tensor) -> Float[torch.Tensor, " j"]:
        """What the update's first-order change of each chosen earlier token must be: 0 (a hold) or,
        with ``keep_floor``, what takes its estimated log-odds to the floor (at most
        ``FLOOR_REPAIR_NATS`` up)."""
        if self.cfg.keep_floor is None:
            return torch.zeros(len(chosen), dtype=torch.float64)
        return (self.cfg.keep_floor - sens.level[chosen]).clamp(max=FLOOR_REPAIR_NATS)

    def _minimal_rows(self, prob: _EditProblem) -> tuple[torch.Tensor, StageStats]:
        """``row_update="minimal"``: the least change of the trained rows, in the anchors' metric ``H``
        (the projection's), that makes the edit succeed. Per step, with the target log-probs
        linearised at the current rows (gradients ``g_{t,p}`` w.r.t. the reconstruction):

        ``min <dR, H dR> + 2<b, dR> + lam ||e0 + A_e dR||^2  s.t.  <C_t, dR> = <C_t, dR_now> + ask_t``

        (``e0`` the edit sequence's reconstruction error at the unedited rows, ``ask_t`` the deficit
        of token t to ``target_margin`` plus 0.5, capped at ``minimal_step_nats``; ``lam`` doubled,
        from a quarter of the previous step's, until the edit's ARD is under 0.9 x ``ard_margin * tau``;
        where no weight gets there, the step asks for half), plus ``keep_targets``' holds on
        earlier target tokens. A step that does not lower the deficit is halved (twice at most).
        Stops when every target token has its margin and the ARD is under the goal; the holds (the
        costly part of a step) join from the step after the rule is first met (or from the budget's
        last three steps), and the rule must then be met again with them."""
        t0 = time.perf_counter()
        sys_ = _MinimalSystem.build(self, prob)
        dR = torch.zeros_like(prob.R0, dtype=torch.float64)
        lp, margin = self._margins_at(prob, dR)
        first, n = -float(lp.mean()), 0
        can_hold = prob.holds
        hold = False
        for n in range(1, self.cfg.minimal_steps + 1):
            merit = self._minimal_merit(margin, sys_.ard(dR), sys_.ard_goal)
            if not math.isfinite(merit):
                raise NumericalEditError(f"non-finite target margin or ARD at step {n}; the edit was rolled back")
            if merit == 0.0 and (hold or not can_hold):
                n -= 1
                break
            # met without the holds, or the budget's last three steps (an edit that meets the rule
            # only then would otherwise keep rows that nothing held): from now on every step also
            # holds earlier targets
            first_held = can_hold and not hold and (merit == 0.0 or n > self.cfg.minimal_steps - 3)
            hold = hold or first_held
            new = self._minimal_step(prob, sys_, dR, margin, hold)
            tried = []
            # the first held step is taken whole: shrinking it back towards the unheld rows would
            # keep only part of the holds (the rule is then re-met with all of them, or not at all)
            for shrink in ((1.0,) if first_held else (1.0, 0.5, 0.25)):
                cand = dR + shrink * (new - dR)
                lp_c, margin_c = self._margins_at(prob, cand)
                tried.append((self._minimal_merit(margin_c, sys_.ard(cand), sys_.ard_goal), shrink, cand, lp_c, margin_c))
                if tried[-1][0] < merit or tried[-1][0] == 0.0:
                    break
            merit_new, shrink, dR, lp, margin = min(tried, key=lambda t: (t[0], -t[1]))
            logger.debug("minimal step %d: held=%s shrink=%s merit %.4g -> %.4g (min margin %.3g)", n, hold, shrink, merit, merit_new, float(margin.min()))
        return _rows_after(prob, dR), StageStats(steps=n, loss_start=first, loss_end=-float(lp.mean()), seconds=time.perf_counter() - t0)

    def _margins_at(self, prob: _EditProblem, dR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self._token_margins(prob, prob.z_fixed + prob.A @ _rows_after(prob, dR))

    def _minimal_merit(self, margin: torch.Tensor, ard_now: float, ard_goal: float) -> float:
        """How far the edit is from its stopping rule (0 = met)."""
        return float((self.cfg.target_margin - margin).clamp_min(0).sum()) + max(ard_now - ard_goal, 0.0) / ard_goal

    def _minimal_step(self, prob: _EditProblem, sys_: "_MinimalSystem", dR: torch.Tensor, margin: torch.Tensor, hold: bool) -> torch.Tensor:
        """The next full linearised step of :meth:`_minimal_rows` (the total row change it proposes);
        ``hold``: with ``keep_targets``' holds on earlier target tokens."""
        g = self._target_gradients(prob, prob.z_fixed + prob.A @ _rows_after(prob, dR), fast=True)[:, sys_.cols]  # [n_t, S, d]
        own = _Constraints.own(sys_.Ae, g, self.cfg.own_positions)
        ask = (self.cfg.target_margin + 0.5 - margin.double()).clamp(0.0, self.cfg.minimal_step_nats)
        start, best = sys_.lam / 4.0, None  # the last step's weight is usually close: start just below it
        for halvings in range(6):
            best, met = self._weigh_ard(sys_, own, dR, ask * 0.5**halvings, start, best)
            if met:
                break  # else the ARD goal is out of reach with this ask (the weight grew past what float64 resolves): ask for half
        P, ask, new, sys_.lam = best.P, best.ask, best.new, best.lam
        if hold and prob.holds:
            # a held step corrects the current rows (the least change that raises the target tokens by
            # the ask and takes the chosen earlier tokens where they must be) instead of solving afresh
            # from the unconstrained point: a fresh solve keeps only what the constraints linearised *here* see, and at a
            # point where the edit has its margin the target's gradient no longer sees the suppressed
            # competitors, so it could undo the edit (docs/METHOD.md)
            # damp_holds: from the ridge the edit's last held step needed (0 = the exact solve)
            for ridge in [r for r in (0.0, *HOLD_RIDGES) if r >= sys_.hold_ridge] if self.cfg.damp_holds else [0.0]:
                sys_.hold_ridge = ridge
                new = self._hold_threatened(prob, P, dR, own, ask, ridge)
                if sys_.ard(new) <= self.switch.tau:
                    break
            if sys_.hold_ridge:
                logger.info("held step with damped holds (ridge %g): the edit's ARD %.4g, tau %.4g", sys_.hold_ridge, sys_.ard(new), self.switch.tau)
        return new

    def _weigh_ard(self, sys_: "_MinimalSystem", own: "_Constraints", dR: torch.Tensor, ask: torch.Tensor, lam: float,
                   best: "_WeighedStep | None") -> tuple["_WeighedStep", bool]:
        """The step at the least weight ``lam * 2^k`` (k = 0..39) that raises the target log-probs by
        ``ask`` with its ARD under 0.9 x the goal (``met``); where none does, the last solvable step
        (or ``best`` if none).

        The step's ARD falls as its weight grows, so instead of trying k = 0, 1, 2, ... in turn (an
        edit's first step needs ~28 of them: its weight starts far below; later steps start a quarter
        below the last weight and need ~6) the weights are tried at k = 0, 1, 2, 3, 5, 9, 17, 33 and
        the last gap is bisected: the same step from fewer factorizations (~12 for the first step).
        A weight whose system cannot be factorized ends the search as the scan in turn would."""
        tried: dict[int, _WeighedStep | None] = {}

        def at(k: int) -> "_WeighedStep | None":
            if k not in tried:
                tried[k] = self._weighed_step(sys_, own, dR, ask, lam * 2.0**k)
            return tried[k]

        def met(k: int) -> bool:
            step = at(k)
            return step is not None and sys_.ard(step.new) <= 0.9 * sys_.ard_goal

        last, lo, hi, stride = _ARD_WEIGHT_DOUBLINGS - 1, -1, 0, 1  # lo: the largest k known to miss
        while not met(hi):
            if at(hi) is None:  # not factorizable: scan in turn from the last known miss
                return self._weigh_ard_in_turn(at, met, lo + 1, best)
            if hi == last:
                return at(hi), False  # type: ignore[return-value]
            lo, hi = hi, min(hi + stride, last)
            stride *= 2 if hi >= 3 else 1  # later steps mostly need k <= 5: one at a time up to 3
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid) is None:
                return self._weigh_ard_in_turn(at, met, lo + 1, best)
            lo, hi = (lo, mid) if met(mid) else (mid, hi)
        return at(hi), True  # type: ignore[return-value]

    @staticmethod
    def _weigh_ard_in_turn(at: Callable[[int], "_WeighedStep | None"], met: Callable[[int], bool], k0: int,
                           best: "_WeighedStep | None") -> tuple["_WeighedStep", bool]:
        """:meth:`_weigh_ard`'s search one k at a time from ``k0`` (all below missed): the first that
        meets, or at the first weight that cannot be factorized the step before it."""
        for k in range(k0, _ARD_WEIGHT_DOUBLINGS):
            step = at(k)
            if step is None:
                if best is None and k == 0:
                    raise NumericalEditError("the anchors' system is not positive definite (non-finite codes or anchors); the edit was rolled back")
                return (at(k - 1) if k > 0 else best), False  # type: ignore[return-value]
            if met(k):
                return step, True
        return at(_ARD_WEIGHT_DOUBLINGS - 1), False  # type: ignore[return-value]

    def _weighed_step(self, sys_: "_MinimalSystem", own: "_Constraints", dR: torch.Tensor, ask: torch.Tensor,
                      lam: float) -> "_WeighedStep | None":
        """The step with ARD weight ``lam`` (``None`` if its system cannot be factorized)."""
        L, info = torch.linalg.cholesky_ex(sys_.H + lam * sys_.AtA)
        if info.item() != 0:
            return None

        def P(At: torch.Tensor, L: torch.Tensor = L) -> torch.Tensor:
            return torch.cholesky_solve(At, L)

        want = own.change(dR) + ask
        u = -P(sys_.b + lam * sys_.Ate)
        return _WeighedStep(P, ask, u + self._solve_constraints(own, P, want - own.change(u)), lam)

    def _edit_one(self, request: EditRequest, seq: EditSequence) -> EditResult:
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed + len(self.results))
        if self._keeps_targets and self.cfg.refresh_every and self.results and len(self.results) % self.cfg.refresh_every == 0:
            # due after every refresh_every edits; done when the next edit needs it (none after a stream's last edit)
            self.refresh_sensitivities()
        prob = self._problem(seq)
        R = prob.R0.clone().requires_grad_(True)
        with torch.no_grad():
            ard_before = self._objective(prob, R)[1].item()
        index = len(self.results)
        with self.detached():
            # W_dec is written only after both stages finished with finite values, so an exception
            # in them leaves the decoder (and every earlier edit) exactly as it was
            if self.cfg.row_update == "minimal":
                s1 = StageStats(0, float("nan"), float("nan"), 0.0)
                R, s2 = self._minimal_rows(prob)
            else:
                s1 = self._run_stage(prob, R, self.cfg.stage1_max_steps, with_edit=False) if self.cfg.stage1_max_steps else StageStats(0, float("nan"), float("nan"), 0.0)
                s2 = self._run_stage(prob, R, self.cfg.stage2_max_steps, with_edit=True)
            if self.cfg.row_update == "projected":
                R = self._project(prob, R.detach())
            with torch.no_grad():
                z_hat, rec, _ = self._objective(prob, R)
                nll, margin = self._target_stats(prob, z_hat)
        if not torch.isfinite(R).all():
            raise NumericalEditError("decoder rows became non-finite; the edit was rolled back")
        if not (torch.isfinite(nll) and torch.isfinite(margin)):
            raise NumericalEditError("the edited target's log-prob is not finite; the edit was rolled back")
        ard_after = rec.item()
        reverted = self.cfg.revert_unrouted and ard_after > self.switch.tau
        if self.cfg.keep_history:  # a reverted edit's snapshot has no rows: undo/rollback count it as an edit
            self.history.record(self.sae.W_dec, prob.rows[:0] if reverted else prob.rows)
        if reverted:
            logger.info("edit %d not applied (revert_unrouted): its update left ARD %.4g above tau %.4g (target margin %.3g)",
                        index, ard_after, self.switch.tau, margin.item())
        else:
            self._apply(prob, R.detach(), z_hat.detach(), index)
        success = not reverted and margin.item() > 0 and ard_after <= self.switch.tau
        return EditResult(
            index=index, request=request, success=bool(success), stage1=s1, stage2=s2,
            n_latents=int(prob.rows.numel()), ard_before=ard_before, ard_after=ard_after,
            target_logprob=-nll.item(), seconds=time.perf_counter() - t0, tau=self.tau, reverted=reverted,
        )

    def _apply(self, prob: _EditProblem, R: Float[torch.Tensor, "m d"], z_hat: Float[torch.Tensor, "seq d"], index: int) -> None:
        """Write edit ``index``'s rows ``R``, re-track tau, and store what later edits keep of it
        (memory anchors and errors; with ``keep_targets`` its target sensitivities)."""
        with torch.no_grad():
            self.sae.W_dec[prob.rows] = R.to(self.sae.W_dec.dtype)
        self._touched[prob.rows] = True
        self._retrack_tau(self.tau)
        v = prob.valid
        self.memory.add(index, prob.idx[v], prob.vals[v], z_hat[v], weight=1.0 / int(v.sum()), error=z_hat[v] - prob.z[0, v])
        if self._keeps_targets:
            floor = self.cfg.keep_floor is not None
            self.sensitivity.add(index, prob.idx[v], prob.vals[v], self._target_gradients(prob, z_hat, log_odds=floor)[:, v],
                                 self.cfg.keep_positions, level=self._token_log_odds(prob, z_hat) if floor else None)
            sens = prob.sensitivities
            if floor and sens is not None and sens.n_constraints:
                self.sensitivity.add_drift(sens.token, sens.change(R.double() - prob.R0.double()))

    def refresh_sensitivities(self) -> None:
        """Re-measure, at the current decoder, what ``keep_targets`` stores for every edit made so far:
        the gradients of its target tokens (and with ``keep_floor`` their log-odds, with no drift).
        Done every ``refresh_every`` edits; after a rollback past such a refresh the remaining
        edits keep what it measured (with the later edits in place) until the next one."""
        if self._keeps_targets:
            self._rebuild_sensitivities({i: r.request for i, r in enumerate(self.results) if not r.reverted})

    def _rebuild_sensitivities(self, requests: Mapping[int, EditRequest]) -> None:
        """A new sensitivity bank for the edits ``requests`` (edit number -> request), at the current decoder."""
        floor = self.cfg.keep_floor is not None
        numbers = list(requests)
        seqs = [tokenize_request(self.model, requests[i]) for i in numbers]
        codes = [self.memory.codes(i) for i in numbers]
        measured: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.zeros(0), torch.zeros(0))] * len(seqs)
        # batches of sequences with the same number of target tokens (the batched backward pass has
        # one row per target-token number), at most REFRESH_BATCH_ATOMS (sequences x length x tokens)
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].target_ids), len(seqs[i].tokens)))
        start = 0
        while start < len(order):
            n_t, end = len(seqs[order[start]].target_ids), start + 1
            while (end < len(order) and len(seqs[order[end]].target_ids) == n_t
                   and (end + 1 - start) * len(seqs[order[end]].tokens) * n_t <= REFRESH_BATCH_ATOMS):
                end += 1
            batch = order[start:end]
            for i, m in zip(batch, self._measure_targets([seqs[i] for i in batch], [codes[i] for i in batch], log_odds=floor)):
                measured[i] = m
            start = end
        bank = SensitivityBank(self.sae.cfg.d_in, self.sae.cfg.k)
        for i, (idx, vals), (grad, level) in zip(numbers, codes, measured):
            bank.add(i, idx, vals, grad, self.cfg.keep_positions, level=level if floor else None)
        self.sensitivity = bank

    def _measure_targets(self, seqs: Sequence[EditSequence], codes: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         log_odds: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per edit sequence, what ``keep_targets`` measures when an edit is made, under the current
        decoder: (the gradient of each target token's log-prob (``log_odds``: log-odds) w.r.t. the
        reconstruction at its valid positions [n_target, n, d], the tokens' log-odds [n_target]).
        ``codes``: each sequence's codes (idx, vals [n, k]) at its valid positions
        (fixed: the model up to the hook and the encoder are frozen; the memory anchors store them),
        so only the positions before them (``skip_first``) need a pass to the hook. The sequences are
        one right-padded batch: one forward pass after the hook and one backward pass per target-token
        number, batched (token j of every sequence at once; the unembedding's part is taken per token
        first, so the batched pass runs through the blocks only)."""
        toks, mask = pad_ids(self.model, [s.tokens for s in seqs])
        valid = valid_positions(*toks.shape, self.cfg.skip_first, toks.device, ~mask)
        idx = torch.zeros(*toks.shape, self.sae.cfg.k, dtype=torch.long)
        vals = torch.zeros(*toks.shape, self.sae.cfg.k)
        for b, (i, v) in enumerate(codes):
            if len(i) != int(valid[b].sum()):
                raise ValueError(f"stored codes of {len(i)} positions for an edit sequence with {int(valid[b].sum())} valid positions")
            idx[b][valid[b]], vals[b][valid[b]] = i, v
        x = sparse_decode(vals, idx, self.sae.W_dec.detach(), self.sae.b_dec.detach())
        if self.cfg.skip_first:
            with self.detached():
                x[:, : self.cfg.skip_first] = self.site.clean_activation(toks[:, : self.cfg.skip_first]).to(x.dtype)
        n_t = len(seqs[0].target_ids)
        if any(len(s.target_ids) != n_t for s in seqs):
            raise ValueError("_measure_targets takes sequences with the same number of target tokens")
        tgt = torch.stack([s.target_ids for s in seqs])
        x.requires_grad_(True)
        grad, logits = self._token_gradients(x, x, toks, torch.stack([s.target_positions for s in seqs]), tgt, log_odds)
        level = _log_odds(logits, tgt.flatten()).view(len(seqs), n_t)
        return [(grad[:, b][:, valid[b]].float(), level[b]) for b in range(len(seqs))]

    def rollback(self, n_edits: int) -> None:
        if not 0 <= n_edits <= self.n_edits:
            raise ValueError(f"cannot roll back to {n_edits} edits: {self.n_edits} applied")
        if n_edits == 0:
            with torch.no_grad():
                self.sae.W_dec.copy_(self._W_dec0)
            self.history.snapshots.clear()
        elif not self.cfg.keep_history:
            raise ValueError("this editor keeps no per-edit history (keep_history=False): only rollback(0) is possible")
        else:
            self.history.rollback(self.sae.W_dec, n_edits)
        # exactly the rows the kept edits touched (none after rollback(0)): tau tracking sums over
        # them, so a row restored to its base value but still marked would move tau in its last bits
        self._touched.zero_()
        for snap in self.history.snapshots:
            self._touched[snap.rows] = True
        self.memory.drop_groups_from(n_edits)
        # the decoder is the one after edit n_edits again, so is tau (within the band, the value it had)
        self._retrack_tau(self.results[n_edits - 1].tau if n_edits else None)
        self.sensitivity.drop_groups_from(n_edits)
        del self.results[n_edits:]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``editor.json`` (config, hook, tau, edit log), ``state.safetensors`` (edited rows,
        per-edit row snapshots, anchors) and ``sae/`` (the edited SAE, SAELens format)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        rows = self._touched.nonzero().squeeze(1)
        if rows.numel():
            tensors["edited.rows"] = rows
            tensors["edited.values"] = self.sae.W_dec[rows].detach().clone()
            tensors["base.values"] = self._W_dec0[rows].clone()
        tensors.update(self.history.tensors())
        tensors.update(self.memory.tensors("memory"))
        tensors.update(self.reference.tensors("reference"))
        tensors.update(self.sensitivity.tensors("sensitivity"))
        if self.latent_rate is not None:
            tensors["latent_rate"] = self.latent_rate
        if self._reference_error is not None:
            tensors.update(self._reference_error.tensors())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "state.safetensors"))
        self.sae.save_model(str(path / "sae"))
        meta = {
            "method": self.name,
            "format": 1,
            # bf16_steps as resolved: a loaded editor makes later edits in the same precision (so a
            # resumed run ends with the same numbers on another machine)
            "config": {**self.cfg.to_dict(), "bf16_steps": self.bf16_steps},
            "hook_name": self.hook_name,
            "tau": self.tau,
            "base_fingerprint": self.base_fingerprint,
            "n_edits": self.n_edits,
            "n_history": len(self.history),
            "results": [r.to_dict() for r in self.results],
        }
        (path / "editor.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, model: Any, sae: Any = None, attach: bool = True) -> "MicroEditor":
        """Rebuild a saved editor on ``model``. With ``sae`` given (the unedited SAE the edits were
        made on) the saved rows are applied to a copy of it; otherwise the saved edited SAE is used."""
        from sae_lens import SAE

        path = Path(path)
        meta = json.loads((path / "editor.json").read_text())
        if meta.get("method") != cls.name:
            raise ValueError(f"{path} holds a '{meta.get('method')}' editor, not '{cls.name}'")
        tensors = load_file(str(path / "state.safetensors"))
        cfg = MicroEditConfig.from_dict(meta["config"])
        base = sae if sae is not None else SAE.load_from_disk(str(path / "sae"))
        if sae is not None and _fingerprint(sae) != meta["base_fingerprint"]:
            raise ValueError("the SAE passed to load() is not the one these edits were made on (encoder differs)")
        editor = cls(model, base, cfg, hook_name=meta["hook_name"], attach=False)
        editor.base_fingerprint = meta["base_fingerprint"]
        if "edited.rows" in tensors:
            rows = tensors["edited.rows"]
            with torch.no_grad():
                editor.sae.W_dec[rows] = tensors["edited.values"].to(editor.sae.W_dec.dtype)
            editor._W_dec0[rows] = tensors["base.values"].to(editor._W_dec0.dtype)
            editor._touched[rows] = True
        editor.history = RowHistory.from_tensors(tensors, meta["n_history"])
        d, k = editor.sae.cfg.d_in, editor.sae.cfg.k
        editor.memory = MemoryBank.from_tensors(tensors, "memory", d, k)
        editor.reference = AnchorBank.from_tensors(tensors, "reference", d, k)
        editor.sensitivity = SensitivityBank.from_tensors(tensors, "sensitivity", d, k)
        editor.results = [EditResult.from_dict(r) for r in meta["results"]]
        editor.latent_rate = tensors.get("latent_rate")
        editor._reference_error = _ReferenceError.from_tensors(tensors)
        if meta["tau"] is not None:
            editor.tau = meta["tau"]
        if attach:
            editor.attach()
        return editor


_ARD_WEIGHT_DOUBLINGS = 40
"""How many doublings of the ARD weight :meth:`MicroEditor._weigh_ard` tries at most."""


class _WeighedStep(NamedTuple):
    """One solve of :meth:`MicroEditor._weigh_ard`: the solver ``P`` of the weighted system, the
    rise asked of each target token (after any halving), the total row change and the ARD weight used."""

    P: Callable[[torch.Tensor], torch.Tensor]
    ask: torch.Tensor
    new: torch.Tensor
    lam: float


def _log_odds(logits: Float[torch.Tensor, "n vocab"], target: Int[torch.Tensor, " n"]) -> Float[torch.Tensor, " n"]:
    """``log p_t - log(1 - p_t)`` per row: the target logit minus the log-sum-exp of all others
    (unlike the log-prob, its gradient does not vanish as the target becomes certain)."""
    t = target[:, None]
    return logits.gather(-1, t).squeeze(-1) - logits.scatter(-1, t, float("-inf")).logsumexp(-1)


def _solve_psd(K: Float[torch.Tensor, "J J"], rhs: Float[torch.Tensor, " J"]) -> Float[torch.Tensor, " J"]:
    """``K^+ rhs`` for a symmetric positive semi-definite ``K`` (float64), eigenvalues below 1e-10 of
    the largest cut off. By Cholesky where every pivot is above ``PSD_PIVOT_CUT`` of the largest
    diagonal entry (a pivot bounds the least eigenvalue from above, so a small one flags a
    near-dependent constraint), which is then the same solve ~10x faster than the eigendecomposition
    on the held steps' ~1000 constraints; else (constraints that repeat one another) by the
    eigendecomposition's pseudo-inverse."""
    if K.shape[0] == 0:
        return rhs.clone()
    L, info = torch.linalg.cholesky_ex(K)
    if info.item() == 0 and bool(L.diagonal().square().min() > PSD_PIVOT_CUT * K.diagonal().max()):
        return torch.cholesky_solve(rhs[:, None], L).squeeze(1)
    evals, evecs = torch.linalg.eigh(K)
    keep = evals > 1e-10 * evals.abs().max()
    return evecs[:, keep] @ ((evecs[:, keep].T @ rhs) / evals[keep])


def _rows_after(prob: _EditProblem, dR: Float[torch.Tensor, "m d"]) -> Float[torch.Tensor, "m d"]:
    """The trained rows after a (float64) change ``dR``, in the decoder's dtype."""
    return (prob.R0.to(torch.float64) + dR).to(prob.R0.dtype)


@dataclass
class _Constraints:
    """Linear constraints on a row change ``dR``: constraint ``j`` is ``<C_j, dR>`` with
    ``C_j = sum_{e: seg_e = j} a_{atom_e} g_e^T``; atoms (codes on the trained rows) are stored once
    each, so constraints that read the same positions (every target token of the edit reads the
    same edit sequence) share them."""

    At: Float[torch.Tensor, "m U"]
    atom: Int[torch.Tensor, " n"]
    G: Float[torch.Tensor, "n d"]
    seg: Int[torch.Tensor, " n"]
    n_constraints: int
    _gram: Float[torch.Tensor, "n n"] | None = field(default=None, repr=False, compare=False)
    _parts: "tuple[_Constraints, _Constraints] | None" = field(default=None, repr=False, compare=False)
    """Of a :meth:`concat`: the two sets, whose own grams are blocks of this one's."""

    @property
    def gram(self) -> Float[torch.Tensor, "n n"]:
        """``g_e . g_f`` (a float32 product, kept in float32: the solve multiplies it into its float64
        pairs), made when a solve first needs it; for a :meth:`concat`, from its parts' grams (the
        held tokens' block comes from their selection's cache) and the cross products."""
        if self._gram is None:
            if self._parts is not None:
                a, b = self._parts
                cross = a.G.float() @ b.G.float().T
                self._gram = torch.cat([torch.cat([a.gram, cross], 1), torch.cat([cross.T, b.gram], 1)])
            else:
                G = self.G.float()
                self._gram = G @ G.T
        return self._gram

    @classmethod
    def held(cls, sens: SelectedSensitivities, chosen: Int[torch.Tensor, " j"]) -> "_Constraints":
        """Stored sensitivities of the ``chosen`` earlier target tokens (numbered in that order; one
        atom per stored position; entries in that order too, so that a set grown by appending tokens
        starts with the previous set's entries and reuses their gram)."""
        pos, constraint = entries_of(sens.constraint, sens.n_constraints, chosen)
        order = torch.argsort(constraint, stable=True)
        pos, constraint = pos[order], constraint[order]
        At = sens.A.index_select(0, pos).to_dense().T.to(torch.float64).contiguous()
        return cls(At, torch.arange(At.shape[1]), sens.grad[pos].to(torch.float64), constraint, len(chosen), sens.gram(pos))

    @classmethod
    def own(cls, Ae: Float[torch.Tensor, "S m"], g: Float[torch.Tensor, "n_t S d"], positions: int | None = None) -> "_Constraints":
        """The edit's own target tokens: token t reads every position of the edit sequence (with
        ``positions``: only that many, those where its gradient is largest)."""
        n_t, S = g.shape[:2]
        token, atom, G = largest_gradient_positions(g, S if positions is None else positions)
        return cls(Ae.T.contiguous(), atom, G.to(torch.float64), token, n_t)

    @classmethod
    def scope(cls, scope: SelectedScope, chosen: Int[torch.Tensor, " j"], at: Float[torch.Tensor, "m d"], scale: float = 1.0,
              positions: int | None = None, rank: int | None = None) -> "_Constraints":
        """``scale`` x the ARD of the ``chosen`` earlier edits (numbered in that order), linearised at
        the row change ``at`` (one atom per stored position of theirs that uses the rows; with
        ``positions``, per edit only that many, those with the largest gradient x code norm; with
        ``rank``, then per edit the ``rank`` leading singular terms of its gradient w.r.t. the rows,
        :func:`_leading_terms`)."""
        pos, con = entries_of(scope.constraint, scope.n_constraints, chosen)
        G = scope.gradient(at.to(torch.float64), pos)
        A = scope.A.index_select(0, pos).coalesce()
        if positions is not None and len(pos):
            code = torch.zeros(len(pos), dtype=torch.float64).index_add_(0, A.indices()[0], A.values().double() ** 2).sqrt()
            order = torch.argsort(G.norm(dim=1) * code, descending=True, stable=True)
            order = order[torch.argsort(con[order], stable=True)]  # by constraint, largest first within each
            place = torch.arange(len(order)) - torch.searchsorted(con[order], con[order])
            keep = order[place < positions].sort().values
            A, G, con = A.index_select(0, keep).coalesce(), G[keep], con[keep]
        At = A.to_dense().T.to(torch.float64).contiguous()
        if rank is not None:
            At, G, con = _leading_terms(At, G, con, len(chosen), rank)
        return cls(At, torch.arange(At.shape[1]), scale * G, con, len(chosen))

    def concat(self, other: "_Constraints") -> "_Constraints":
        """These constraints followed by ``other``'s (numbered after them)."""
        U = self.At.shape[1]
        return _Constraints(torch.cat([self.At, other.At], 1), torch.cat([self.atom, other.atom + U]), torch.cat([self.G, other.G]),
                            torch.cat([self.seg, other.seg + self.n_constraints]), self.n_constraints + other.n_constraints,
                            _parts=(self, other))

    def change(self, dR: Float[torch.Tensor, "m d"]) -> Float[torch.Tensor, " j"]:
        """First-order value of every constraint at ``dR``."""
        per = torch.linalg.vecdot((self.At.T @ dR)[self.atom], self.G)
        return torch.zeros(self.n_constraints, dtype=dR.dtype).index_add_(0, self.seg, per)


_SCOPE_RANK_OVERSAMPLE = 8
_SCOPE_RANK_ITERATIONS = 3
""":func:`_leading_terms`' subspace iteration: extra columns and power iterations (on a 150-position,
700-row, 576-wide gradient with one dominant direction: the captured share of the squared norm
within 1e-4 of the optimal rank-4 one)."""


def _leading_terms(At: Float[torch.Tensor, "m n"], G: Float[torch.Tensor, "n d"], seg: Int[torch.Tensor, " n"], n_constraints: int,
                   rank: int) -> tuple[Float[torch.Tensor, "m u"], Float[torch.Tensor, "u d"], Int[torch.Tensor, " u"]]:
    """Per constraint ``j`` (the entries with ``seg == j``, whose sum ``C_j = sum_e a_e g_e^T`` is its
    gradient w.r.t. the rows), at most ``rank`` rank-one terms ``(s_i u_i) v_i^T``: the leading
    singular terms of ``C_j`` (a constraint with ``rank`` entries or fewer keeps them, exactly).
    A long sequence's ARD gradient spreads over ~150 positions but is dominated by a few directions
    (hallucination prompts after 170 edits: 87% of the squared norm in 4 terms, against a cosine of
    0.43 between ``C_j`` and its 4 largest positions' part; docs/RESULTS.md, "Session 27").
    Subspace iteration from a fixed start (deterministic, the global RNG untouched), float64."""
    out_a, out_g, out_s = [], [], []
    gen = torch.Generator().manual_seed(0)
    order = torch.argsort(seg, stable=True)
    bounds = torch.searchsorted(seg[order], torch.arange(n_constraints + 1)).tolist()
    for j in range(n_constraints):
        e = order[bounds[j]:bounds[j + 1]]
        if len(e) <= rank:
            out_a.append(At[:, e]), out_g.append(G[e]), out_s.append(torch.full((len(e),), j))
            continue
        rows = (At[:, e] != 0).any(1).nonzero().squeeze(1)
        Ae, Ge = At[rows][:, e], G[e]  # C_j = Ae @ Ge on its rows, never formed ([rows, d]: rows x positions x d to make)
        q = min(rank + _SCOPE_RANK_OVERSAMPLE, len(rows), Ge.shape[1], len(e))
        Q = torch.linalg.qr(Ae @ (Ge @ torch.randn(Ge.shape[1], q, generator=gen, dtype=Ge.dtype))).Q
        for _ in range(_SCOPE_RANK_ITERATIONS):
            Q = torch.linalg.qr(Ae @ (Ge @ torch.linalg.qr(Ge.T @ (Ae.T @ Q)).Q)).Q
        Ub, S, Vh = torch.linalg.svd((Q.T @ Ae) @ Ge, full_matrices=False)
        r = min(rank, len(S))
        a = torch.zeros(At.shape[0], r, dtype=At.dtype)
        a[rows] = (Q @ Ub[:, :r]) * S[:r]
        out_a.append(a), out_g.append(Vh[:r].to(G.dtype)), out_s.append(torch.full((r,), j))
    if not out_a:
        return At[:, :0], G[:0], seg[:0]
    return torch.cat(out_a, 1).contiguous(), torch.cat(out_g), torch.cat(out_s)


@dataclass
class _MinimalSystem:
    """The fixed quantities of one ``row_update="minimal"`` edit (float64)."""

    Ae: Float[torch.Tensor, "S m"]
    e0: Float[torch.Tensor, "S d"]
    H: Float[torch.Tensor, "m m"]
    b: Float[torch.Tensor, "m d"]
    AtA: Float[torch.Tensor, "m m"]
    Ate: Float[torch.Tensor, "m d"]
    cols: Int[torch.Tensor, " S"]
    norm: float
    ard_goal: float
    lam: float
    """Weight of the ARD penalty (kept from step to step; raised as needed)."""
    hold_ridge: float = 0.0
    """``damp_holds``: the ridge the last held step needed (later held steps of the edit start there)."""

    @classmethod
    def build(cls, editor: "MicroEditor", prob: _EditProblem) -> "_MinimalSystem":
        v = prob.valid
        Ae = prob.A[v].to(torch.float64)
        e0 = (prob.z_fixed[v] + prob.A[v] @ prob.R0 - prob.z[0, v]).to(torch.float64)
        H, b = editor._anchor_system(prob)
        AtA = Ae.T @ Ae
        lam0 = 1e-5 * float(H.diagonal().sum() / AtA.diagonal().sum().clamp_min(1e-30))
        return cls(Ae, e0, H, b, AtA, Ae.T @ e0, v.nonzero().squeeze(1), editor.cfg.alpha * int(v.sum()),
                   editor.cfg.ard_margin * editor.switch.tau, lam0)

    def ard(self, dR: Float[torch.Tensor, "m d"]) -> float:
        return float(((self.e0 + self.Ae @ dR) ** 2).sum()) / self.norm


@dataclass
class _ReferenceError:
    """Reconstruction error of every reference position at calibration, and which text it is in."""

    error: Float[torch.Tensor, "n d"]
    owner: torch.Tensor  # [n] text index
    n_texts: int
    quantile: float

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"reference_error.error": self.error, "reference_error.owner": self.owner,
                "reference_error.meta": torch.tensor([float(self.n_texts), self.quantile], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "_ReferenceError | None":
        if "reference_error.error" not in tensors:
            return None
        n_texts, q = tensors["reference_error.meta"].tolist()
        return cls(tensors["reference_error.error"], tensors["reference_error.owner"], int(n_texts), q)


def _fingerprint(sae: Any) -> str:
    """Identity of an SAE's frozen part (encoder), independent of decoder edits and norm folding."""
    h = hashlib.sha256()
    h.update(str(tuple(sae.W_enc.shape)).encode())
    h.update(sae.W_enc.detach().float().cpu().numpy().tobytes())
    h.update(sae.b_enc.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _get_deep(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _set_deep(obj: Any, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    setattr(obj, parts[-1], value)


register_method(MicroEditor.name, MicroEditor, MicroEditConfig)
