"""``python -m workbench.zoo``: rebuild the tokenizer, train zoo models (list them: ``python -m workbench models``)."""

from __future__ import annotations

import argparse
import logging

from .specs import ZOO


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tokenizer", help="train the BPE tokenizer on the stdlib train split")
    train = sub.add_parser("train", help="train one zoo model (or 'all') from scratch, seeded")
    train.add_argument("name", choices=[*ZOO, "all"])
    train.add_argument("--tokens", type=int, default=None, help="override the token budget (quick runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("workbench").setLevel(logging.INFO)

    if args.command == "tokenizer":
        from ..tokenizer import train_tokenizer

        print(f"tokenizer saved to {train_tokenizer()}")
    elif args.command == "train":
        from .train import train_zoo_model

        for name in ZOO if args.name == "all" else [args.name]:
            overrides = {} if args.tokens is None else {"train_tokens": args.tokens}
            card = train_zoo_model(name, **overrides)
            print(card.to_markdown())


if __name__ == "__main__":
    main()
