"""Evaluation metrics shared across the workbench."""

from __future__ import annotations

import torch


@torch.no_grad()
def model_loss(model, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over all predicted positions.

    Summed in float64 across batches so the mean does not depend on the batch size.
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq, seq_len >= 2], got shape {tuple(tokens.shape)}")
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        loss = model(batch, return_type="loss", loss_per_token=True)
        total += float(loss.double().sum())
        count += loss.numel()
    return total / count
