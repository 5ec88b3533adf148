"""End-to-end SAE training (Braun et al. 2024): the model in the loop, through a loss object.

A local SAE learns to reconstruct its activations; an e2e SAE learns to keep the model's
output: its reconstruction is spliced into the model, and the loss is the KL divergence of
the spliced model's next-token distribution from the clean one (plus the architecture's
own sparsity term, which the trainer adds as usual). The e2e+ds variant adds the error of
the later layers' residual streams, so the SAE's output also keeps the model on its own
activations downstream (Braun et al. §2.2).

The trainer knows nothing of models: ``EndToEnd`` is the data it iterates (activation rows
of ``hook``, from one clean forward pass per batch of token sequences) and carries the
``objective`` the trainer calls with each SAE's reconstruction of those rows. Any
architecture can be trained this way; with a TopK SAE the L0 is fixed, so e2e and local
SAEs compare at equal L0 directly.

    data = EndToEnd(model, tokens, "blocks.2.hook_resid_post", sequences_per_batch=16)
    sae = wb.train_sae(wb.TrainConfig(d_sae=1024, k=16, batch_size=data.batch_rows,
                                      total_tokens=data.n_rows), data)
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .evals import check_hook, check_tokens


class EndToEnd:
    """Model-in-the-loop batches and loss for e2e SAEs (``downstream``: e2e+ds)."""

    def __init__(self, model, tokens: Tensor, hook: str, sequences_per_batch: int = 16, downstream: tuple[str, ...] = (),
                 downstream_coefficient: float = 1.0, seed: int = 0):
        check_hook(model, hook)
        check_tokens(model, tokens, sequences_per_batch)
        for name in downstream:
            check_hook(model, name)
        if downstream_coefficient < 0:
            raise ValueError(f"downstream_coefficient must be ≥ 0, got {downstream_coefficient}")
        self.model, self.tokens, self.hook = model, tokens, hook
        self.sequences_per_batch, self.seed = sequences_per_batch, seed
        self.downstream, self.downstream_coefficient = tuple(downstream), downstream_coefficient
        self._clean: dict | None = None  # the current batch's clean pass, for the objective

    @property
    def batch_rows(self) -> int:
        """Rows per batch (sequences × positions): TrainConfig.batch_size must equal it."""
        return self.sequences_per_batch * self.tokens.shape[1]

    @property
    def n_rows(self) -> int:
        """Rows in one pass over the tokens (whole batches only)."""
        return self.tokens.shape[0] // self.sequences_per_batch * self.batch_rows

    def fingerprint(self) -> dict:
        """What identifies this data between calls (for resuming a run folder)."""
        digest = hashlib.sha256(self.tokens.cpu().numpy().tobytes())
        digest.update(repr((self.model.cfg.model_name, self.hook, self.sequences_per_batch, self.downstream,
                            self.downstream_coefficient, self.seed)).encode())
        return {"kind": "EndToEnd", "sha256": digest.hexdigest(), "hook": self.hook, "sequences": self.tokens.shape[0]}

    @torch.no_grad()
    def __iter__(self):
        """Batches of the hook's activations [sequences × positions, d] in a seeded order; each
        also records the clean log-probabilities (and downstream activations) it came with."""
        device = self.model.cfg.device
        order = torch.randperm(self.tokens.shape[0], generator=torch.Generator().manual_seed(self.seed))
        names = [self.hook, *self.downstream]
        for start in range(0, len(order) - self.sequences_per_batch + 1, self.sequences_per_batch):
            tokens = self.tokens[order[start:start + self.sequences_per_batch]].to(device)
            logits, cache = self.model.run_with_cache(tokens, names_filter=names)
            self._clean = {"tokens": tokens, "log_probs": logits.float().log_softmax(-1),
                           "downstream": {name: cache[name].float() for name in self.downstream}}
            x = cache[self.hook]
            yield x.reshape(x.shape[0] * x.shape[1], -1)

    def objective(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """KL(clean ‖ spliced) per token (nats), plus for e2e+ds the coefficient times the mean
        over downstream hooks of their squared error divided by their variance (FVU units,
        so the coefficient means the same at every layer). Differentiable in ``x_hat`` only:
        the model's parameters take no gradient."""
        if self._clean is None:
            raise RuntimeError("the objective reads the batch being trained on: iterate the EndToEnd data first")
        clean, model = self._clean, self.model
        captured = {}

        def splice(act, hook):
            return x_hat.to(act.dtype).reshape(act.shape)

        def keep(act, hook):
            captured[hook.name] = act

        flags = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)  # the graph then runs through x̂ only, not into the model's weights
        try:
            logits = model.run_with_hooks(clean["tokens"], fwd_hooks=[(self.hook, splice)] +
                                          [(name, keep) for name in self.downstream])
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
        log_p, log_q = clean["log_probs"], logits.float().log_softmax(-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        if self.downstream and self.downstream_coefficient:
            errors = []
            for name in self.downstream:
                target = clean["downstream"][name].reshape(-1, clean["downstream"][name].shape[-1])
                spliced = captured[name].float().reshape(target.shape)
                variance = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
                errors.append((spliced - target).pow(2).sum(-1).mean() / variance)
            loss = loss + self.downstream_coefficient * torch.stack(errors).mean()
        return loss
