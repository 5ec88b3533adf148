"""Train a small TopK SAE under torchrun (gloo) for the trainer's data-parallel test.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.train_ddp OUT

Every rank draws the same seeded stream of batches (the trainer gives each rank its own
share of them), then saves its replica's weights as OUT/rank<r>.safetensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from workbench import synthetic
from workbench.trainer import TrainConfig, train_sae

TOTAL, BATCH = 256 * 80, 256


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    data = synthetic.superposition(d=32, n_features=128, avg_active=3, seed=0)
    cfg = TrainConfig(architecture="batchtopk", d_sae=128, k=4, batch_size=BATCH, total_tokens=TOTAL, warmup_steps=5,
                      log_every=5, device="cpu")
    sae = train_sae(cfg, data.batches(BATCH, TOTAL, seed=1), run_dir=Path(args.out) / "run", progress=False)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(Path(args.out) / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
