"""torch.distributed facts shared by the cache writer and the SAE trainer."""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when it is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collective_view(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous alias of ``tensor`` for collectives (which refuse strided tensors):
    the tensor itself, or the transpose of a column-major matrix such as an SAE's W_enc."""
    if tensor.is_contiguous():
        return tensor
    if tensor.ndim == 2 and tensor.T.is_contiguous():
        return tensor.T
    raise ValueError(f"cannot run a collective on a tensor with strides {tensor.stride()} without copying it")
