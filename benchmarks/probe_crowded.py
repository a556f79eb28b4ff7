"""How much do a few more edits damage recent ones in a crowded decoder? Load a saved mid-run editor
(e.g. a lifelong run's checkpoint), make the next N edits of the same stream with config overrides,
and measure the 100 edits before them and the N new ones: share in scope (ARD <= tau on prompt +
target), median ARD, teacher-forced Reliability with the switch as is and forced on.

    python benchmarks/probe_crowded.py CKPT/T5000_editor ../shared/data/counterfact/counterfact-edit.json \\
        counterfact 40 --config '{"repair": false}' [--tau-quantile 0.05] [--before] [--refresh] [--route-only]

``--refresh`` re-measures the stored target sensitivities at the loaded decoder first (needed to
switch an editor made without ``keep_floor`` to it: ``--config '{"keep_floor": 2.0}' --refresh``).

Prints JSON lines. The saved editor is not modified (nothing is written back).
"""

import dataclasses
import json
import time

from microedit_lens.data import load_dataset
from microedit_lens.methods.microedit import MicroEditor
from _common import accuracy_by_mode, load_saved_editor, saved_editor_parser


def measure(editor: MicroEditor, records, tag: str, accuracy: bool = True) -> dict:
    P, Y = [r.prompt for r in records], [r.target for r in records]
    routing = editor.route([p + " " + y for p, y in zip(P, Y)])
    out = {"set": tag, "in_scope": routing.on.float().mean().item(), "ard_median": routing.ard.median().item()}
    if accuracy:
        out.update(accuracy_by_mode(editor, P, Y, "rel"))
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = saved_editor_parser(__doc__.splitlines()[0])
    ap.add_argument("--config", default="{}", help="MicroEditConfig overrides for the new edits (JSON)")
    ap.add_argument("--tau-quantile", type=float, default=None, help="re-track tau at this reference quantile first")
    ap.add_argument("--before", action="store_true", help="also measure the previous 100 edits before the new ones")
    ap.add_argument("--refresh", action="store_true", help="re-measure the stored target sensitivities first (refresh_sensitivities)")
    ap.add_argument("--route-only", action="store_true", help="measure routing only (no teacher-forced Reliability: minutes less on long sequences)")
    args = ap.parse_args()
    editor = load_saved_editor(args.editor)
    editor.cfg = dataclasses.replace(editor.cfg, **json.loads(args.config))
    if args.tau_quantile is not None:
        editor.retrack_tau(args.tau_quantile)
    if args.refresh:
        t = time.perf_counter()
        editor.refresh_sensitivities()
        print(json.dumps({"refresh_s": round(time.perf_counter() - t, 1)}), flush=True)
    n0 = editor.n_edits
    records = load_dataset(args.data, args.format, limit=n0 + args.n).records
    previous, new = records[max(0, n0 - 100):n0], records[n0:n0 + args.n]
    print(json.dumps({"n_edits": n0, "tau": editor.tau, "overrides": json.loads(args.config), "tau_quantile": args.tau_quantile}), flush=True)
    if args.before:
        print(json.dumps(measure(editor, previous, "previous_before", not args.route_only)), flush=True)
    t = time.perf_counter()
    results = editor.edit(new)
    print(json.dumps({"s_per_edit": round((time.perf_counter() - t) / len(new), 2),
                      "success": sum(r.success for r in results) / len(new), "tau_after": editor.tau}), flush=True)
    print(json.dumps(measure(editor, previous, "previous_after", not args.route_only)), flush=True)
    print(json.dumps(measure(editor, new, "new", not args.route_only)), flush=True)


if __name__ == "__main__":
    main()
