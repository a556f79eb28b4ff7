"""Merge lifelong results written by separate runs (e.g. one process per T, run side by side on the
cores) into one JSON + markdown table in the paper's layout:

    python benchmarks/merge_results.py OUT.json RUN_T1.json RUN_T10.json RUN_T100.json [--ppl]

A run written as ``RUN.json:1,10`` contributes only those T (e.g. T=1 from a sweep whose other T were
re-run later).
"""

from __future__ import annotations

import argparse
import sys

from microedit_lens.lifelong import SweepResult


def _read(arg: str) -> SweepResult:
    path, _, only = arg.partition(":")
    run = SweepResult.from_json(path)
    if only:
        keep = {int(t) for t in only.split(",")}
        if not keep <= set(run.runs):
            raise SystemExit(f"{path} has T={sorted(run.runs)}, not all of {sorted(keep)}")
        run.runs = {t: r for t, r in run.runs.items() if t in keep}
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+", help="result JSON files, each optionally FILE:T[,T...]")
    ap.add_argument("--ppl", action="store_true", help="markdown in the hallucination layout (PPL, Loc)")
    a = ap.parse_args()
    merged = SweepResult.merge([_read(r) for r in a.runs])
    sys.stdout.write(merged.write(a.out, ppl=a.ppl))


if __name__ == "__main__":
    main()
