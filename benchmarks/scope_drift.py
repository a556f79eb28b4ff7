"""Scope drift: go on with a saved editor's stream for N edits and, after each, count how many of the
earlier edits the switch routes through the edited SAE (ARD <= tau), how many left scope and how many
came back, and tau. The earlier edits' ARD comes from the editor's memory bank (stored codes and
reconstruction errors of the edit prompts' positions; the same number the switch computes for them,
without an LLM pass).

    python benchmarks/scope_drift.py CKPT/T2000_editor ../shared/data/counterfact/counterfact-edit.json \\
        counterfact 8 [--config '{"track_tau_band": null}']

``--config`` overrides fields of the saved editor's config for the new edits (e.g. the session-22 tau
band, ``track_tau_band``). Prints one JSON line per edit, then a summary line. The saved editor is not
modified (nothing is written back).
"""

import dataclasses
import json
import time
from typing import Any, Sequence

import torch

from microedit_lens import EditRequest
from microedit_lens.data import load_dataset
from microedit_lens.methods.microedit import MicroEditor
from _common import load_saved_editor, saved_editor_parser


def earlier_ard(editor: MicroEditor) -> torch.Tensor:
    """Every earlier edit's ARD under the current decoder (float64, one per edit, in edit order)."""
    rows = torch.arange(editor.sae.W_dec.shape[0])
    sc = editor.memory.scope(rows, editor.sae.W_dec, editor.sae.b_dec, editor.cfg.alpha)
    ard = torch.full((editor.n_edits,), float("inf"), dtype=torch.float64)
    ard[sc.edit] = sc.ard
    return ard


def scope_drift(editor: MicroEditor, records: Sequence[EditRequest]) -> dict[str, Any]:
    """Make the edits one by one; after each, the earlier edits' moves in and out of scope (among the
    edits made before this call), tau and the seconds the edit took."""
    n0 = editor.n_edits
    on = earlier_ard(editor) <= editor.tau
    steps: list[dict[str, Any]] = []
    start = {"after_edits": n0, "tau": editor.tau, "in_scope": int(on.sum())}
    for r in records:
        t = time.perf_counter()
        editor.edit(r)
        seconds = time.perf_counter() - t
        now = earlier_ard(editor)[:n0] <= editor.tau
        steps.append({"tau": editor.tau, "in_scope": int(now.sum()), "in_to_out": int((on & ~now).sum()),
                      "out_to_in": int((~on & now).sum()), "seconds": round(seconds, 2)})
        on = now
    return {"start": start, "edits": steps, "in_to_out": sum(s["in_to_out"] for s in steps),
            "out_to_in": sum(s["out_to_in"] for s in steps), "s_per_edit": sum(s["seconds"] for s in steps) / max(len(steps), 1)}


def main() -> None:
    ap = saved_editor_parser(__doc__.splitlines()[0])
    ap.add_argument("--config", default="{}", help="JSON object of config fields to override for the new edits")
    args = ap.parse_args()
    editor = load_saved_editor(args.editor)
    overrides = json.loads(args.config)
    if overrides:
        editor.cfg = dataclasses.replace(editor.cfg, **overrides)
    n0 = editor.n_edits
    records = load_dataset(args.data, args.format, limit=n0 + args.n).records[n0:n0 + args.n]
    out = scope_drift(editor, records)
    for s in out["edits"]:
        print(json.dumps(s))
    print(json.dumps({k: v for k, v in out.items() if k != "edits"}))


if __name__ == "__main__":
    main()
