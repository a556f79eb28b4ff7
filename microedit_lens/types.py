"""Typed requests and results shared by every editing method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class EditError(RuntimeError):
    """An edit could not be made. Edits applied before it are kept; ``results`` holds their results."""

    def __init__(self, message: str, request_index: int | None = None, results: list["EditResult"] | None = None):
        super().__init__(message)
        self.request_index = request_index
        self.results = results or []


class NumericalEditError(EditError):
    """A loss became NaN or infinite; the offending edit was rolled back."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: after ``prompt`` the model should produce ``target``.

    ``target`` is appended to ``prompt`` as text; if neither the prompt ends with whitespace nor the
    target starts with it, one space is inserted (the WISE/EasyEdit convention: ``prompt + ' ' +
    target``). ``paraphrases`` and ``locality_prompts`` are used for scoring only, never for training.
    """

    prompt: str
    target: str
    paraphrases: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    subject: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("EditRequest.prompt is empty")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"EditRequest.target is empty (prompt: {self.prompt[:60]!r})")
        for name in ("paraphrases", "locality_prompts", "locality_answers"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            else:
                object.__setattr__(self, name, tuple(value))
        if self.locality_answers and len(self.locality_answers) != len(self.locality_prompts):
            raise ValueError("locality_answers must match locality_prompts one to one")

    @property
    def target_text(self) -> str:
        """The target as appended to the prompt (with the joining space when needed)."""
        if self.prompt[-1].isspace() or self.target[0].isspace():
            return self.target
        return " " + self.target

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("paraphrases", "locality_prompts", "locality_answers"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
        return cls(**d)


@dataclass
class StageStats:
    """What one optimisation stage did."""

    steps: int
    loss_start: float
    loss_end: float
    seconds: float


@dataclass
class EditResult:
    """What one edit did."""

    index: int
    """Position of this edit in the editor's history (0-based)."""
    request: EditRequest
    success: bool
    """The target is the greedy continuation at every target position and ARD <= tau (never for a
    reverted edit)."""
    stage1: StageStats
    stage2: StageStats
    n_latents: int
    """Decoder rows trained (latents active on the edit sequence)."""
    ard_before: float
    ard_after: float
    target_logprob: float
    """Mean log-probability of the target tokens after the edit (SAE spliced in)."""
    seconds: float
    tau: float | None = None
    """The switch threshold right after this edit (``None`` where the editor had none, and in results
    saved before it was kept)."""
    reverted: bool = False
    """The update was found but not applied (``MicroEditConfig.revert_unrouted``: it missed the stopping
    rule with ``ard_after`` above tau): the decoder is as before this edit, which stays in the log
    (and counts for undo/rollback) with no rows. ``ard_after`` and ``target_logprob`` are those of
    the update that was not applied."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["request"] = self.request.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditResult":
        d = dict(d)
        d["request"] = EditRequest.from_dict(d["request"])
        d["stage1"] = StageStats(**d["stage1"])
        d["stage2"] = StageStats(**d["stage2"])
        return cls(**d)
