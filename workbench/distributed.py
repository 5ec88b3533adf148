"""torch.distributed facts shared by the cache writer and the SAE trainer."""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
