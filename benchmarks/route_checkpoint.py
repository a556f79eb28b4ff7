"""Routing of a saved editor's edits: how many of its edit prompts the switch still routes through the
edited SAE, their ARD/tau now against their ARD when made (over today's tau: the editor does not
store tau per edit), and Reliability (and, where the records have
paraphrases, Generalization and the paraphrases' share in scope) with the switch as is and forced on.

    python benchmarks/route_checkpoint.py EDITOR_DIR DATA_FILE [--format counterfact]

EDITOR_DIR is a ``MicroEditor.save`` directory, e.g. a lifelong run's ``CKPT_DIR/T<T>_final_editor``
(``microedit eval --keep-editor``) or its mid-run ``CKPT_DIR/T<T>_editor`` (its
edits must be the first ``n_edits`` records of DATA_FILE, as in the lifelong protocol). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from _common import accuracy_by_mode
from microedit_lens import load_model
from microedit_lens.data import load_dataset
from microedit_lens.methods.microedit import MicroEditor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("editor_dir")
    ap.add_argument("data")
    ap.add_argument("--format", default=None, help="data format (default: detected from the file)")
    a = ap.parse_args()
    model = load_model()
    ed = MicroEditor.load(a.editor_dir, model, attach=False)
    n = ed.n_edits
    recs = load_dataset(a.data, format=a.format, limit=n).records
    prompts, targets = [r.prompt for r in recs], [r.target for r in recs]
    routing = ed.route(prompts)
    ratio = routing.ard / routing.tau
    made = torch.tensor([r.ard_after for r in ed.results]) / routing.tau
    out = {
        "n_edits": n, "tau": routing.tau, "prompt_in_scope": routing.on.float().mean().item(),
        "ard_over_tau_now_q50_75_90": [round(ratio.quantile(q).item(), 3) for q in (0.5, 0.75, 0.9)],
        "ard_when_made_over_tau_now_median": made.median().item(),
    }
    out.update(accuracy_by_mode(ed, prompts, targets, "rel"))
    with_para = [r for r in recs if r.paraphrases]
    if with_para:
        paraphrases = [r.paraphrases[0] for r in with_para]
        out["paraphrase_in_scope"] = ed.route(paraphrases).on.float().mean().item()
        out.update(accuracy_by_mode(ed, paraphrases, [r.target for r in with_para], "gen"))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
