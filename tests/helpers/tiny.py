"""A tiny, seeded, randomly initialised TransformerLens model and token set for fast tests.

Also runnable as a script (``python -m tests.helpers.tiny OUT [--slow]``), so tests can
cache from a subprocess that they kill, or launch under torchrun.
"""

from __future__ import annotations

import argparse
import time

import torch

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.0.attn.hook_z"]


def tiny_model(act_fn: str = "relu", gated: bool = False):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=64,
                                  act_fn=act_fn, gated_mlp=gated, seed=0, model_name="tiny", device="cpu")
    model = HookedTransformer(cfg)
    model.eval()
    return model


def tiny_tokens(n_seq: int = 48, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--slow", action="store_true", help="sleep in a hook so the run can be killed midway")
    parser.add_argument("--grads", action="store_true")
    args = parser.parse_args()
    from workbench.cache import cache_activations

    if "WORLD_SIZE" in __import__("os").environ:
        torch.distributed.init_process_group("gloo")
    model = tiny_model()
    if args.slow:
        model.blocks[0].hook_resid_post.add_hook(lambda act, hook: time.sleep(0.25), is_permanent=True)
    cache_activations(model, tiny_tokens(), HOOKS, args.out, with_grads=args.grads, batch_size=4,
                      shard_tokens=64, progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
