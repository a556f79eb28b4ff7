"""The interface every editing method offers, and the registry generic code looks methods up in.

Generic code (the lifelong protocol, the CLI, the analyses) only ever calls :func:`get_method` and the
methods of :class:`EditMethod`; it never compares method names.
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

from microedit_lens.types import EditRequest, EditResult


class EditMethod(abc.ABC):
    """A knowledge editor attached to one hooked model.

    Contract: ``edit`` applies requests sequentially; every edit can be undone exactly (``undo``,
    ``rollback``); ``detach`` leaves the model exactly as it was before ``attach``; ``save``/``load``
    round-trip the edited state.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]

    @abc.abstractmethod
    def edit(self, requests: EditRequest | Sequence[EditRequest]) -> list[EditResult]:
        """Apply the requests in order; returns one result per request."""

    @property
    @abc.abstractmethod
    def n_edits(self) -> int:
        """Edits currently applied."""

    @abc.abstractmethod
    def rollback(self, n_edits: int) -> None:
        """Undo edits until exactly ``n_edits`` remain (0 = the unedited state)."""

    def undo(self, n: int = 1) -> None:
        """Undo the last ``n`` edits."""
        if n < 0 or n > self.n_edits:
            raise ValueError(f"cannot undo {n} edits: {self.n_edits} applied")
        self.rollback(self.n_edits - n)

    @abc.abstractmethod
    def attach(self) -> None:
        """Install the method's hooks/modules on the model."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Remove everything ``attach`` installed; the model is then the plain model again."""

    @property
    @abc.abstractmethod
    def is_attached(self) -> bool: ...

    @contextmanager
    def attached(self) -> Iterator["EditMethod"]:
        """Attach for the duration of the block, restoring the previous state in ``finally``."""
        was = self.is_attached
        if not was:
            self.attach()
        try:
            yield self
        finally:
            if not was:
                self.detach()

    @contextmanager
    def detached(self) -> Iterator["EditMethod"]:
        """Run the plain model for the duration of the block."""
        was = self.is_attached
        if was:
            self.detach()
        try:
            yield self
        finally:
            if was:
                self.attach()

    def prepare(self, reference_texts: Sequence[str]) -> None:
        """Fit whatever the method derives from unrelated reference text (MicroEdit: tau and its
        reference anchors). Called once by the lifelong protocol before any edit. Default: nothing."""

    @contextmanager
    def padding(self, pad_mask: Any) -> Iterator[None]:
        """Tell the method which positions of the next forward passes are padding (bool [batch, pos],
        True = pad). Default: nothing to do."""
        yield

    def prefix_logits_at(self, tokens: Any, pad_mask: Any, rows: Any, cols: Any) -> Any:
        """Logits [n, vocab] at positions ``(rows[i], cols[i])`` of the right-padded ``tokens`` (ids, or a
        :class:`~microedit_lens.metrics.ModelInput`; pad_mask True = pad), each equal to the output of
        the model with the method as it stands on the input cut after that position, or ``None`` when
        the method cannot give that in one pass. Scoring uses it to decode greedily without a forward
        pass per token. Default: ``None``."""
        return None

    @property
    def unchanged_blocks(self) -> int:
        """How many leading transformer blocks the method never changes (their outputs are the plain
        model's whatever the edits): scoring computes them once per sequence
        (:class:`~microedit_lens.metrics.LowerCache`). Default 0: no such promise."""
        return 0

    @abc.abstractmethod
    def save(self, path: str | Path) -> Path:
        """Persist the edited state (and what is needed to keep editing) to a folder."""

    @classmethod
    @abc.abstractmethod
    def load(cls, path: str | Path, model: Any, sae: Any = None) -> "EditMethod":
        """Rebuild an editor from ``save`` output on ``model``."""


@dataclass(frozen=True)
class MethodEntry:
    method_class: type[EditMethod]
    config_class: type


class MethodRegistry:
    """Name -> method class. Duplicate names raise."""

    def __init__(self) -> None:
        self._entries: dict[str, MethodEntry] = {}

    def register(self, name: str, method_class: type[EditMethod], config_class: type) -> None:
        if name in self._entries:
            raise ValueError(f"an editing method named '{name}' is already registered")
        self._entries[name] = MethodEntry(method_class, config_class)

    def get(self, name: str) -> MethodEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown editing method '{name}'; registered: {sorted(self._entries)}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)


REGISTRY = MethodRegistry()


def register_method(name: str, method_class: type[EditMethod], config_class: type) -> None:
    """Register an editing method under ``name`` (SAELens's ``register_sae_class`` pattern)."""
    REGISTRY.register(name, method_class, config_class)


def get_method(name: str) -> MethodEntry:
    return REGISTRY.get(name)
