"""How well do a few terms describe an earlier edit's scope constraint? Load a saved mid-run editor,
make its stream's next N edits with every position in the scope constraints (``scope_positions=None``)
and, for every scope constraint a held step linearises, report how the constraint's gradient w.r.t.
the trained rows (``C_j = sum_p a_p g_p^T`` over the edit's positions) is spread: its positions and
rows, the share of its squared norm in its 1 / 4 / 8 / 16 leading singular terms, and the cosine
between it and the part of its 4 positions that ``scope_positions=4`` keeps.

    python benchmarks/scope_spectrum.py CKPT/T600_editor ../shared/data/hallucination/hallucination-edit.json \\
        hallucination 1 [--out spectrum.json]

Prints JSON lines (one summary per quantity). The saved editor is not modified.
"""

import contextlib
import dataclasses
import json
import statistics
from typing import Iterator

import torch

from microedit_lens.data import load_dataset
from microedit_lens.editor import entries_of
from microedit_lens.methods import microedit as me
from _common import load_saved_editor, saved_editor_parser


def spread(scope, chosen: torch.Tensor, at: torch.Tensor) -> list[dict]:
    """One row per chosen constraint (see the module docstring)."""
    pos, con = entries_of(scope.constraint, scope.n_constraints, chosen)
    G = scope.gradient(at.to(torch.float64), pos)
    A = scope.A.index_select(0, pos).to_dense().double()
    rows_out = []
    for j in range(len(chosen)):
        sel = con == j
        Aj, Gj = A[sel], G[sel]
        rows = (Aj != 0).any(0)
        C = Aj[:, rows].T @ Gj
        s2 = torch.linalg.svdvals(C) ** 2
        share = (s2.cumsum(0) / s2.sum()).tolist()
        top = torch.argsort(Gj.norm(dim=1) * Aj.norm(dim=1), descending=True)[:4]
        C4 = Aj[top][:, rows].T @ Gj[top]
        row = {"positions": int(sel.sum()), "rows": int(rows.sum()),
               "cos_top4_positions": float((C4 * C).sum() / (C4.norm() * C.norm()))}
        row.update({f"share_{k}": share[min(k, len(share)) - 1] for k in (1, 4, 8, 16)})
        rows_out.append(row)
    return rows_out


@contextlib.contextmanager
def recording(into: list[dict]) -> Iterator[None]:
    """Record :func:`spread` of every scope constraint built inside the block (restored in ``finally``)."""
    original = me._Constraints.__dict__["scope"]

    def scope(cls, scope, chosen, at, *args, **kwargs):
        into.extend(spread(scope, chosen, at))
        return original.__func__(cls, scope, chosen, at, *args, **kwargs)

    me._Constraints.scope = classmethod(scope)
    try:
        yield
    finally:
        me._Constraints.scope = original


def main() -> None:
    ap = saved_editor_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write every constraint's row (JSON)")
    args = ap.parse_args()
    editor = load_saved_editor(args.editor)
    editor.cfg = dataclasses.replace(editor.cfg, scope_positions=None, scope_rank=None)
    n0 = editor.n_edits
    records = load_dataset(args.data, args.format, limit=n0 + args.n).records[n0:n0 + args.n]
    rows: list[dict] = []
    with recording(rows):
        results = editor.edit(records)
    print(json.dumps({"n_edits": n0, "new_edits": len(results), "met_rule": sum(r.success for r in results), "constraints": len(rows)}))
    for k in rows[0] if rows else []:
        v = [r[k] for r in rows]
        print(json.dumps({"quantity": k, "median": statistics.median(v), "min": min(v), "max": max(v)}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
