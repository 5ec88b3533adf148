"""``python -m workbench.saes``: list the shipped SAEs, or train them again (seeded, resumable)."""

from __future__ import annotations

import argparse
import logging

from .specs import CATALOGUE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.saes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the shipped SAEs with their held-out numbers")
    train = sub.add_parser("train", help="train the named shipped SAEs (default: all) into saes/")
    train.add_argument("names", nargs="*", metavar="NAME", help=f"e.g. {next(iter(CATALOGUE))}")
    train.add_argument("--tokens", type=int, default=None, help="override the training tokens (quick runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("workbench").setLevel(logging.INFO)

    from .card import TABLE_HEADER, SAECard

    if args.command == "list":
        from . import list_saes, sae_card

        cards = [sae_card(name) for name in list_saes()]
    else:
        from .train import train_catalogue

        cards = train_catalogue(args.names or None, train_tokens=args.tokens)
    print(TABLE_HEADER)
    for card in cards:
        print(SAECard.table_row(card))


if __name__ == "__main__":
    main()
