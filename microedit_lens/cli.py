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
    p.add_argument("--no-autocast", action="store_true", help="harvest activations in fp32")

    def run(a: argparse.Namespace) -> int:
        from microedit_lens.sae_training import TrainSAEConfig, train_sae

        cfg = TrainSAEConfig(
            text_files=a.text, heldout_files=a.heldout_text, output_dir=a.out, model=a.model,
            hook_name=a.hook, d_sae=a.width, k=a.k, training_tokens=a.tokens, lr=a.lr,
            context_size=a.context_size, autocast_lm=not a.no_autocast,
        )
        out, q = train_sae(cfg)
        sys.stdout.write(json.dumps({"sae": str(out), **q.to_dict()}, indent=1) + "\n")
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
