"""Time the next N edits of a stream from a saved editor (e.g. a lifelong run's mid-run checkpoint):
seconds per edit, steps, and what the held steps' constraint solves cost (count, entries, constraints,
seconds); optionally a cProfile table, and the decoder after the edits saved or compared with one saved
by another code version on the same edits.

    python benchmarks/late_edits.py CKPT/T5000_editor ../shared/data/counterfact/counterfact-edit.json \\
        counterfact 8 [--profile 25] [--save OUT.pt] [--compare OTHER.pt]

Run it with ``PYTHONPATH=<a checkout>`` to time that checkout's code on the same editor and records.
Prints one JSON line. The saved editor is not modified (nothing is written back).
"""

import contextlib
import cProfile
import io
import json
import pstats
import time
from typing import Any, Iterator, Sequence

import torch

from microedit_lens import EditRequest
from microedit_lens.data import load_dataset
from microedit_lens.methods.microedit import MicroEditor
from _common import load_saved_editor, saved_editor_parser


@contextlib.contextmanager
def recording_solves() -> Iterator[list[dict[str, float]]]:
    """Record every ``_solve_constraints`` call (entries, constraints, rows, seconds) while inside;
    the method is restored on exit."""
    calls: list[dict[str, float]] = []
    original = MicroEditor.__dict__["_solve_constraints"]
    solve = original.__func__

    def recorded(cons: Any, P: Any, rhs: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
        t = time.perf_counter()
        out = solve(cons, P, rhs, ridge)
        calls.append({"entries": len(cons.atom), "constraints": cons.n_constraints, "rows": cons.At.shape[0],
                      "seconds": time.perf_counter() - t})
        return out

    MicroEditor._solve_constraints = staticmethod(recorded)
    try:
        yield calls
    finally:
        MicroEditor._solve_constraints = original


def timed_edits(editor: MicroEditor, records: Sequence[EditRequest]) -> dict[str, Any]:
    """Make the edits one by one; per-edit seconds, steps and success, and the solves' totals."""
    secs, steps, met = [], [], []
    with recording_solves() as calls:
        for r in records:
            t = time.perf_counter()
            res = editor.edit(r)[0]
            secs.append(time.perf_counter() - t)
            steps.append(res.stage2.steps)
            met.append(bool(res.success))
    n = max(len(calls), 1)
    return {"edits": len(records), "s_per_edit": sum(secs) / max(len(secs), 1), "seconds": [round(s, 2) for s in secs],
            "steps": steps, "met": sum(met), "solves": len(calls), "solve_s": sum(c["seconds"] for c in calls),
            "solve_entries_mean": sum(c["entries"] for c in calls) / n, "solve_entries_max": max((c["entries"] for c in calls), default=0),
            "solve_constraints_mean": sum(c["constraints"] for c in calls) / n,
            "solve_constraints_max": max((c["constraints"] for c in calls), default=0)}


def main() -> None:
    ap = saved_editor_parser(__doc__.splitlines()[0])
    ap.add_argument("--profile", type=int, default=0, help="also print cProfile's top N functions by own time")
    ap.add_argument("--save", help="save the decoder after the edits (torch.save) to compare code versions")
    ap.add_argument("--compare", help="a decoder saved by --save: report the largest difference")
    args = ap.parse_args()
    editor = load_saved_editor(args.editor)
    n0 = editor.n_edits
    records = load_dataset(args.data, args.format, limit=n0 + args.n).records[n0:n0 + args.n]
    prof = cProfile.Profile() if args.profile else None
    with prof if prof is not None else contextlib.nullcontext():
        out = {"after_edits": n0, **timed_edits(editor, records)}
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.profile)
        print(s.getvalue())
    W = editor.sae.W_dec.detach()
    if args.save:
        torch.save(W.clone(), args.save)
    if args.compare:
        other = torch.load(args.compare)
        diff = (W - other).abs()
        out["compare"] = {"max_abs_diff": float(diff.max()), "rows_differing": int((diff.amax(1) > 0).sum())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
