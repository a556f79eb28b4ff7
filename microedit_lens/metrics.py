"""Scoring, following the WISE / EasyEdit protocol.

* **Reliability / Generalization**: teacher-forced token accuracy of the target. The input is
  ``prompt_ids + target_ids`` (each tokenized on its own, no BOS; the target with its joining space,
  see :attr:`EditRequest.target_text`); the score is the share of target tokens that are the argmax at
  the position before them (EasyEdit ``test_prediction_acc``).
* **Locality**: the argmax tokens at the answer positions of ``locality_prompt + locality_answer``
  after the edits, compared with the same tokens computed before any edit; the share unchanged.
* **Perplexity** (hallucination data): ``exp(mean NLL of the target tokens)`` after the prompt.
* **Generative exact match** (our addition; teacher-forced scores flatter editors): greedy decoding of
  ``len(target_ids)`` tokens after the prompt equals the target ids.

All functions run right-padded batches (exact for causal models: real positions never attend to the
padding on their right), sorted by length so that little of a batch is padding, and announce the
padding to the editing method through ``padding`` so the switch's ARD ignores it. Given a
:class:`LowerCache`, they run only the blocks an editing method can change (see there).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from jaxtyping import Float, Int

PaddingContext = Callable[[torch.Tensor], ContextManager[Any]]


def _no_padding(_: torch.Tensor) -> ContextManager[Any]:
    return nullcontext()


@dataclass
class TeacherForced:
    """Per-pair results of one teacher-forced pass."""

    argmax: list[torch.Tensor]
    """Argmax token at each target position."""
    targets: list[torch.Tensor]
    nll: list[torch.Tensor]
    """Per-token negative log-likelihood of the target."""

    def accuracy(self) -> list[float]:
        return [float((a == t).float().mean()) for a, t in zip(self.argmax, self.targets)]

    def perplexity(self) -> list[float]:
        return [math.exp(float(n.mean())) for n in self.nll]


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt and answer (the answer with a joining space when neither side has one).
    An empty answer is allowed (locality prompts without an answer) and gives no answer ids."""
    if answer and not prompt[-1:].isspace() and not answer[0].isspace():
        answer = " " + answer
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    a = tokenizer(answer, add_special_tokens=False).input_ids if answer else []
    if not p or (answer.strip() and not a):
        raise ValueError(f"empty prompt or answer after tokenization: {prompt[:60]!r} / {answer[:60]!r}")
    return p, a


def scored_positions(n_prompt: int, n_answer: int) -> torch.Tensor:
    """Positions whose logits are scored: those predicting the answer tokens or, for an empty answer,
    every position of the prompt (the locality of a bare prompt: all its next-token argmaxes)."""
    if n_answer:
        return torch.arange(n_prompt - 1, n_prompt + n_answer - 1)
    return torch.arange(0, n_prompt)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Int[torch.Tensor, "b s"], torch.Tensor]:
    n = max(len(s) for s in seqs)
    toks = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    pad = torch.ones(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        toks[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        pad[i, : len(s)] = False
    return toks, pad


def _by_length(pairs: Sequence[tuple[list[int], list[int]]], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``pairs`` in batches of similar total length (shortest first)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


@dataclass
class ModelInput:
    """A right-padded batch for :func:`logits_at`: its token ids and, optionally, the residual stream
    entering block ``start`` for them (from a :class:`LowerCache`), so the pass runs the blocks from
    ``start`` on only."""

    tokens: Int[torch.Tensor, "b s"]
    resid: Float[torch.Tensor, "b s d"] | None = None
    start: int = 0


class LowerCache:
    """The residual stream entering block ``layer`` (the output of the blocks below it) per token
    sequence, computed once by the model's lower blocks.

    An editing method that changes nothing below block ``layer``
    (:attr:`~microedit_lens.methods.base.EditMethod.unchanged_blocks`) leaves those blocks' outputs as
    the plain model's, so every scoring pass over a sequence (before and after the edits, teacher-forced
    and each greedy step over a prefix of it) can start at block ``layer``. Exact: the blocks are causal
    and batches right-padded, so a prefix's residual is the prefix of its sequence's. Entries are float
    tensors of ``[len, d_model]``; :meth:`scoped` drops what a block of code added."""

    def __init__(self, model: Any, layer: int, batch_size: int = 32):
        if not self.supports(model):
            raise ValueError("a LowerCache needs a TransformerLens model (cfg.n_layers and blocks)")
        n_layers = model.cfg.n_layers
        if not 0 < layer <= n_layers:
            raise ValueError(f"layer must be in 1..{n_layers} (blocks below it are cached), got {layer}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.layer, self.batch_size = model, layer, batch_size
        self._resid: dict[tuple[int, ...], torch.Tensor] = {}

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether ``model`` can run from a block on (a TransformerLens model: ``cfg.n_layers``, ``blocks``)."""
        return hasattr(getattr(model, "cfg", None), "n_layers") and hasattr(model, "blocks")

    def __len__(self) -> int:
        return len(self._resid)

    @torch.no_grad()
    def add(self, seqs: Sequence[Sequence[int]]) -> None:
        """Compute the residuals of the sequences not cached yet (batched by length)."""
        todo = sorted({tuple(s) for s in seqs} - self._resid.keys(), key=len)
        dev = self.model.cfg.device
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            toks, _ = _pad(chunk, 0)  # the pad id is never seen by a real position
            out = self.model(toks.to(dev), stop_at_layer=self.layer)
            for j, s in enumerate(chunk):
                self._resid[s] = out[j, : len(s)].clone()

    def inputs(self, tokens: Int[torch.Tensor, "b s"], pad: torch.Tensor, keys: Sequence[Sequence[int]]) -> ModelInput:
        """The right-padded ``tokens`` (``pad`` True = padding) with their residuals (zero at padding);
        row ``j``'s real tokens must be a prefix of the cached sequence ``keys[j]``."""
        stored = [self._resid[tuple(k)] for k in keys]
        resid = stored[0].new_zeros(tokens.shape[0], tokens.shape[1], stored[0].shape[-1])
        for j, (r, n) in enumerate(zip(stored, (~pad).sum(1).tolist())):
            if n > len(r) or tuple(tokens[j, :n].tolist()) != tuple(keys[j][:n]):
                raise ValueError(f"row {j} of the batch is not a prefix of its cached sequence")
            resid[j, :n] = r[:n]
        return ModelInput(tokens, resid, self.layer)

    @contextmanager
    def scoped(self) -> Iterator["LowerCache"]:
        """Entries added inside the block are dropped on exit (in ``finally``)."""
        before = set(self._resid)
        try:
            yield self
        finally:
            for k in [k for k in self._resid if k not in before]:
                del self._resid[k]


def _scored_batch(chunk: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Right-padded ``prompt + answer`` tokens, pad mask, scored positions per pair and their row ids."""
    toks, pad = _pad([p + a for p, a in chunk], pad_id)
    pos = [scored_positions(len(p), len(a)) for p, a in chunk]
    rows = torch.cat([torch.full((len(q),), j) for j, q in enumerate(pos)])
    return toks, pad, pos, rows


def _encode_all(model: Any, prompts: Sequence[str], answers: Sequence[str]) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Token ids of every (prompt, answer) pair and the padding id."""
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return [encode_pair(tok, p, a) for p, a in zip(prompts, answers)], pad_id


def logits_at(model: Any, toks: "Int[torch.Tensor, 'b s'] | ModelInput", rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at the positions ``(rows[i], cols[i])`` only, shape [n, vocab]. On a TransformerLens model
    the unembedding (a fifth of a small model's forward) runs only there; other models run in full.
    A :class:`ModelInput` with residuals starts the pass at their block."""
    x = toks if isinstance(toks, ModelInput) else ModelInput(toks)
    cfg = getattr(model, "cfg", None)
    if x.resid is None and (cfg is None or not hasattr(model, "unembed") or not hasattr(model, "ln_final")):
        return model(x.tokens)[rows, cols]
    from microedit_lens.models import final_logits

    if x.resid is None:
        final = model(x.tokens, stop_at_layer=cfg.n_layers)
    else:
        final = model(x.resid, start_at_layer=x.start, stop_at_layer=cfg.n_layers)
    return final_logits(model, final[rows, cols])


def _input(toks: torch.Tensor, pad: torch.Tensor, keys: Sequence[Sequence[int]], lower: LowerCache | None, device: Any) -> "torch.Tensor | ModelInput":
    """What :func:`logits_at` runs on (``keys``: each row's full cached sequence, with ``lower``)."""
    toks = toks.to(device)
    return toks if lower is None else lower.inputs(toks, pad, keys)


@torch.no_grad()
def teacher_forced(
    model: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    padding: PaddingContext = _no_padding,
    lower: LowerCache | None = None,
) -> TeacherForced:
    """Argmax and NLL at every answer position of ``prompt + answer`` (in the order given). With
    ``lower``, the blocks below ``lower.layer`` are taken from it (computed there once per sequence)."""
    pairs, pad_id = _encode_all(model, prompts, answers)
    longest = max((len(p) + len(a) for p, a in pairs), default=0)
    if longest > model.cfg.n_ctx:
        raise ValueError(f"a scored sequence is {longest} tokens, longer than the context {model.cfg.n_ctx}")
    if lower is not None:
        lower.add([p + a for p, a in pairs])
    per_pair: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [None] * len(pairs)  # type: ignore[list-item]
    dev = model.cfg.device
    for idx in _by_length(pairs, batch_size):
        chunk = [pairs[i] for i in idx]
        toks, pad, pos, rows = _scored_batch(chunk, pad_id)
        x = _input(toks, pad, [p + a for p, a in chunk], lower, dev)
        with padding(pad):
            logits = logits_at(model, x, rows.to(dev), torch.cat(pos).to(dev))
        lp = logits.float().log_softmax(-1).cpu().split([len(q) for q in pos])
        for j, (i, (p, a)) in enumerate(zip(idx, chunk)):
            tgt = torch.tensor(a if a else p[1:] + [pad_id], dtype=torch.long)
            per_pair[i] = (lp[j].argmax(-1), tgt, -lp[j].gather(-1, tgt[:, None]).squeeze(-1))
    return TeacherForced([a for a, _, _ in per_pair], [t for _, t, _ in per_pair], [n for _, _, n in per_pair])


PrefixLogits = Callable[["Int[torch.Tensor, 'b s'] | ModelInput", torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""``(tokens, pad_mask, rows, cols) -> logits [n, vocab]`` at positions ``(rows[i], cols[i])``, each as
if its input ended at that position (``tokens`` as :func:`logits_at` takes them: ids, or a
:class:`ModelInput`); ``None`` when the model cannot provide that in one pass (see
:meth:`~microedit_lens.methods.base.EditMethod.prefix_logits_at`)."""


@torch.no_grad()
def greedy_exact_match(
    model: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    padding: PaddingContext = _no_padding,
    prefix_logits: PrefixLogits | None = None,
    stepwise_steps: int = 2,
    lower: LowerCache | None = None,
) -> list[bool]:
    """Does greedy decoding of ``len(answer_ids)`` tokens after each prompt give the answer ids?

    Decoding steps are forward passes over the whole decoded sequence (full recomputation, so a switch
    sees all of it), and a sequence stops at its first wrong token. Step ``i`` only matters when steps
    ``0..i-1`` produced the answer's first ``i`` tokens, so its input is then ``prompt + answer[:i]``;
    with ``prefix_logits`` (a switched editor: position ``p`` of a longer input may be routed otherwise
    than the input cut after ``p``), the sequences still undecided after ``stepwise_steps`` steps (most
    misses fail at the first token) are finished in one batched call that gives every remaining step.
    With ``lower``, every pass starts at its block (the decoded inputs are prefixes of prompt+answer)."""
    pairs, pad_id = _encode_all(model, prompts, answers)
    if lower is not None:
        lower.add([p + a for p, a in pairs])
    result: list[bool] = [False] * len(pairs)
    for idx in _by_length(pairs, batch_size):
        chunk = [pairs[i] for i in idx]
        ok = _exact_match_stepwise(model, chunk, pad_id, padding, stepwise_steps if prefix_logits is not None else None, lower)
        rest = [j for j, v in enumerate(ok) if v is None]
        if rest and prefix_logits is not None:  # (only then can sequences be undecided)
            fast = _exact_match_one_pass(model, [chunk[j] for j in rest], pad_id, prefix_logits, lower)
            if fast is None:
                fast = _exact_match_stepwise(model, [chunk[j] for j in rest], pad_id, padding, None, lower)
            for j, v in zip(rest, fast):
                ok[j] = v
        for i, v in zip(idx, ok):
            result[i] = bool(v)
    return result


def _exact_match_one_pass(model: Any, chunk: Sequence[tuple[list[int], list[int]]], pad_id: int, prefix_logits: PrefixLogits,
                          lower: LowerCache | None = None) -> list[bool] | None:
    """Every step of every (non-empty) answer at once, from logits of the prompt+answer's prefixes."""
    toks, pad, pos, rows = _scored_batch(chunk, pad_id)
    dev = model.cfg.device
    x = _input(toks, pad, [p + a for p, a in chunk], lower, dev)
    logits = prefix_logits(x, pad.to(dev), rows.to(dev), torch.cat(pos).to(dev))
    if logits is None:
        return None
    hits = logits.argmax(-1).cpu().split([len(q) for q in pos])
    return [bool((h == torch.tensor(a)).all()) for h, (_, a) in zip(hits, chunk)]


def _exact_match_stepwise(
    model: Any, chunk: Sequence[tuple[list[int], list[int]]], pad_id: int, padding: PaddingContext, max_steps: int | None,
    lower: LowerCache | None = None,
) -> list[bool | None]:
    """Greedy decoding for at most ``max_steps`` steps; ``None`` for sequences not decided by then."""
    seqs = [list(p) for p, _ in chunk]
    ok: list[bool | None] = [True] * len(chunk)
    for step in range(max(len(a) for _, a in chunk)):
        active = [j for j, (_, a) in enumerate(chunk) if ok[j] and step < len(a)]
        if not active:
            break
        if max_steps is not None and step >= max_steps:
            for j in active:
                ok[j] = None
            break
        toks, pad = _pad([seqs[j] for j in active], pad_id)
        last = torch.tensor([len(seqs[j]) - 1 for j in active])
        # an active sequence has decoded its answer's first tokens so far: a prefix of prompt + answer
        x = _input(toks, pad, [chunk[j][0] + chunk[j][1] for j in active], lower, model.cfg.device)
        with padding(pad):
            logits = logits_at(model, x, torch.arange(len(active)).to(model.cfg.device), last.to(model.cfg.device))
        for row, j in enumerate(active):
            token = int(logits[row].argmax())
            seqs[j].append(token)
            ok[j] = token == chunk[j][1][step]
    return ok


def locality(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> list[float]:
    """Share of answer-position argmax tokens unchanged (per pair)."""
    if len(pre) != len(post):
        raise ValueError("pre and post differ in length")
    return [float((a == b).float().mean()) for a, b in zip(pre, post)]


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
