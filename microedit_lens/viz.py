"""circuitsvis views of edits, rendered fully offline.

circuitsvis's own objects pick the CDN build unless they fail to reach the internet (which they test
by calling out); these views always use the JavaScript bundled inside the circuitsvis package, and an
:class:`HTMLReport` inlines that bundle once for any number of views.

Views:
* :func:`touched_latents_view`: per-token activations of the SAE latents an edit trained.
* :func:`ard_view`: per-token reconstruction distance ``||z_hat_s - z_s||^2 / alpha`` of texts,
  before and after the edits, with the per-input ARD and switch decision in the labels.
* :func:`next_token_view`: the model's next-token distributions on a prompt + target before and after
  the edits (circuitsvis ``TokenLogProbs``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from uuid import uuid4

import torch
from circuitsvis.utils.convert_props import convert_props

from microedit_lens.editor import tokenize_request
from microedit_lens.switch import sparse_decode
from microedit_lens.types import EditRequest, EditResult


def _bundle() -> str:
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script>", "")


@dataclass
class View:
    """One circuitsvis element: its React component name and props."""

    component: str
    props: dict[str, Any]
    title: str = ""

    def div(self) -> str:
        uid = "cv-" + uuid4().hex[:12]
        return (f'<h3>{html.escape(self.title)}</h3><div id="{uid}" style="margin: 10px 0;"></div>'
                f'<script>CircuitsVis.render("{uid}", CircuitsVis.{self.component}, {convert_props(self.props)});</script>')

    def _repr_html_(self) -> str:
        """Notebook display: offline (bundled JS inlined), never a network check."""
        return f"<script>{_bundle()}</script>" + self.div()


@dataclass
class HTMLReport:
    """A standalone HTML page of views and HTML fragments (tables), JavaScript inlined once."""

    title: str
    parts: list[View | str] = field(default_factory=list)

    def add(self, part: View | str) -> None:
        self.parts.append(part)

    def render(self) -> str:
        body = "\n".join(p.div() if isinstance(p, View) else p for p in self.parts)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                "<style>body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px} th{background:#f4f4f4}</style>"
                f"<script>{_bundle()}</script></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path


def _str_tokens(model: Any, ids: Sequence[int]) -> list[str]:
    return [model.tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def touched_latents_view(editor: Any, result: EditResult, max_latents: int = 64) -> View:
    """Per-token activations of the latents ``result``'s edit trained (the most active first)."""
    seq = tokenize_request(editor.model, result.request)
    with editor.detached():
        z = editor.site.clean_activation(seq.tokens[None])
    acts = editor.sae.encode(z)[0]  # [seq, d_sae]
    acts[: editor.cfg.skip_first] = 0
    rows = (acts > 0).any(0).nonzero().squeeze(1)
    order = acts[:, rows].amax(0).argsort(descending=True)[:max_latents]
    rows = rows[order]
    return View(
        "TextNeuronActivations",
        dict(tokens=_str_tokens(editor.model, seq.tokens), activations=acts[:, rows][:, None, :].tolist(),
             firstDimensionName="SAE", secondDimensionName="Latent", firstDimensionLabels=[editor.hook_name],
             secondDimensionLabels=[f"latent {int(r)}" for r in rows]),
        title=f"Latents trained by edit {result.index}: {result.request.prompt!r} -> {result.request.target!r} ({result.n_latents} rows)",
    )


@torch.no_grad()
def per_token_distance(editor: Any, text: str, W_dec: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor, float]:
    """Tokens, per-token ``||z_hat - z||^2 / alpha`` (0 at skipped positions) and the input's ARD."""
    ids = editor.model.tokenizer(text, add_special_tokens=False).input_ids
    toks = torch.tensor([ids])
    with editor.detached():
        z = editor.site.clean_activation(toks)
    vals, idx = editor._codes(z)
    recon = sparse_decode(vals, idx, editor.sae.W_dec if W_dec is None else W_dec, editor.sae.b_dec)
    d = ((recon - z) ** 2).sum(-1)[0] / editor.cfg.alpha
    d[: editor.cfg.skip_first] = 0
    n = max(len(ids) - editor.cfg.skip_first, 1)
    return _str_tokens(editor.model, ids), d, float(d.sum() / n)


def ard_view(editor: Any, texts: Sequence[str], title: str = "Per-token reconstruction distance") -> list[View]:
    """For each text: per-token distance before any edit and now, labelled with ARD and the switch."""
    views = []
    tau = editor.tau if editor.tau is not None else float("nan")
    for t in texts:
        tokens, before, ard_b = per_token_distance(editor, t, editor._W_dec0)
        _, after, ard_a = per_token_distance(editor, t)
        labels = [f"before edits (ARD {ard_b:.3g}, {'in' if ard_b <= tau else 'out of'} scope)",
                  f"after edits (ARD {ard_a:.3g}, {'in' if ard_a <= tau else 'out of'} scope)"]
        views.append(View("ColoredTokensMulti", dict(tokens=tokens, values=torch.stack([before, after], 1).tolist(), labels=labels),
                          title=f"{title} (tau = {tau:.3g}): {t[:80]!r}"))
    return views


@torch.no_grad()
def next_token_view(editor: Any, request: EditRequest, top_k: int = 10) -> list[View]:
    """Next-token distributions over prompt + target, plain model vs edited model."""
    seq = tokenize_request(editor.model, request)
    toks = seq.tokens[None]
    with editor.detached():
        before = editor.model(toks)[0].log_softmax(-1)
    with editor.attached():
        after = editor.model(toks)[0].log_softmax(-1)
    out = []
    ids = seq.tokens
    for name, lp in (("before", before), ("after", after)):
        lp = lp[:-1]  # circuitsvis: no prediction shown for the last position
        top = lp.topk(top_k, -1)
        nxt = ids[1:]
        out.append(View("TokenLogProbs", dict(
            prompt=_str_tokens(editor.model, ids),
            topKLogProbs=top.values.tolist(),
            topKTokens=[_str_tokens(editor.model, row) for row in top.indices.tolist()],
            correctTokenRank=(lp > lp.gather(-1, nxt[:, None])).sum(-1).tolist(),
            correctTokenLogProb=lp.gather(-1, nxt[:, None]).squeeze(1).tolist(),
        ), title=f"Next-token distributions {name} the edits: {request.prompt!r} + {request.target!r}"))
    return out


def table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
