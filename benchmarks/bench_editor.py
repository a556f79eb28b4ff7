"""Editor benchmark on the embedded model (ratios measured in one run; never asserted in tests).

    .venv/bin/python benchmarks/bench_editor.py [--edits 20] [--repeats 20] [--config '{"bf16_steps": true}']

Prints: seconds per edit (sequential demo edits), and the forward-pass time with the editor attached
(switch on, AUTO mode) over the plain model's, for a single prompt and for a batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from microedit_lens import MicroEditConfig, MicroEditor, load_model, load_sae
from microedit_lens.editor import batch_tokens
from microedit_lens.facts import REFERENCE_PROMPTS, demo_requests


def timed_forward(model, toks, repeats: int) -> list[float]:
    out = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(toks)
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--config", default="{}", help="MicroEditConfig overrides as JSON")
    a = ap.parse_args()
    overrides = json.loads(a.config)
    model, sae = load_model(), load_sae()
    editor = MicroEditor(model, sae, MicroEditConfig(**overrides))
    editor.calibrate(REFERENCE_PROMPTS)
    reqs = demo_requests()[: a.edits]
    t0 = time.perf_counter()
    results = editor.edit(reqs)
    per_edit = (time.perf_counter() - t0) / len(reqs)
    single, _ = batch_tokens(model, [reqs[0].prompt])
    batch, mask = batch_tokens(model, REFERENCE_PROMPTS[:32])
    ratios = {}
    for name, toks in (("single_prompt", single), ("batch_32", batch)):
        timed_forward(model, toks, 2)  # warm-up
        plain, edited = [], []
        for _ in range(a.repeats):  # interleaved, so drift affects both alike
            with editor.detached():
                plain += timed_forward(model, toks, 1)
            edited += timed_forward(model, toks, 1)
        ratios[name] = {"plain_ms": 1e3 * statistics.median(plain), "attached_ms": 1e3 * statistics.median(edited),
                        "ratio": statistics.median(edited) / statistics.median(plain)}
    editor.detach()
    out = {
        "edits": len(reqs), "seconds_per_edit": per_edit,
        "mean_steps": statistics.mean(r.stage1.steps + r.stage2.steps for r in results),
        "mean_rows_trained": statistics.mean(r.n_latents for r in results),
        "success": sum(r.success for r in results) / len(results),
        "forward": ratios, "threads": torch.get_num_threads(), "bf16_steps": editor.bf16_steps,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "config_overrides": overrides,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
