"""``python -m workbench COMMAND``: the workbench from a terminal.

Commands: ``demo`` (the end-to-end tour on the offline default model), ``models`` (the
offline zoo) and ``cache`` (activations and gradients to disk; works under torchrun).
Zoo training lives in ``python -m workbench.zoo``.
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
    models = sub.add_parser("models", help="list the offline zoo with each model's validation loss")
    models.add_argument("--table", action="store_true", help="one Markdown table row per model (as in README.md)")
    cache = sub.add_parser("cache", help="cache activations (and loss gradients) of hooks to disk")
    cache.add_argument("--model", default=None, help="zoo or TransformerLens model name (default: the zoo default)")
    cache.add_argument("--hooks", nargs="+", required=True, help="hook names, e.g. blocks.1.hook_resid_post")
    cache.add_argument("--tokens", type=int, required=True, help="number of tokens to cache")
    cache.add_argument("--out", required=True, help="cache folder (re-run the same command to resume)")
    cache.add_argument("--grads", action="store_true", help="also cache the loss gradient of each activation")
    cache.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    cache.add_argument("--batch-size", type=int, default=32)
    cache.add_argument("--seq-len", type=int, default=128)
    cache.add_argument("--corpus", default="stdlib", help="'stdlib', a local text file/folder, or an HF dataset")
    cache.add_argument("--split", default="train", choices=["train", "val"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("workbench").setLevel(logging.INFO)  # ours only: not every library's INFO chatter

    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out)
    elif args.command == "cache":
        _cache(args)
    elif args.command == "models":
        from . import list_models, model_card

        for name in list_models():
            card = model_card(name)
            print(card.table_row() if args.table else card.to_markdown())


def _cache(args) -> None:
    import os

    import torch

    from . import DEFAULT_MODEL, load_model, load_tokens
    from .cache import ActivationCache, cache_activations

    device = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
    model = load_model(args.model or DEFAULT_MODEL, device=device)
    tokens = load_tokens(args.corpus, args.split, n_tokens=args.tokens, seq_len=args.seq_len)
    path = cache_activations(model, tokens, args.hooks, args.out, dtype=args.dtype, with_grads=args.grads,
                             batch_size=args.batch_size)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(ActivationCache.open(path))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
