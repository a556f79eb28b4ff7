"""Helpers shared by the benchmark scripts (run them from the repository root: ``python benchmarks/X.py``)."""

import argparse
import os
from typing import Sequence

import torch

from microedit_lens import load_model, load_sae, metrics
from microedit_lens.methods.microedit import MicroEditor
from microedit_lens.switch import SwitchMode


def saved_editor_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a script that goes on with a saved editor's stream: EDITOR DATA FORMAT N."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("editor", help="a saved editor (MicroEditor.save, or a lifelong run's checkpoint)")
    ap.add_argument("data")
    ap.add_argument("format")
    ap.add_argument("n", type=int, help="how many records after the saved edits to edit")
    return ap


def load_saved_editor(path: str) -> MicroEditor:
    """A saved editor on the embedded model and the shipped SAE; torch runs OMP_NUM_THREADS threads (1 if unset)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, sae = load_model(), load_sae()
    return MicroEditor.load(path, model, sae=sae)


def accuracy_by_mode(editor: MicroEditor, prompts: Sequence[str], answers: Sequence[str], tag: str,
                     modes: Sequence[SwitchMode] = (SwitchMode.AUTO, SwitchMode.ALWAYS)) -> dict[str, float]:
    """Mean teacher-forced accuracy with the switch as is (``{tag}_auto``) and forced on (``{tag}_always``)."""
    out = {}
    for mode in modes:
        with editor.attached(), editor.switch.mode_as(mode):
            acc = metrics.teacher_forced(editor.model, prompts, answers, 32, editor.padding).accuracy()
        out[f"{tag}_{mode.value}"] = metrics.mean(acc)
    return out
