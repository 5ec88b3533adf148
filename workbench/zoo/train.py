"""Train a zoo model on the stdlib corpus: seeded, one command, checkpoints along the way.

``python -m workbench.zoo train stdlib-relu`` is seeded (initialisation, token order) and
runs with torch's deterministic algorithms, so two runs on the same torch build and thread
count give bit-identical weights. (Without that switch, multi-threaded embedding backward
sums in a varying order: the shipped stdlib-gelu, re-trained that way, came back within
0.002 of itself in fp16 with the same validation loss to 1e-6 nats/token.)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data import load_tokens, unigram_entropy
from ..evals import model_loss
from ..models import build_model
from ..paths import checkpoints_dir, data_dir
from .card import ModelCard, write_card
from .specs import ZOO, ZooSpec

log = logging.getLogger(__name__)


def parameter_state(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The trainable weights only (buffers such as causal masks are rebuilt on load)."""
    return {name: param.detach().to(dtype).contiguous() for name, param in model.named_parameters()}


def _lr_at(step: int, total: int, spec: ZooSpec) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, total - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_zoo_model(name: str, out_dir: Path | None = None, **overrides) -> ModelCard:
    """Train zoo model ``name`` from scratch; write weights, model card and checkpoints.

    ``overrides`` replace fields of the recipe (e.g. ``train_tokens=...`` for a quick
    run); the shipped models use the recipe exactly as written in ``specs.py``.
    """
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; the zoo has {sorted(ZOO)}")
    spec = dataclasses.replace(ZOO[name], **overrides)
    out_dir = Path(out_dir or data_dir() / "zoo" / name)
    ckpt_dir = checkpoints_dir() / name
    # Checkpoints of an earlier run would mix into this run's training curve: start clean.
    for stale in ckpt_dir.glob("step*.safetensors"):
        stale.unlink()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(spec.seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(name, spec, out_dir, ckpt_dir)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(name: str, spec: ZooSpec, out_dir: Path, ckpt_dir: Path) -> ModelCard:
    tokens = load_tokens("stdlib", "train", n_tokens=spec.train_tokens, seq_len=spec.seq_len)
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(spec.seed))
    model = build_model(spec)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith(("embed", "pos_embed"))]
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    total_steps = tokens.shape[0] // spec.batch_size
    checkpoint_every = max(1, total_steps // spec.n_checkpoints)
    started = time.perf_counter()
    tokens_seen = 0
    bar = tqdm(range(total_steps), desc=f"train {name}", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total_steps, spec)
        batch = tokens[order[step * spec.batch_size:(step + 1) * spec.batch_size]]
        loss = model(batch, return_type="loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += batch.numel()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == total_steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_file(
                parameter_state(model),
                str(ckpt_dir / f"step{step + 1:06d}.safetensors"),
                metadata={"tokens_seen": str(tokens_seen), "step": str(step + 1)},
            )
    train_time = time.perf_counter() - started

    # Evaluate the weights exactly as shipped (rounded to fp16), not the fp32 ones.
    shipped = parameter_state(model)
    model.load_state_dict({k: v.float() for k, v in shipped.items()}, strict=False)
    model.eval()
    val = load_tokens("stdlib", "val", n_tokens=spec.eval_tokens, seq_len=spec.seq_len)
    val_loss = model_loss(model, val)
    entropy = unigram_entropy(val[:, 1:], spec.d_vocab)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(shipped, str(out_dir / "model.safetensors"), metadata={"name": name})
    card = ModelCard.build(
        spec=spec,
        tokens_seen=tokens_seen,
        val_loss_nats=val_loss,
        val_unigram_entropy_nats=entropy,
        val_tokens=int(val[:, 1:].numel()),
        train_time_s=train_time,
        n_params=sum(p.numel() for p in model.parameters()),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    )
    write_card(out_dir, card)
    log.info("%s: val loss %.3f nats/token vs unigram entropy %.3f", name, val_loss, entropy)
    return card
