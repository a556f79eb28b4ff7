"""Merge lifelong results written by separate runs (e.g. one process per T, run side by side on the
cores) into one JSON + markdown table in the paper's layout:

    python benchmarks/merge_results.py OUT.json RUN_T1.json RUN_T10.json RUN_T100.json [--ppl]
"""

from __future__ import annotations

import argparse
import sys

from microedit_lens.lifelong import SweepResult


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--ppl", action="store_true", help="markdown in the hallucination layout (PPL, Loc)")
    a = ap.parse_args()
    merged = SweepResult.merge([SweepResult.from_json(p) for p in a.runs])
    sys.stdout.write(merged.write(a.out, ppl=a.ppl))


if __name__ == "__main__":
    main()
