"""``microedit demo``: edit a handful of facts on the embedded model and show what happened."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from microedit_lens import metrics, viz
from microedit_lens.facts import REFERENCE_PROMPTS, demo_requests

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate(model: Any, prompt: str, n_tokens: int = 8) -> str:
    """Greedy continuation, recomputing the whole sequence each step (so a switch attached to the
    model judges the full input every time, as in scoring)."""
    ids = model.tokenizer(prompt, add_special_tokens=False).input_ids
    out: list[int] = []
    eos = getattr(model.tokenizer, "eos_token_id", None)
    for _ in range(n_tokens):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return model.tokenizer.decode(out)


@dataclass
class DemoReport:
    text: str
    html_path: Path | None
    reliability: float
    generalization: float
    locality: float
    seconds: float


def run_demo(n: int = 10, model_source: str | None = None, sae_source: str | None = None,
             html_path: str | Path | None = "microedit_demo.html", config: Any = None) -> DemoReport:
    from microedit_lens import MicroEditConfig, MicroEditor, load_model, load_sae

    t0 = time.perf_counter()
    model, sae = load_model(model_source), load_sae(sae_source)
    t_load = time.perf_counter() - t0
    editor = MicroEditor(model, sae, config or MicroEditConfig())
    cal = editor.calibrate(REFERENCE_PROMPTS)
    reqs = demo_requests()[:n]
    locs = [p for r in reqs for p in r.locality_prompts]
    with editor.detached():
        before = [generate(model, r.prompt, 6) for r in reqs]
        loc_pre = metrics.teacher_forced(model, locs, [""] * len(locs)).argmax
    t1 = time.perf_counter()
    results = editor.edit(reqs)
    t_edit = time.perf_counter() - t1
    pad = editor.padding
    after = [generate(model, r.prompt, 6) for r in reqs]
    para_after = [generate(model, r.paraphrases[0], 6) for r in reqs]
    rel = metrics.teacher_forced(model, [r.prompt for r in reqs], [r.target for r in reqs], padding=pad).accuracy()
    gen_pairs = [(p, r.target) for r in reqs for p in r.paraphrases]
    gen = metrics.teacher_forced(model, [p for p, _ in gen_pairs], [t for _, t in gen_pairs], padding=pad).accuracy()
    loc_post = metrics.teacher_forced(model, locs, [""] * len(locs), padding=pad).argmax
    loc = metrics.locality(loc_pre, loc_post)
    route = editor.route([r.prompt for r in reqs] + [r.paraphrases[0] for r in reqs] + locs)

    def one_line(text: str) -> str:
        return " ".join(text.split())

    rows = [(r.prompt, r.target, one_line(b), one_line(a), one_line(pa), f"{res.ard_after:.3g}")
            for r, b, a, pa, res in zip(reqs, before, after, para_after, results)]
    headers = ("prompt", "new target", "before", "after", "paraphrase after", "ARD after")
    lines = [f"MicroEdit demo: {len(reqs)} edits on SmolLM2-135M-Instruct, SAE at {editor.hook_name} "
             f"(d_sae={editor.sae.cfg.d_sae}, k={editor.sae.cfg.k}); tau={editor.tau:.4g} "
             f"(the {cal.quantile:.0%} quantile of {len(REFERENCE_PROMPTS)} reference prompts' ARD)", ""]
    lines += [" | ".join(headers)] + [" | ".join(map(str, row)) for row in rows]
    R, G, L = metrics.mean(rel), metrics.mean(gen), metrics.mean(loc)
    n_in = route.on.tolist()
    lines += ["", f"Reliability {R:.2f}  Generalization {G:.2f}  Locality {L:.2f}  (teacher-forced, WISE protocol)",
              f"switch: {sum(n_in[:n])}/{n} edit prompts, {sum(n_in[n:2 * n])}/{n} paraphrases, "
              f"{sum(n_in[2 * n:])}/{len(locs)} unrelated prompts routed through the edited SAE",
              f"load {t_load:.1f}s, {len(reqs)} edits {t_edit:.1f}s ({t_edit / len(reqs):.2f}s/edit), total {time.perf_counter() - t0:.1f}s"]
    text = "\n".join(lines)

    out_path = None
    if html_path is not None:
        report = viz.HTMLReport("microedit-lens demo")
        report.add(f"<pre>{lines[0]}</pre>")
        report.add(viz.table_html(headers, rows))
        report.add(f"<p>{lines[-3]}<br>{lines[-2]}<br>{lines[-1]}</p>")
        report.add("<h2>Switch: per-token reconstruction distance</h2>")
        for v in viz.ard_view(editor, [reqs[0].prompt, reqs[0].paraphrases[0], locs[0]]):
            report.add(v)
        report.add("<h2>Latents each edit trained</h2>")
        for res in results[:3]:
            report.add(viz.touched_latents_view(editor, res))
        report.add("<h2>Next-token distributions</h2>")
        for v in viz.next_token_view(editor, reqs[0]):
            report.add(v)
        out_path = report.save(html_path)
        text += f"\nHTML report: {out_path}"
    editor.detach()
    return DemoReport(text, out_path, R, G, L, time.perf_counter() - t0)
