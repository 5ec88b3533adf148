"""``python -m workbench COMMAND``: the workbench from a terminal.

Commands: ``demo`` (the end-to-end tour on the offline default model), ``models`` (the
offline zoo), ``cache`` (activations and gradients to disk; works under torchrun) and
``train`` (SAEs on a cached hook) and ``sparsity`` (the activation-sparsity study).
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
    demo.add_argument("--out", default=None, help="folder for the exported figures (default: figures/ at the repository root)")
    train = sub.add_parser("train", help="train SAEs on a cached hook (several configs share one pass)")
    train.add_argument("--cache", required=True, help="activation cache folder (from `python -m workbench cache`)")
    train.add_argument("--hook", required=True, help="hook of the cache to train on")
    train.add_argument("--architectures", nargs="+", default=["topk"], help="one SAE per architecture × k × width")
    train.add_argument("--k", nargs="+", type=int, default=[32])
    train.add_argument("--d-sae", nargs="+", type=int, default=[2048])
    train.add_argument("--tokens", type=int, default=None, help="training tokens (default: one epoch of the cache)")
    train.add_argument("--batch-size", type=int, default=4096)
    train.add_argument("--lr", type=float, default=None, help="default: workbench.trainer.default_lr(d_sae)")
    train.add_argument("--out", default="saes/run", help="run folder: one subfolder per SAE; re-run to resume")
    train.add_argument("--checkpoint-every", type=int, default=200)
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
    sparsity = sub.add_parser("sparsity", help="activation sparsity of zoo models: lazy neurons, PPL-p%%, "
                                                 "training-free methods, Sparsing Law, ProSparse")
    sparsity.add_argument("--models", nargs="+", default=["stdlib-relu", "stdlib-gelu", "stdlib-swiglu"])
    sparsity.add_argument("--parts", nargs="+", default=["lazy", "ppl", "curves", "law", "prosparse"],
                          choices=["lazy", "ppl", "curves", "law", "prosparse"])
    sparsity.add_argument("--p", nargs="+", type=float, default=[0.01, 0.05, 0.1], help="PPL-p%% targets (0.01 = 1%%)")
    sparsity.add_argument("--methods", nargs="+", default=None, help="training-free methods for the curves (default: all)")
    sparsity.add_argument("--eval-tokens", type=int, default=32_768, help="validation tokens for perplexity")
    sparsity.add_argument("--calibration-tokens", type=int, default=16_384, help="other validation tokens for thresholds")
    sparsity.add_argument("--out", default=None, help="folder for the figures (default: figures/ at the repository root)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("workbench").setLevel(logging.INFO)  # ours only: not every library's INFO chatter

    if args.command == "demo":
        from .demo import run_demo

        run_demo(out_dir=args.out)
    elif args.command == "cache":
        _cache(args)
    elif args.command == "train":
        _train(args)
    elif args.command == "sparsity":
        from .sparsity.report import run_study

        run_study(args.models, parts=args.parts, eval_tokens=args.eval_tokens, calibration_tokens=args.calibration_tokens,
                  ps=tuple(args.p), methods=args.methods, out_dir=args.out, say=lambda title, text: print(f"\n## {title}\n\n{text}"))
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


def _train(args) -> None:
    import itertools

    from .cache import ActivationCache
    from .evals import reconstruction_metrics
    from .trainer import TrainConfig, train_saes

    cache = ActivationCache.open(args.cache)
    model_name = cache.manifest["model"]["name"]
    configs = [
        TrainConfig(architecture=arch, k=k, d_sae=d_sae, hook_name=args.hook, model_name=model_name,
                    batch_size=args.batch_size, total_tokens=args.tokens, lr=args.lr, checkpoint_every=args.checkpoint_every)
        for arch, k, d_sae in itertools.product(args.architectures, args.k, args.d_sae)
    ]
    trained = train_saes(configs, cache, run_dir=args.out)
    sample = list(itertools.islice(cache.batches(args.hook, args.batch_size, seed=12345, with_grads=cache.has_grads), 4))
    for cfg, sae in zip(configs, trained):
        metrics = reconstruction_metrics(sae, sample if cfg.needs_grads else [b[0] if isinstance(b, tuple) else b for b in sample])
        print(f"{cfg.architecture:>12} k={cfg.k:<4} d_sae={cfg.d_sae:<6} FVU (on cached rows) {metrics.fvu:.4f}  L0 {metrics.l0:.1f}  "
              f"dead {metrics.dead_fraction:.3f}")


if __name__ == "__main__":
    main()
