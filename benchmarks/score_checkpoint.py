"""Score a mid-run lifelong checkpoint (the editor saved by `microedit eval --checkpoint-dir`) on the
ZsRE records it has edited so far: all of them were edited sequentially before any is scored.

    python benchmarks/score_checkpoint.py CKPT_DIR/T1000_editor OUT.json
"""
import json
import sys
import time
from pathlib import Path

import torch
torch.set_num_threads(1)
from microedit_lens import load_model, load_sae, MicroEditor
from microedit_lens.data import load_dataset
from microedit_lens.lifelong import LifelongConfig, LifelongRunner
from microedit_lens import metrics
ck = sys.argv[1]
model, sae = load_model(), load_sae()
ed = MicroEditor.load(ck, model, sae=sae)
n = ed.n_edits
recs = load_dataset(str(Path(__file__).resolve().parents[2] / "shared/data/zsre/zsre_mend_eval_portability_gpt4.json"), limit=1000).records[:n]
runner = LifelongRunner.for_editor(ed, sae)
cfg = LifelongConfig(T=[n], generative=True)
t = time.time()
base = runner.baselines(recs, 32)
sc = runner.score(recs, list(range(n)), base, cfg, [(r.success, r.seconds) for r in ed.results])
m = metrics.mean
out = dict(n_edits=n, reliability=m([s.reliability for s in sc]), generalization=m([s.generalization for s in sc]),
           locality=m([s.locality for s in sc]), rel_generative=m([s.rel_generative for s in sc]),
           edit_seconds_per_edit=m([r.seconds for r in ed.results]), success=m([float(r.success) for r in ed.results]),
           score_seconds=time.time() - t, tau=ed.tau)
out["average"] = (out["reliability"] + out["generalization"] + out["locality"]) / 3
sys.stdout.write(json.dumps(out, indent=1) + "\n")
json.dump(out, open(sys.argv[2], "w"), indent=1)
