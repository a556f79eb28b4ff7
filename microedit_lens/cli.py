"""The ``microedit`` command line. Each sub-command is a thin wrapper over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

logger = logging.getLogger("microedit_lens.cli")

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str):
    """Register a sub-command: the decorated function adds arguments and returns its runner."""

    def deco(add_args: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]):
        _COMMANDS[name] = (help_text, add_args)  # type: ignore[assignment]
        return add_args

    return deco


@command("train-sae", "train a TopK SAE with SAELens's trainer on local text files")
def _train_sae_args(p: argparse.ArgumentParser):
    p.add_argument("--text", nargs="+", required=True, help="text files or folders")
    p.add_argument("--heldout-text", nargs="*", default=[], help="files used only for measurement")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="model source (default: embedded SmolLM2)")
    p.add_argument("--hook", default="blocks.24.hook_resid_post")
    p.add_argument("--width", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=3_000_000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--no-autocast", action="store_true", help="harvest activations in fp32 (default: bf16 autocast where the CPU runs bf16 natively)")
    p.add_argument("--checkpoints", type=int, default=0, help="intermediate SAE checkpoints to save")

    def run(a: argparse.Namespace) -> int:
        from microedit_lens.sae_training import TrainSAEConfig, train_sae

        cfg = TrainSAEConfig(
            text_files=a.text, heldout_files=a.heldout_text, output_dir=a.out, model=a.model,
            hook_name=a.hook, d_sae=a.width, k=a.k, training_tokens=a.tokens, lr=a.lr,
            context_size=a.context_size, autocast_lm=False if a.no_autocast else None, n_checkpoints=a.checkpoints,
        )
        out, q = train_sae(cfg)
        sys.stdout.write(json.dumps({"sae": str(out), **q.to_dict()}, indent=1) + "\n")
        return 0

    return run


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model source (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sae", default=None, help="SAE directory (default: the SAE shipped for the embedded model)")


def _method_config(a: argparse.Namespace):
    from microedit_lens.methods import get_method

    entry = get_method(a.method)
    overrides = json.loads(a.config) if getattr(a, "config", None) else {}
    return entry.config_class(**overrides)


@command("sae-quality", "measure an SAE on held-out text: L0, FVU, CE loss recovered")
def _sae_quality_args(p: argparse.ArgumentParser):
    _add_model_args(p)
    p.add_argument("--text", nargs="+", required=True, help="held-out text files")
    p.add_argument("--windows", type=int, default=256, help="128-token windows to measure on")

    def run(a: argparse.Namespace) -> int:
        import torch

        from microedit_lens import load_model, load_sae
        from microedit_lens.sae_training import expand_text_files, measure_sae, tokenize_windows

        model, sae = load_model(a.model), load_sae(a.sae)
        wins = [w for ws in tokenize_windows(model.tokenizer, expand_text_files(a.text), 128).values() for w in ws]
        q = measure_sae(model, sae, torch.tensor(wins[: a.windows]))
        sys.stdout.write(json.dumps(q.to_dict(), indent=1) + "\n")
        return 0

    return run


@command("eval", "lifelong benchmark (WISE protocol) on a benchmark file")
def _eval_args(p: argparse.ArgumentParser):
    _add_model_args(p)
    p.add_argument("--data", required=True, help="benchmark file")
    p.add_argument("--format", default=None, help="zsre|hallucination|counterfact|temporal|jsonl (default: detect)")
    p.add_argument("--method", default="microedit")
    p.add_argument("--config", default=None, help="JSON object of method config overrides")
    p.add_argument("--T", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--limit", type=int, default=None, help="use the first N records")
    p.add_argument("--reference", default=None,
                   help="file of unrelated text for calibration (a JSON list of strings or a benchmark file); "
                        "default: the built-in reference prompts")
    p.add_argument("--reference-limit", type=int, default=500)
    p.add_argument("--out", default="results.json")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--keep-editor", action="store_true",
                   help="keep each T's last edited state (before scoring) in CHECKPOINT_DIR/T<T>_final_editor")
    p.add_argument("--no-generative", action="store_true", help="skip greedy exact-match scoring")
    p.add_argument("--dedupe", default="keep", choices=["error", "skip", "keep"])

    def run(a: argparse.Namespace) -> int:
        from microedit_lens import load_model, load_sae
        from microedit_lens.data import load_dataset
        from microedit_lens.lifelong import LifelongConfig, run_lifelong

        ds = load_dataset(a.data, format=a.format, limit=a.limit, dedupe=a.dedupe)
        refs = _reference_texts(a.reference, a.reference_limit)
        model, sae = load_model(a.model), load_sae(a.sae)
        cfg = LifelongConfig(T=a.T, generative=not a.no_generative, checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every, keep_editor=a.keep_editor)
        res = run_lifelong(model, sae, ds.records, cfg, a.method, _method_config(a), refs, dataset_name=str(a.data))
        sys.stdout.write(res.write(a.out, ppl=not any(r.paraphrases for r in ds.records)))
        return 0

    return run


def _reference_texts(path: str | None, limit: int) -> list[str]:
    from microedit_lens.data import load_reference_texts
    from microedit_lens.facts import REFERENCE_PROMPTS

    if path is None:
        return list(REFERENCE_PROMPTS)
    return load_reference_texts(path, limit)


@command("edit", "edit one fact on the embedded model, show before/after generations, save the state")
def _edit_args(p: argparse.ArgumentParser):
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--paraphrase", action="append", default=[])
    p.add_argument("--method", default="microedit")
    p.add_argument("--config", default=None, help="JSON object of method config overrides")
    p.add_argument("--state", default=None, help="existing editor state to continue from")
    p.add_argument("--save", default="microedit_state", help="where to save the editor state")
    p.add_argument("--tokens", type=int, default=8, help="tokens to generate")

    def run(a: argparse.Namespace) -> int:
        from microedit_lens import EditRequest, load_model, load_sae
        from microedit_lens.demo import generate
        from microedit_lens.facts import REFERENCE_PROMPTS
        from microedit_lens.methods import get_method

        model, sae = load_model(a.model), load_sae(a.sae)
        entry = get_method(a.method)
        if a.state:
            editor = entry.method_class.load(a.state, model)
        else:
            editor = entry.method_class(model, sae, _method_config(a))
            editor.prepare(REFERENCE_PROMPTS)
        req = EditRequest(a.prompt, a.target, paraphrases=tuple(a.paraphrase))
        prompts = [req.prompt, *req.paraphrases]
        with editor.detached():
            before = [generate(model, p, a.tokens) for p in prompts]
        res = editor.edit(req)[0]
        after = [generate(model, p, a.tokens) for p in prompts]
        for p, b, c in zip(prompts, before, after):
            sys.stdout.write(f"{p!r}\n  before: {b!r}\n  after:  {c!r}\n")
        sys.stdout.write(json.dumps({k: v for k, v in res.to_dict().items() if k != "request"}, indent=1) + "\n")
        editor.save(a.save)
        sys.stdout.write(f"saved editor state ({editor.n_edits} edits) to {a.save}\n")
        return 0

    return run


@command("demo", "edit ~10 facts on the embedded model; before/after table and an HTML report")
def _demo_args(p: argparse.ArgumentParser):
    _add_model_args(p)
    p.add_argument("--n", type=int, default=10, help="number of built-in facts to edit")
    p.add_argument("--out", default="microedit_demo.html")

    def run(a: argparse.Namespace) -> int:
        from microedit_lens.demo import run_demo

        report = run_demo(n=a.n, model_source=a.model, sae_source=a.sae, html_path=a.out)
        sys.stdout.write(report.text + "\n")
        return 0

    return run


@command("analyze", "run one of the paper's Section 2 analyses and write its figure")
def _analyze_args(p: argparse.ArgumentParser):
    _add_model_args(p)
    p.add_argument("name", help="analysis name (see --list)")
    p.add_argument("--out-dir", default="docs/figures")
    p.add_argument("--set", action="append", default=[], help="config override KEY=JSON_VALUE")

    def run(a: argparse.Namespace) -> int:
        from analyses import ANALYSES, run_analysis

        from microedit_lens import load_model, load_sae

        if a.name not in ANALYSES:
            raise SystemExit(f"unknown analysis '{a.name}'; available: {', '.join(sorted(ANALYSES))}")
        overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
        model = load_model(a.model)
        sae = load_sae(a.sae) if ANALYSES[a.name].uses_sae else None
        result, png = run_analysis(a.name, model, sae=sae, out_dir=a.out_dir, **overrides)
        sys.stdout.write(f"wrote {png}\n")
        return 0

    return run


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="microedit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (help_text, add_args) in _COMMANDS.items():
        runners[name] = add_args(sub.add_parser(name, help=help_text))  # type: ignore[operator]
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return runners[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
