"""Evaluation metrics: model loss, and SAE reconstruction and downstream (spliced-in) metrics."""

from __future__ import annotations

from dataclasses import dataclass

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


# --- SAE evaluation ------------------------------------------------------------------------


@dataclass
class ReconstructionMetrics:
    fvu: float  # Σ‖x − x̂‖² / Σ‖x − x̄‖², accumulated in float64
    mse: float  # mean over rows of ‖x − x̂‖² / d_in
    l0: float  # mean active latents per row
    dead_fraction: float  # latents that never fired on these rows
    density: torch.Tensor  # [d_sae] fraction of rows on which each latent fired
    n_rows: int

    def density_histogram(self, bins: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of log10 feature density over the latents that fired (counts, edges)."""
        alive = self.density[self.density > 0].log10()
        counts = torch.histc(alive, bins=bins, min=float(alive.min()), max=0.0) if alive.numel() else torch.zeros(bins)
        return counts, torch.linspace(float(alive.min()) if alive.numel() else -1.0, 0.0, bins + 1)


@torch.no_grad()
def reconstruction_metrics(sae, batches) -> ReconstructionMetrics:
    """FVU, MSE, L0, dead fraction and feature density of ``sae`` over a stream of batches
    (tensors, or (x, g) pairs, passed on as g to SAEs that select with it)."""
    sse = sum_sq = 0.0
    sum_x = None
    n = 0
    l0_total = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    device = sae.W_dec.device
    for batch in batches:
        x, g = (batch if isinstance(batch, (tuple, list)) else (batch, None))
        x = x.to(device, torch.float32)
        result = sae(x, **({"g": g.to(device, torch.float32)} if g is not None else {}))
        x64 = x.double()
        sse += float((result.x_hat.double() - x64).pow(2).sum())
        sum_sq += float(x64.pow(2).sum())
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        n += x.shape[0]
        active = result.code.values > 0
        l0_total += float(active.sum())
        fired.index_add_(0, result.code.indices[active].cpu(), torch.ones(int(active.sum()), dtype=torch.float64))
    if n == 0:
        raise ValueError("no rows to evaluate")
    total_variance = sum_sq - float(sum_x.pow(2).sum()) / n  # Σ‖x − x̄‖² = Σ‖x‖² − n‖x̄‖²
    density = (fired / n).float()
    return ReconstructionMetrics(fvu=sse / total_variance if total_variance > 0 else float("nan"), mse=sse / (n * sae.cfg.d_in), l0=l0_total / n,
                                 dead_fraction=float((density == 0).float().mean()), density=density, n_rows=n)


@dataclass
class DownstreamMetrics:
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    kl: float  # mean KL(clean ‖ spliced) per token, nats

    @property
    def ce_recovered_vs_zero(self) -> float:
        """1 = as good as the clean model, 0 = as bad as zero-ablating the activation."""
        return (self.ce_zero_ablation - self.ce_spliced) / (self.ce_zero_ablation - self.ce_clean)

    @property
    def ce_recovered_vs_mean(self) -> float:
        return (self.ce_mean_ablation - self.ce_spliced) / (self.ce_mean_ablation - self.ce_clean)


def _hook_gradient(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    """∂(summed next-token loss)/∂(activation at hook) on the clean model, as the cache stores it."""
    captured = {}

    def keep(act, hook):
        captured["act"] = act

    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, keep)]):
        loss = model(tokens, return_type="loss", loss_per_token=True).sum()
        return torch.autograd.grad(loss, captured["act"])[0].detach()


@torch.no_grad()
def downstream_metrics(model, sae, tokens: torch.Tensor, hook: str | None = None, batch_size: int = 16,
                       use_gradient: bool = True) -> DownstreamMetrics:
    """Next-token CE with the SAE's reconstruction spliced in at ``hook`` (default: the
    SAE's own hook_name), against the clean model, zero- and mean-ablation; and the KL
    of the spliced model's predictions from the clean ones. A gradient SAE is given the
    clean model's loss gradient at the hook, as in training (Olmo et al. 2024); with
    ``use_gradient=False`` it selects by z alone, as it must where no gradient exists."""
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ValueError("name the hook to splice at (the SAE has no hook_name recorded)")
    device = model.cfg.device
    needs_grad = sae.architecture == "gradient" and use_gradient
    # Pass 1: the mean activation over all tokens, for mean-ablation.
    total, count = None, 0
    for start in range(0, tokens.shape[0], batch_size):
        _, cache = model.run_with_cache(tokens[start:start + batch_size].to(device), names_filter=hook)
        act = cache[hook].double()
        flat = act.reshape(-1, *act.shape[2:])
        total = flat.sum(0) if total is None else total + flat.sum(0)
        count += flat.shape[0]
    mean_act = (total / count).float()

    sums = dict(clean=0.0, spliced=0.0, zero=0.0, mean=0.0, kl=0.0)
    n_tokens = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(device)
        grad = _hook_gradient(model, batch, hook) if needs_grad else None

        def splice(act, hook):
            flat = act.reshape(act.shape[0] * act.shape[1], -1).float()
            extra = {"g": grad.reshape(flat.shape).float()} if grad is not None else {}
            return sae(flat.to(sae.W_dec.device), **extra).x_hat.to(act.dtype).reshape(act.shape)

        clean_logits = model(batch)
        spliced_logits = model.run_with_hooks(batch, fwd_hooks=[(hook, splice)])
        zero = model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, lambda act, hook: torch.zeros_like(act))])
        mean = model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, lambda act, hook: mean_act.expand_as(act).to(act.dtype))])
        targets = batch[:, 1:]
        clean_lp = clean_logits[:, :-1].log_softmax(-1)
        spliced_lp = spliced_logits[:, :-1].log_softmax(-1)
        sums["clean"] += float(-clean_lp.gather(-1, targets[..., None]).double().sum())
        sums["spliced"] += float(-spliced_lp.gather(-1, targets[..., None]).double().sum())
        sums["zero"] += float(zero.double().sum())
        sums["mean"] += float(mean.double().sum())
        sums["kl"] += float((clean_lp.exp() * (clean_lp - spliced_lp)).sum(-1).double().sum())
        n_tokens += targets.numel()
    return DownstreamMetrics(ce_clean=sums["clean"] / n_tokens, ce_spliced=sums["spliced"] / n_tokens,
                             ce_zero_ablation=sums["zero"] / n_tokens, ce_mean_ablation=sums["mean"] / n_tokens,
                             kl=sums["kl"] / n_tokens)
