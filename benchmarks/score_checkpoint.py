"""Score a saved editor (e.g. the mid-run checkpoint `microedit eval --checkpoint-dir DIR` leaves in
DIR/T<T>_editor) on the records it has edited so far: all of them were edited sequentially before
any is scored, so this is the lifelong protocol's score for T = the number of edits made.

    python benchmarks/score_checkpoint.py CKPT_DIR/T1000_editor OUT.json \
        --data ../shared/data/zsre/zsre_mend_eval_portability_gpt4.json [--format zsre]

The records must be the first records of --data, in the order they were edited. OUT.json holds the
means (and the median PPL where it applies) and every record's scores; torch runs OMP_NUM_THREADS
threads (1 if unset).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import asdict

from microedit_lens.data import FORMATS, load_dataset
from microedit_lens.lifelong import LifelongConfig, LifelongRunner, trun_from_progress
from _common import load_saved_editor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("editor_dir")
    ap.add_argument("out")
    ap.add_argument("--data", required=True, help="the edit file the editor's records came from")
    ap.add_argument("--format", choices=sorted(FORMATS), default=None)
    ap.add_argument("--no-generative", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    ed = load_saved_editor(a.editor_dir)
    n = ed.n_edits
    recs = load_dataset(a.data, a.format, limit=n).records[:n]
    if [r.prompt for r in recs] != [r.request.prompt for r in ed.results]:
        raise SystemExit(f"the first {n} records of {a.data} are not the ones this editor edited")
    runner = LifelongRunner.for_editor(ed, ed.sae)
    cfg = LifelongConfig(T=[n], generative=not a.no_generative)
    t = time.time()
    base = runner.baselines(recs, cfg.batch_size, cfg.lower_cache)
    sc = runner.score(recs, list(range(n)), base, cfg, [(r.success, r.seconds) for r in ed.results])
    run = trun_from_progress(n, 1, {"scores": [asdict(s) for s in sc], "edit_s": sum(r.seconds for r in ed.results),
                                    "score_s": time.time() - t, "wall_s": float("nan")})
    out = dict(n_edits=n, reliability=run.reliability, generalization=run.generalization, locality=run.locality,
               ppl=run.ppl, rel_generative=run.rel_generative, edit_seconds_per_edit=run.edit_seconds_per_edit,
               success=run.edit_success, score_seconds=run.score_seconds_total, tau=ed.tau, average=run.summary()["average"])
    ppls = [s.ppl for s in sc if not math.isnan(s.ppl)]
    out["median_ppl"] = statistics.median(ppls) if ppls else float("nan")
    logging.getLogger(__name__).info("%s", json.dumps(out))
    out["records"] = [asdict(s) for s in sc]
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
