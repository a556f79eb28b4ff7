"""Where a saved editor's edited prompts and their paraphrases get their ARD, position by position:
the ARD of ``prompt + target`` and of ``paraphrase + target`` (the sequences teacher-forced scoring
feeds the switch), split into the share from the subject's tokens, from the prompt's other tokens and
from the target's tokens, in units of tau, under the current decoder and under the unedited one;
averaged over the edits in ``--bins`` bins by edit order, with the share of sequences in scope.

    python benchmarks/ard_parts.py EDITOR_DIR DATA_FILE [--format zsre] [--bins 3]

EDITOR_DIR is a ``MicroEditor.save`` directory whose edits are the first ``n_edits`` records of
DATA_FILE (a lifelong run's ``CKPT_DIR/T<T>_final_editor``). Records need a ``subject`` (ZsRE and
CounterFact have one); a subject not found in a sequence counts as "other". Prints one JSON line per
bin and sequence kind. The three parts sum to the sequence's ARD / tau (position 0 is excluded, as
in the switch).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

import torch

from microedit_lens import load_model
from microedit_lens.data import load_dataset
from microedit_lens.methods.microedit import MicroEditor
from microedit_lens.metrics import encode_pair
from microedit_lens.switch import sparse_decode, valid_positions

PARTS = ("subject", "other", "target")


def subject_positions(tokenizer: Any, prompt_ids: Sequence[int], subject: str | None) -> torch.Tensor:
    """Which prompt tokens overlap the (first) occurrence of ``subject`` in the decoded prompt."""
    mask = torch.zeros(len(prompt_ids), dtype=torch.bool)
    text = tokenizer.decode(prompt_ids)
    start = text.find(subject) if subject else -1
    if start < 0:
        return mask
    ends = [len(tokenizer.decode(prompt_ids[: i + 1])) for i in range(len(prompt_ids))]
    for i, hi in enumerate(ends):
        lo = ends[i - 1] if i else 0
        mask[i] = hi > start and lo < start + len(subject)
    return mask


@torch.no_grad()
def parts_over_tau(editor: MicroEditor, text: str, target: str, subject: str | None,
                   decoders: Sequence[torch.Tensor]) -> list[list[float]]:
    """Per decoder in ``decoders`` (``W_dec`` values): the (subject, other, target) shares of the ARD
    of ``text + target``, over tau. The model runs once: the codes do not depend on the decoder."""
    tok = editor.model.tokenizer
    p, a = encode_pair(tok, text, target)
    z, vals, idx = editor._clean_and_codes(torch.tensor(p + a)[None])
    valid = valid_positions(1, len(p) + len(a), editor.cfg.skip_first, z.device)[0]
    subj = torch.cat([subject_positions(tok, p, subject), torch.zeros(len(a), dtype=torch.bool)])
    tgt = torch.arange(len(p) + len(a)) >= len(p)
    norm = editor.cfg.alpha * int(valid.sum()) * editor.switch.tau
    out = []
    for W_dec in decoders:
        err = ((sparse_decode(vals, idx, W_dec, editor.sae.b_dec) - z) ** 2).sum(-1)[0].float()
        out.append([float(err[m & valid].sum()) / norm for m in (subj, ~subj & ~tgt, tgt)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("editor_dir")
    ap.add_argument("data")
    ap.add_argument("--format", default=None, help="data format (default: detected from the file)")
    ap.add_argument("--bins", type=int, default=3, help="bins by edit order (default 3)")
    a = ap.parse_args()
    model = load_model()
    ed = MicroEditor.load(a.editor_dir, model, attach=False)
    n = ed.n_edits
    recs = load_dataset(a.data, format=a.format, limit=n).records
    rows: dict[tuple[str, int], list[list[float]]] = {}
    for i, r in enumerate(recs):
        kinds = [("prompt", r.prompt)] + ([("paraphrase", r.paraphrases[0])] if r.paraphrases else [])
        for kind, text in kinds:
            now, before = parts_over_tau(ed, text, r.target, r.subject, (ed.sae.W_dec, ed._W_dec0))
            rows.setdefault((kind, i * a.bins // n), []).append(now + before)
    for (kind, b), v in sorted(rows.items()):
        t = torch.tensor(v)
        now, before = t[:, :3], t[:, 3:]
        print(json.dumps({
            "kind": kind, "edits": [b * n // a.bins, (b + 1) * n // a.bins], "tau": ed.switch.tau,
            "in_scope": round(float((now.sum(1) <= 1.0).float().mean()), 3),
            "ard_over_tau": round(float(now.sum(1).mean()), 3),
            "parts_over_tau": {k: round(float(x), 3) for k, x in zip(PARTS, now.mean(0))},
            "unedited_ard_over_tau": round(float(before.sum(1).mean()), 3),
            "unedited_parts_over_tau": {k: round(float(x), 3) for k, x in zip(PARTS, before.mean(0))},
        }))


if __name__ == "__main__":
    main()
