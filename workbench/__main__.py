"""``python -m workbench COMMAND``: the workbench from a terminal.

Commands: ``demo`` (the end-to-end tour on the offline default model) and ``models``
(the offline zoo). Zoo training lives in ``python -m workbench.zoo``.
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo on the offline default model")
    demo.add_argument("--out", default="figures", help="folder for the exported figures")
    sub.add_parser("models", help="list the offline zoo with each model's validation loss")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out)
    elif args.command == "models":
        from . import list_models, model_card

        for name in list_models():
            print(model_card(name).to_markdown())


if __name__ == "__main__":
    main()
