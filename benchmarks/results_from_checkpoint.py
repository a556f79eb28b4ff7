"""Write the results (JSON + markdown table) of the T values a checkpointed lifelong run has finished,
while the rest of it is still running or was interrupted (e.g. CounterFact T=3000 of the 5000-edit
stream):

    python benchmarks/results_from_checkpoint.py CKPT_DIR OUT.json --dataset counterfact [--ppl] [--partial]

With ``--partial`` a T whose run is still inside a chunk is reported over its finished chunks (e.g.
T=100 after 5 of 6 chunks: the first 500 records), not left out.

The method config is read from the run's mid-chunk editor (CKPT_DIR/T<T>_editor/editor.json) if present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from microedit_lens.lifelong import SweepResult, trun_from_progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint_dir")
    ap.add_argument("out")
    ap.add_argument("--dataset", default="")
    ap.add_argument("--method", default="microedit")
    ap.add_argument("--ppl", action="store_true", help="markdown in the hallucination layout (PPL, Loc)")
    ap.add_argument("--partial", action="store_true", help="also report a T over its finished chunks while a chunk is in progress")
    a = ap.parse_args()
    ck = Path(a.checkpoint_dir)
    progress = json.loads((ck / "progress.json").read_text())
    runs = {int(t): trun_from_progress(int(t), st["chunks_done"], st) for t, st in progress.items()
            if st["chunks_done"] > 0 and (a.partial or "mid_chunk" not in st)}
    if not runs:
        raise SystemExit(f"{ck} holds no finished T yet")
    meta = next(ck.glob("T*_editor/editor.json"), None)
    config = {"method": json.loads(meta.read_text())["config"]} if meta is not None else {}
    n = max(r.n_records for r in runs.values())
    res = SweepResult(dataset=a.dataset, method=a.method, n_records=n, config=config, runs=dict(sorted(runs.items())))
    sys.stdout.write(res.write(a.out, ppl=a.ppl))


if __name__ == "__main__":
    main()
