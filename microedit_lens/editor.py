"""Building blocks of decoder editing that any SAE-decoder method can share.

* :class:`EditSequence`: a request tokenized and validated against the model's context.
* :class:`HookSite`: where the SAE sits; computes the clean activation there and runs the rest of
  the model from a replaced activation (fast path: ``start_at_layer`` for residual hooks).
* :class:`RowHistory`: per-edit sparse decoder-row snapshots; exact (bitwise) undo and rollback.
* :class:`AnchorBank`: reconstructions to preserve (earlier edits' tokens, reference text), stored as
  the SAE's sparse codes so the change a row update causes is a cheap sparse matmul.
* :class:`MemoryBank`: the earlier edits' anchors plus each position's reconstruction error when it
  was stored, so that every earlier edit's ARD under any row change is exact (:class:`SelectedScope`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int

from microedit_lens.switch import sparse_decode
from microedit_lens.types import EditRequest


@dataclass
class EditSequence:
    """A request as token ids: ``tokens = prompt_ids + target_ids``."""

    tokens: Int[torch.Tensor, " seq"]
    n_prompt: int

    @property
    def target_ids(self) -> Int[torch.Tensor, " n_target"]:
        return self.tokens[self.n_prompt :]

    @property
    def target_positions(self) -> Int[torch.Tensor, " n_target"]:
        """Positions whose logits predict the target tokens."""
        return torch.arange(self.n_prompt - 1, len(self.tokens) - 1)


def tokenize_request(model: Any, request: EditRequest) -> EditSequence:
    """Tokenize prompt and target (no BOS is added) and check the length against ``n_ctx``."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; pass token ids through a tokenizer-equipped model")
    p = model.tokenizer(request.prompt, add_special_tokens=False).input_ids
    t = model.tokenizer(request.target_text, add_special_tokens=False).input_ids
    if len(p) == 0:
        raise ValueError(f"prompt {request.prompt!r} tokenizes to nothing")
    if len(t) == 0:
        raise ValueError(f"target {request.target!r} tokenizes to nothing")
    n = len(p) + len(t)
    if n > model.cfg.n_ctx:
        raise ValueError(f"prompt+target is {n} tokens, longer than the model's context ({model.cfg.n_ctx}): {request.prompt[:60]!r}")
    return EditSequence(torch.tensor(p + t, dtype=torch.long), len(p))


class HookSite:
    """The SAE's hook point on a model."""

    def __init__(self, model: Any, hook_name: str):
        self.model = model
        self.hook_name = hook_name
        self._fast: Any = None
        parts = hook_name.split(".")
        self.layer = int(parts[1]) if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() else None
        self.start_layer: int | None = None
        if self.layer is not None and parts[2] == "hook_resid_post":
            self.start_layer = self.layer + 1
        elif self.layer is not None and parts[2] == "hook_resid_pre":
            self.start_layer = self.layer

    @torch.no_grad()
    def clean_activation(self, tokens: Int[torch.Tensor, "batch seq"]) -> Float[torch.Tensor, "batch seq d"]:
        """Activation at the hook for the plain model (call with nothing attached at the hook)."""
        _, cache = self.model.run_with_cache(
            tokens,
            names_filter=[self.hook_name],
            stop_at_layer=None if self.layer is None else self.layer + 1,
        )
        return cache[self.hook_name]

    def fast_model(self) -> Any:
        """A bf16 copy of the model for optimisation steps (built once; only for residual hooks).
        Built from the config and state dict, not ``deepcopy`` (SAELens binds MLP hooks to the
        original modules)."""
        if self._fast is None:
            from microedit_lens.models import _build_hooked, replace_config

            sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
            self._fast = _build_hooked(replace_config(self.model.cfg, dtype=torch.bfloat16), None, sd)
        return self._fast

    def logits_from(
        self,
        resid: Float[torch.Tensor, "batch seq d"],
        tokens: Int[torch.Tensor, "batch seq"],
        fast: bool = False,
        positions: Int[torch.Tensor, " n"] | Int[torch.Tensor, "batch n"] | None = None,
    ) -> Float[torch.Tensor, "batch n vocab"]:
        """Logits when the activation at the hook is ``resid`` (differentiable in ``resid``).

        ``fast``: run the layers after the hook in the bf16 copy (residual hooks only).
        ``positions``: only the logits at these positions (the unembedding of the other positions,
        most of a short sequence's step, is skipped on the residual fast path)."""
        if self.start_layer is not None:
            m, x = self._after_hook(fast, resid)
            if positions is None:
                return m(x, start_at_layer=self.start_layer).float()
            from microedit_lens.models import final_logits

            return final_logits(m, m(x, start_at_layer=self.start_layer, stop_at_layer=m.cfg.n_layers)[:, positions]).float()
        logits = self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, self._replacing(resid))])
        return logits if positions is None else logits[:, positions]

    def final_resid(
        self, resid: Float[torch.Tensor, "batch seq d"], tokens: Int[torch.Tensor, "batch seq"], positions: Int[torch.Tensor, "batch n"],
        fast: bool = False,
    ) -> Float[torch.Tensor, "batch n d_model"]:
        """The residual stream after the last block (before the final norm) at ``positions`` of each
        row, when the activation at the hook is ``resid`` (differentiable in ``resid``);
        :meth:`unembed` turns it into logits. ``fast``: in the bf16 copy (residual hooks only)."""
        rows = torch.arange(resid.shape[0], device=resid.device)[:, None]
        n = self.model.cfg.n_layers
        if self.start_layer is not None:
            m, x = self._after_hook(fast, resid)
            return m(x, start_at_layer=self.start_layer, stop_at_layer=n)[rows, positions]
        return self.model.run_with_hooks(tokens, fwd_hooks=[(self.hook_name, self._replacing(resid))], stop_at_layer=n)[rows, positions]

    def unembed(self, final: Float[torch.Tensor, "... d_model"], fast: bool = False) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits (float32) from :meth:`final_resid`'s output, by the same model (``fast``: the bf16 copy)."""
        from microedit_lens.models import final_logits

        m, x = self._after_hook(fast, final)
        return final_logits(m, x).float()

    def _after_hook(self, fast: bool, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The model that runs the layers after the hook (``fast`` on a residual hook: the bf16 copy),
        and ``x`` in its dtype (as given for the model itself)."""
        if fast and self.start_layer is not None:
            return self.fast_model(), x.to(torch.bfloat16)
        return self.model, x

    @staticmethod
    def _replacing(resid: torch.Tensor) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        def replace(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return resid.to(act.dtype)

        return replace


@dataclass
class RowSnapshot:
    """The decoder rows one edit changed, as they were before it."""

    rows: Int[torch.Tensor, " m"]
    before: Float[torch.Tensor, "m d"]


class RowHistory:
    """Per-edit snapshots of the decoder rows each edit overwrote (sparse: only the masked rows)."""

    def __init__(self) -> None:
        self.snapshots: list[RowSnapshot] = []

    def __len__(self) -> int:
        return len(self.snapshots)

    def record(self, W_dec: torch.Tensor, rows: torch.Tensor) -> None:
        self.snapshots.append(RowSnapshot(rows.clone(), W_dec[rows].detach().clone()))

    @torch.no_grad()
    def rollback(self, W_dec: torch.Tensor, n_keep: int) -> None:
        """Restore ``W_dec`` (in place) to its state after the first ``n_keep`` edits, bitwise."""
        while len(self.snapshots) > n_keep:
            snap = self.snapshots.pop()
            W_dec[snap.rows] = snap.before

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, s in enumerate(self.snapshots):
            out[f"history.{i}.rows"] = s.rows
            out[f"history.{i}.before"] = s.before
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n: int) -> "RowHistory":
        h = cls()
        for i in range(n):
            h.snapshots.append(RowSnapshot(tensors[f"history.{i}.rows"], tensors[f"history.{i}.before"]))
        return h


@dataclass
class SelectedAnchors:
    """Anchored positions that depend on the rows being trained.

    The reconstruction change at those positions is ``A @ (R - R0)`` for trained rows ``R``; the loss
    is ``sum_p weight_p ||residual_p + A_p (R - R0)||^2``.
    """

    A: torch.Tensor  # sparse [n_sel, m]
    residual: Float[torch.Tensor, "n_sel d"]
    weight: Float[torch.Tensor, " n_sel"]
    index: Int[torch.Tensor, " n_sel"]
    """Their positions in the bank."""

    def loss(self, delta_rows: Float[torch.Tensor, "m d"]) -> torch.Tensor:
        if self.residual.shape[0] == 0:
            return delta_rows.sum() * 0.0
        change = torch.sparse.mm(self.A, delta_rows)
        return (((self.residual + change) ** 2).sum(-1) * self.weight).sum()


class CodeBank:
    """Stored positions, each with its SAE code (top-k values and indices) plus per-position fields,
    in groups (one group per edit or reference set). Subclasses name the extra fields."""

    fields: tuple[str, ...] = ()

    def __init__(self, d: int, k: int) -> None:
        self.d, self.k = d, k
        self._data: dict[str, list[torch.Tensor]] = {n: [] for n in ("idx", "vals", *self.fields)}
        self._group: list[int] = []
        self._joined: dict[str, torch.Tensor] = {}
        """Concatenations of ``_data`` fields, kept until the bank changes (every edit selects from
        the whole bank, the reference bank never changes after calibration)."""

    def __len__(self) -> int:
        return len(self._group)

    def _add(self, group: int, idx: torch.Tensor, vals: torch.Tensor, **extra: torch.Tensor) -> None:
        self._data["idx"].append(idx.to(torch.int32))
        self._data["vals"].append(vals.float())
        for n in self.fields:
            self._data[n].append(extra[n])
        self._group.append(group)
        self._joined.clear()

    def drop_groups_from(self, group: int) -> None:
        """Remove every group numbered ``>= group`` (used by rollback)."""
        keep = [i for i, g in enumerate(self._group) if g < group]
        self._data = {n: [lst[i] for i in keep] for n, lst in self._data.items()}
        self._group = [self._group[i] for i in keep]
        self._joined.clear()

    def _cat(self, name: str) -> torch.Tensor:
        if name not in self._joined:
            self._joined[name] = torch.cat(self._data[name])
        return self._joined[name]

    def _group_of_positions(self) -> Int[torch.Tensor, " n"]:
        """For every stored position, the index of its group in the bank."""
        if "_group" not in self._joined:
            sizes = torch.tensor([t.shape[0] for t in self._data["idx"]])
            self._joined["_group"] = torch.arange(len(sizes)).repeat_interleave(sizes)
        return self._joined["_group"]

    def _hits(self, rows: Int[torch.Tensor, " m"]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions whose code uses any of ``rows`` (sorted): (their indices in the bank, idx, vals,
        A = their codes restricted to ``rows`` as a sparse [n_sel, m] matrix)."""
        idx, vals = self._cat("idx"), self._cat("vals")
        hit = torch.isin(idx, rows.to(torch.int32)) & (vals > 0)
        sel = hit.any(1).nonzero().squeeze(1)
        idx, vals, hit = idx[sel].long(), vals[sel], hit[sel]
        r, c = hit.nonzero(as_tuple=True)
        cols = torch.searchsorted(rows, idx[r, c])
        A = torch.sparse_coo_tensor(torch.stack([r, cols]), vals[r, c], (len(sel), rows.shape[0]), check_invariants=False).coalesce()
        return sel, idx, vals, A

    def codes(self, group: int) -> tuple[Int[torch.Tensor, "n k"], Float[torch.Tensor, "n k"]]:
        """The codes (idx, vals) of the positions stored for ``group`` (its first entry)."""
        if "_first" not in self._joined:  # group -> its first entry (-1: none)
            first = torch.full((max(self._group, default=-1) + 1,), -1, dtype=torch.long)
            for i in reversed(range(len(self._group))):
                first[self._group[i]] = i
            self._joined["_first"] = first
        first = self._joined["_first"]
        i = int(first[group]) if 0 <= group < len(first) else -1
        if i < 0:
            raise KeyError(f"no positions stored for edit {group}")
        return self._data["idx"][i].long(), self._data["vals"][i]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        if len(self) == 0:
            return {}
        out = {f"{prefix}.{n}": self._cat(n) for n in self._data}
        out[f"{prefix}.sizes"] = torch.tensor([t.shape[0] for t in self._data["idx"]])
        out[f"{prefix}.groups"] = torch.tensor(self._group)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, d: int, k: int) -> "CodeBank":
        bank = cls(d, k)
        if f"{prefix}.sizes" not in tensors:
            return bank
        sizes = tensors[f"{prefix}.sizes"].tolist()
        splits = {n: torch.split(tensors[f"{prefix}.{n}"], sizes) for n in bank._data}
        for i, g in enumerate(tensors[f"{prefix}.groups"].tolist()):
            for n in bank._data:
                bank._data[n].append(splits[n][i].clone())
            bank._group.append(g)
        return bank


class AnchorBank(CodeBank):
    """Positions whose reconstruction should not move: code, the reconstruction to keep, a weight."""

    fields = ("target", "weight")

    def add(self, group: int, idx: torch.Tensor, vals: torch.Tensor, target: torch.Tensor, weight: float) -> None:
        """Add one group of positions (idx/vals [n, k], target [n, d]); each position gets ``weight``."""
        self._add(group, idx, vals, target=target.float(), weight=torch.full((idx.shape[0],), float(weight)))

    def scale_weights(self, factor: float) -> None:
        self._data["weight"] = [w * factor for w in self._data["weight"]]
        self._joined.clear()

    @torch.no_grad()
    def select(self, rows: Int[torch.Tensor, " m"], W_dec: torch.Tensor, b_dec: torch.Tensor) -> SelectedAnchors:
        """The anchored positions that use any of ``rows`` (sorted), with their current residual."""
        m = rows.shape[0]
        if len(self) == 0:
            return SelectedAnchors(_empty_sparse(m), torch.zeros(0, self.d), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        sel, idx, vals, A = self._hits(rows)
        target, weight = self._cat("target")[sel], self._cat("weight")[sel]
        n_sel = len(sel)
        residual = (self._reconstruct(idx, vals, W_dec, b_dec) - target) if n_sel else torch.zeros(0, self.d)
        return SelectedAnchors(A, residual.float(), weight, sel)

    @staticmethod
    def _reconstruct(idx: Int[torch.Tensor, "n k"], vals: Float[torch.Tensor, "n k"], W_dec: torch.Tensor, b_dec: torch.Tensor) -> Float[torch.Tensor, "n d"]:
        """Reconstructions of stored codes as one sparse x dense matmul (no [n, k, d] gather):
        codes C [n, d_sae] @ W_dec + b_dec."""
        n = idx.shape[0]
        rows_all = torch.arange(n).repeat_interleave(idx.shape[1])
        C = torch.sparse_coo_tensor(torch.stack([rows_all, idx.reshape(-1).long()]), vals.reshape(-1).to(W_dec.dtype),
                                    (n, W_dec.shape[0]), check_invariants=False)
        return torch.sparse.mm(C, W_dec) + b_dec


@dataclass
class SelectedScope:
    """The earlier edits whose positions use the rows being trained, with what decides their routing:
    edit ``j``'s ARD under a row change ``dR`` is exactly
    ``ard_j + sum_{p in j} weight_p (||error_p + A_p dR||^2 - ||error_p||^2)`` (``weight_p`` =
    ``1 / (alpha * S_j)``; positions of the edit that use none of the rows do not change)."""

    A: torch.Tensor  # sparse [n_sel, m]
    error: Float[torch.Tensor, "n_sel d"]
    """Current reconstruction error (``z_hat - z``) of each selected position."""
    weight: Float[torch.Tensor, " n_sel"]
    constraint: Int[torch.Tensor, " n_sel"]  # 0..n_constraints-1: which earlier edit
    ard: Float[torch.Tensor, " n_constraints"]
    """Each selected edit's current ARD (all its positions; float64)."""
    edit: Int[torch.Tensor, " n_constraints"]
    """Each constraint's edit number."""

    _f32: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    """``A`` (coalesced), ``error`` and ``weight`` in float32 (made once per edit)."""

    @property
    def n_constraints(self) -> int:
        return int(self.ard.shape[0])

    def _float32(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._f32 is None:
            self._f32 = (self.A.float().coalesce(), self.error.float(), self.weight.float())
        return self._f32

    def after(self, dR: Float[torch.Tensor, "m d"]) -> Float[torch.Tensor, " n_constraints"]:
        """Every selected edit's ARD after the row change ``dR`` (exact up to float32 rounding: the
        per-position products run in float32, a quarter of a float64 sparse product's time, and the
        scope rule's tolerances are 1e-3 tau), in ``dR``'s dtype."""
        A, e, w = self._float32()
        change = torch.sparse.mm(A, dR.float())
        per = w * torch.linalg.vecdot(torch.add(change, e, alpha=2), change)  # ||e + c||^2 - ||e||^2, one [n, d] temporary
        return self.ard.to(dR.dtype).index_add(0, self.constraint, per.to(dR.dtype))

    def gradient(self, dR: Float[torch.Tensor, "m d"], pos: Int[torch.Tensor, " j"]) -> Float[torch.Tensor, "j d"]:
        """At selected positions ``pos``, the gradient of their edit's ARD w.r.t. the position's
        reconstruction at the row change ``dR`` (``2 weight_p (error_p + A_p dR)``; float32
        products, in ``dR``'s dtype)."""
        A, e, w = self._float32()
        return (2 * w[pos, None] * (e[pos] + torch.sparse.mm(A.index_select(0, pos), dR.float()))).to(dR.dtype)


class MemoryBank(AnchorBank):
    """Earlier edits' positions: anchors (code, reconstruction when stored, weight) plus the
    reconstruction error ``z_hat - z`` when stored (float16), from which :meth:`scope` computes every
    earlier edit's current ARD without an LLM pass (codes are fixed, so ``z`` is too). Banks saved
    before errors were stored load with ``has_errors = False``."""

    fields = ("target", "weight", "error")

    def __init__(self, d: int, k: int) -> None:
        super().__init__(d, k)
        self.has_errors = True

    def add(self, group: int, idx: torch.Tensor, vals: torch.Tensor, target: torch.Tensor, weight: float,
            error: torch.Tensor) -> None:
        """One edit's positions (idx/vals [n, k]), their reconstruction ``target`` [n, d] and its error
        ``target - z`` [n, d]."""
        self._add(group, idx, vals, target=target.float(), weight=torch.full((idx.shape[0],), float(weight)),
                  error=error.to(torch.float16))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, d: int, k: int) -> "MemoryBank":
        known = f"{prefix}.error" in tensors or f"{prefix}.sizes" not in tensors
        if not known:
            tensors = {**tensors, f"{prefix}.error": torch.full_like(tensors[f"{prefix}.target"], float("nan"), dtype=torch.float16)}
        bank = super().from_tensors(tensors, prefix, d, k)
        assert isinstance(bank, MemoryBank)
        bank.has_errors = known
        return bank

    @torch.no_grad()
    def scope(self, rows: Int[torch.Tensor, " m"], W_dec: torch.Tensor, b_dec: torch.Tensor, alpha: float) -> SelectedScope:
        """The earlier edits with a position that uses any of ``rows`` (sorted), their current ARD
        (``sum_s ||z_hat_s - z_s||^2 / (alpha S)`` over the positions stored for them) and, for their
        positions that use the rows, the code on the rows and the current error."""
        m = rows.shape[0]
        if not self.has_errors:
            raise ValueError("this editor's memory has no stored reconstruction errors (made before keep_scope existed); "
                             "keep_scope needs them from the first edit on")
        if len(self) == 0:
            return SelectedScope(_empty_sparse(m), torch.zeros(0, self.d), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                 torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
        sel, _, _, A = self._hits(rows)
        group_of = self._group_of_positions()
        involved, constraint = torch.unique(group_of[sel], return_inverse=True)
        pos = torch.isin(group_of, involved).nonzero().squeeze(1)  # every position of those edits
        err = (self._reconstruct(self._cat("idx")[pos], self._cat("vals")[pos], W_dec, b_dec)
               - self._cat("target")[pos] + self._cat("error")[pos].to(W_dec.dtype)).double()
        w = self._cat("weight")[pos].double() / alpha
        ard = torch.zeros(len(involved), dtype=torch.float64).index_add_(
            0, torch.searchsorted(involved, group_of[pos]), w * (err**2).sum(-1))
        at = torch.searchsorted(pos, sel)  # the selected positions among pos
        edit = torch.tensor(self._group, dtype=torch.long)[involved]
        return SelectedScope(A, err[at].float(), w[at].float(), constraint, ard, edit)


@dataclass
class SelectedSensitivities:
    """Stored target sensitivities that depend on the rows being trained: for constraint ``j`` (one
    target token of one earlier edit) the first-order change of its log-prob under a row change
    ``dR`` is ``sum_{p in j} (A_p dR) . G_p``."""

    A: torch.Tensor  # sparse [n_sel, m]
    grad: Float[torch.Tensor, "n_sel d"]
    constraint: Int[torch.Tensor, " n_sel"]  # 0..n_constraints-1
    n_constraints: int
    token: Int[torch.Tensor, " n_constraints"] | None = None
    """With levels stored (``keep_floor``): each constraint's token number in the bank."""
    level: Float[torch.Tensor, " n_constraints"] | None = None
    """With levels stored: each constraint's estimated current log-odds (float64)."""
    _f32: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    """``A`` (coalesced) and ``grad`` in float32 (made once: an edit applies ``change`` several times
    per step)."""
    _grams: "GramCache | None" = field(default=None, repr=False, compare=False)
    """Products among ``grad`` rows that held steps asked for (:meth:`gram`)."""

    def change(self, dR: Float[torch.Tensor, "m d"]) -> Float[torch.Tensor, " n_constraints"]:
        """First-order change of every selected target log-prob under ``dR`` (float32 products, as
        :meth:`SelectedScope.after`; the gradients are stored in bf16), in ``dR``'s dtype."""
        if self._f32 is None:
            self._f32 = (self.A.float().coalesce(), self.grad.float())
        A, grad = self._f32
        per_pos = torch.linalg.vecdot(torch.sparse.mm(A, dR.float()), grad)
        return torch.zeros(self.n_constraints, dtype=dR.dtype).index_add_(0, self.constraint, per_pos.to(dR.dtype))

    def gram(self, pos: Int[torch.Tensor, " p"]) -> Float[torch.Tensor, "p p"]:
        """``grad[pos] @ grad[pos].T`` (float32); a held step's re-check, which adds tokens after those
        held already, computes only the new entries' products (:class:`GramCache`)."""
        if self._grams is None:
            self._grams = GramCache(self.grad)
        return self._grams.block(pos)


class GramCache:
    """Dot products ``G[e] . G[f]`` among rows of a fixed ``G`` asked for as a growing list: when a
    request starts with the previous one (a held step's re-check adds earlier tokens after those it
    holds already), only the new rows' products are computed; any other request starts again.
    (Gathering a block from a larger cached gram costs about as much as computing it: the held
    sets' ~2,000 x 576 products are memory bound.)"""

    def __init__(self, G: Float[torch.Tensor, "n d"]) -> None:
        self.G = G.float()
        self.rows = torch.zeros(0, dtype=torch.long)
        self.gram = torch.zeros(0, 0)

    def block(self, pos: Int[torch.Tensor, " p"]) -> Float[torch.Tensor, "p p"]:
        """The products among the rows ``pos``, in that order."""
        n0 = len(self.rows)
        if n0 > len(pos) or not torch.equal(pos[:n0], self.rows):
            n0, self.rows, self.gram = 0, pos[:0], torch.zeros(0, 0)
        if len(pos) > n0:
            block = self.G[pos[n0:]] @ self.G[pos].T  # [new, all]
            gram = torch.empty(len(pos), len(pos))
            gram[:n0, :n0] = self.gram
            gram[n0:] = block
            gram[:n0, n0:] = block[:, :n0].T
            self.rows, self.gram = pos.clone(), gram
        return self.gram


class SensitivityBank(CodeBank):
    """Per earlier edit and target token: the gradient of the token's log-prob (or log-odds, with
    levels) with respect to the reconstruction at each of the edit's positions (with the code of
    the position).

    Optionally also the token's *level*: its log-odds when its edit was made, plus the first-order
    change every later edit made to it (``add_drift``; exact to first order, since a stored
    position's reconstruction moves only through the rows an edit trains)."""

    fields = ("grad", "token")

    def __init__(self, d: int, k: int) -> None:
        super().__init__(d, k)
        self._levels: list[torch.Tensor] = []  # per group: log-odds of its tokens when made [n_t]
        self._drift: list[tuple[torch.Tensor, torch.Tensor]] = []  # per group: (token numbers, change) it made

    def add(self, group: int, idx: torch.Tensor, vals: torch.Tensor, grad: Float[torch.Tensor, "n_target n d"], keep: int,
            level: Float[torch.Tensor, " n_target"] | None = None) -> None:
        """One edit's positions (idx/vals [n, k]) and the gradients of its ``n_target`` token log-probs
        w.r.t. them; per token only the ``keep`` positions with the largest gradient norm are kept.
        ``level``: the tokens' log-odds now (every group of a bank has one, or none does)."""
        if len(self) and (level is not None) != self.has_levels:
            raise ValueError("every edit of a sensitivity bank stores token levels or none does (keep_floor must be set "
                             "from the first edit on)")
        n_t = grad.shape[0]
        token, pos, kept = largest_gradient_positions(grad, keep)
        self._add(group, idx[pos], vals[pos], grad=kept.to(torch.bfloat16), token=token)
        if level is not None:
            self._levels.append(level.detach().to(torch.float64).reshape(n_t).clone())
            self._drift.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)))

    @property
    def has_levels(self) -> bool:
        return len(self._levels) > 0 and len(self._levels) == len(self)

    def add_drift(self, token: Int[torch.Tensor, " j"], change: Float[torch.Tensor, " j"]) -> None:
        """Record the first-order log-odds change the newest edit made to earlier tokens (numbers as
        in :class:`SelectedSensitivities`); call after that edit's own :meth:`add`, so that rolling
        the edit back drops it."""
        if not self.has_levels:
            raise ValueError("this sensitivity bank stores no token levels")
        self._drift[-1] = (torch.cat([self._drift[-1][0], token.long()]), torch.cat([self._drift[-1][1], change.double()]))
        self._joined.pop("_level", None)

    def levels(self) -> Float[torch.Tensor, " n_tokens"]:
        """Estimated current log-odds of every stored token (level when made + later edits' drift)."""
        if "_level" not in self._joined:
            level = torch.cat(self._levels) if self._levels else torch.zeros(0, dtype=torch.float64)
            for tok, change in self._drift:  # in edit order: bitwise the same after save/load or rollback
                level = level.index_add(0, tok, change)
            self._joined["_level"] = level
        return self._joined["_level"]

    def drop_groups_from(self, group: int) -> None:
        keep = sum(1 for g in self._group if g < group)
        super().drop_groups_from(group)
        del self._levels[keep:]
        del self._drift[keep:]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = super().tensors(prefix)
        if self.has_levels:
            out[f"{prefix}.levels"] = torch.cat(self._levels)
            out[f"{prefix}.level_sizes"] = torch.tensor([len(t) for t in self._levels])
            out[f"{prefix}.drift_token"] = torch.cat([t for t, _ in self._drift])
            out[f"{prefix}.drift_change"] = torch.cat([c for _, c in self._drift])
            out[f"{prefix}.drift_sizes"] = torch.tensor([len(t) for t, _ in self._drift])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, d: int, k: int) -> "SensitivityBank":
        bank = super().from_tensors(tensors, prefix, d, k)
        assert isinstance(bank, SensitivityBank)
        if f"{prefix}.levels" in tensors:
            bank._levels = [t.clone() for t in torch.split(tensors[f"{prefix}.levels"], tensors[f"{prefix}.level_sizes"].tolist())]
            sizes = tensors[f"{prefix}.drift_sizes"].tolist()
            bank._drift = [(t.clone(), c.clone()) for t, c in zip(torch.split(tensors[f"{prefix}.drift_token"], sizes),
                                                                   torch.split(tensors[f"{prefix}.drift_change"], sizes))]
        return bank

    @torch.no_grad()
    def select(self, rows: Int[torch.Tensor, " m"]) -> SelectedSensitivities:
        if len(self) == 0:
            return SelectedSensitivities(_empty_sparse(rows.shape[0]), torch.zeros(0, self.d), torch.zeros(0, dtype=torch.long), 0)
        sel, _, _, A = self._hits(rows)
        key = torch.stack([self._group_of_positions()[sel], self._cat("token")[sel]], dim=1)  # (edit, target token)
        ukey, constraint = torch.unique(key, dim=0, return_inverse=True)
        n_c = int(constraint.max()) + 1 if len(sel) else 0
        token = level = None
        if self.has_levels:
            first = torch.cumsum(torch.tensor([0] + [len(t) for t in self._levels[:-1]]), 0)
            token = first[ukey[:, 0]] + ukey[:, 1]
            level = self.levels()[token]
        return SelectedSensitivities(A, self._cat("grad")[sel].float(), constraint, n_c, token, level)


def entries_of(constraint: Int[torch.Tensor, " n"], n_constraints: int, chosen: Int[torch.Tensor, " j"]) -> tuple[Int[torch.Tensor, " p"], Int[torch.Tensor, " p"]]:
    """The entries (positions) whose ``constraint`` is among ``chosen``, in entry order, and their
    constraint renumbered ``0..len(chosen)-1`` in the order of ``chosen``."""
    slot = torch.full((n_constraints,), -1, dtype=torch.long)
    slot[chosen] = torch.arange(len(chosen))
    pos = (slot[constraint] >= 0).nonzero().squeeze(1)
    return pos, slot[constraint[pos]]


def largest_gradient_positions(grad: Float[torch.Tensor, "n_t n d"], keep: int) -> tuple[Int[torch.Tensor, " j"], Int[torch.Tensor, " j"], Float[torch.Tensor, "j d"]]:
    """Per token, its ``keep`` positions with the largest gradient norm (all ``n`` if fewer), in
    position order: (token of each entry, its position, its gradient), token-major."""
    n_t, n = grad.shape[:2]
    top = grad.norm(dim=-1).topk(min(keep, n), dim=1).indices.sort(dim=1).values  # [n_t, keep]
    token = torch.arange(n_t).repeat_interleave(top.shape[1])
    pos = top.reshape(-1)
    return token, pos, grad[token, pos]


def _empty_sparse(m: int) -> torch.Tensor:
    """A sparse [0, m] matrix (no stored position selected)."""
    return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (0, m))


def batch_tokens(model: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask for ``texts`` (no BOS)."""
    ids = [model.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    if any(len(x) == 0 for x in ids):
        raise ValueError("a text tokenizes to nothing")
    n = max(len(x) for x in ids)
    if n > model.cfg.n_ctx:
        raise ValueError(f"a text is {n} tokens, longer than the model's context ({model.cfg.n_ctx})")
    return pad_ids(model, ids)


def pad_ids(model: Any, ids: Sequence[Sequence[int] | torch.Tensor]) -> tuple[Int[torch.Tensor, "batch seq"], Bool[torch.Tensor, "batch seq"]]:
    """Right-padded token ids and the mask of real tokens (the tokenizer's pad id, else 0; with
    causal attention the padding never changes a real position)."""
    tok = getattr(model, "tokenizer", None)
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    n = max(len(x) for x in ids)
    toks = torch.full((len(ids), n), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.bool)
    for i, x in enumerate(ids):
        toks[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = True
    return toks, mask
