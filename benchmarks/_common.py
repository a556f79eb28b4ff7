"""Helpers shared by the benchmark scripts (run them from the repository root: ``python benchmarks/X.py``)."""

from typing import Sequence

from microedit_lens import metrics
from microedit_lens.methods.microedit import MicroEditor
from microedit_lens.switch import SwitchMode


def accuracy_by_mode(editor: MicroEditor, prompts: Sequence[str], answers: Sequence[str], tag: str,
                     modes: Sequence[SwitchMode] = (SwitchMode.AUTO, SwitchMode.ALWAYS)) -> dict[str, float]:
    """Mean teacher-forced accuracy with the switch as is (``{tag}_auto``) and forced on (``{tag}_always``)."""
    out = {}
    for mode in modes:
        with editor.attached(), editor.switch.mode_as(mode):
            acc = metrics.teacher_forced(editor.model, prompts, answers, 32, editor.padding).accuracy()
        out[f"{tag}_{mode.value}"] = metrics.mean(acc)
    return out
