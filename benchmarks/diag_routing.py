"""Why do edits fail to generalise? Edit the first N records of the WISE ZsRE stream sequentially, then
measure routing (share of prompts / paraphrases / locality prompts with ARD <= tau), Reliability and
Generalization with the switch as is and forced on, and how much the edits moved the ARD of inputs
that were not edited (median post/pre ratio).

    python benchmarks/diag_routing.py 100 '{"row_update": "gradient"}'

Prints one JSON line. Data from $MICROEDIT_DATA (default ../shared/data).
"""

import json
import os
import sys
import time

import torch

from microedit_lens import load_model, load_sae
from microedit_lens.data import load_dataset, load_reference_texts
from microedit_lens.methods.microedit import MicroEditConfig, MicroEditor
from _common import accuracy_by_mode


def main(n: int, overrides: dict) -> dict:
    data = os.environ.get("MICROEDIT_DATA", "../shared/data")
    model, sae = load_model(), load_sae()
    recs = load_dataset(f"{data}/zsre/zsre_mend_eval_portability_gpt4.json", limit=n).records
    refs = load_reference_texts(f"{data}/zsre/zsre_mend_train-1k.json", 500)
    ed = MicroEditor(model, sae, MicroEditConfig(**overrides))
    ed.calibrate(refs)
    t = time.time()
    ed.edit(recs)
    out = dict(over=overrides, n=n, s_per_edit=(time.time() - t) / n, tau=ed.tau)
    P, Y = [r.prompt for r in recs], [r.target for r in recs]
    Q, L = [r.paraphrases[0] for r in recs], [r.locality_prompts[0] for r in recs]
    for name, texts in (("prompt", P), ("para", Q), ("loc", L)):
        out[f"in_scope_{name}"] = ed.route(texts).on.float().mean().item()
    out.update(accuracy_by_mode(ed, P, Y, "rel"))
    out.update(accuracy_by_mode(ed, Q, Y, "gen"))
    sets = {"para": Q, "loc": L, "ref": refs[:200]}
    post = {k: ed.route(v).ard for k, v in sets.items()}
    ed.rollback(0)
    for k, texts in sets.items():
        out[f"ard_ratio_median_{k}"] = torch.quantile(post[k] / ed.route(texts).ard, 0.5).item()
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.stdout.write(json.dumps(main(int(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})) + "\n")
