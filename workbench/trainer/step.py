"""One SAE's training state and step: loss, AuxK, decoder constraint, schedules, statistics.

Kept apart from the data loop so several SAEs (a sweep) can be stepped on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..distributed import collective_view, rank_and_world
from ..sae import SparseAutoencoder
from ..sae.sparse_ops import SparsePattern, gathered_pre_acts, sparse_decode
from .config import TrainConfig
from .zipf import under_used


class NonFiniteError(FloatingPointError):
    """A batch, loss or gradient held NaN/inf; the SAE was not updated with it."""


@dataclass
class StepStats:
    loss: float
    fvu: float
    l0: float
    aux_loss: float
    dead_fraction: float
    lr: float
    k: int
    sparsity_loss: float = 0.0
    """The architecture's own penalty (L1, L0), as added to the loss; 0 for the TopK family."""
    grad_norm: float = 0.0
    """The gradient's global norm before clipping (above TrainConfig.grad_clip: clipped)."""


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` holds on any rank: replicas must take the same branch, or the next
    collective (a gradient average) would wait forever for the rank that skipped."""
    _, world = rank_and_world()
    if world == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def _contiguous_alias(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """``param`` itself, or for a column-major matrix a Parameter over its transpose (same memory)."""
    return param if param.is_contiguous() else torch.nn.Parameter(collective_view(param.data))


class SAETrainer:
    """Trains one SAE: Adam, lr warm-up and decay, optional k annealing, AuxK for dead
    latents, unit-norm decoder rows (Gao et al. 2024 §2.3, §A.2), gradient clipping."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig):
        self.sae, self.cfg = sae, cfg
        device = sae.W_dec.device
        # The fused kernel does Adam's whole update in one pass per tensor (4× less memory
        # traffic than the default per-op implementation); CPU and CUDA have one.
        fused = device.type in ("cpu", "cuda")
        # The fused kernel copies strided tensors in and out, so a column-major W_enc
        # (sparse_ops) is handed to Adam as its contiguous transpose, sharing memory.
        self.optimized = {name: _contiguous_alias(p) for name, p in sae.named_parameters()}
        self.optimizer = torch.optim.Adam(list(self.optimized.values()), lr=cfg.resolved_lr(), betas=(0.9, 0.999),
                                          eps=6.25e-10, fused=fused)
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
        # Each latent's firing density, averaged over about dead_tokens tokens (aux_latents="zipf").
        self.density = torch.zeros(sae.cfg.d_sae, device=device)
        self.step_count = 0  # batches consumed, skipped ones included: the position in the data stream
        self.tokens_seen = 0  # rows trained on
        self.skipped: list[int] = []  # batch indices skipped as non-finite (TrainConfig.skip_nonfinite)
        self.dead_tokens = cfg.resolved_dead_tokens()
        self.aux_k = cfg.aux_k or max(1, sae.cfg.d_in // 2)
        self.selection_dtype = cfg.selection_dtype(device)
        if cfg.k_anneal_tokens > 0 and not sae.supports_k_annealing:  # cfg checks its own architecture, not this SAE's
            raise ValueError(f"a {sae.architecture} SAE cannot anneal k: {sae.no_k_annealing_because}")

    # --- schedules -------------------------------------------------------------------------
    def lr_now(self) -> float:
        lr = self.cfg.resolved_lr()
        if self.step_count < self.cfg.warmup_steps:
            return lr * (self.step_count + 1) / self.cfg.warmup_steps
        total = self.cfg.total_steps()
        if total and self.cfg.decay_fraction > 0:
            decay_start = total * (1 - self.cfg.decay_fraction)
            if self.step_count >= decay_start:
                return lr * max(0.0, (total - self.step_count) / (total - decay_start))
        return lr

    def progress(self) -> float:
        """Fraction of training done (by steps), for the architectures' penalty warm-ups; 1.0
        when the run length is unknown (total_tokens=None), so no warm-up applies then."""
        total = self.cfg.total_steps()
        return min(1.0, self.step_count / total) if total else 1.0

    def k_now(self) -> int:
        """Linearly annealed k (from k_start down to k over k_anneal_tokens), else k."""
        k = self.sae.cfg.k
        if self.cfg.k_anneal_tokens <= 0 or self.tokens_seen >= self.cfg.k_anneal_tokens:
            return k
        start = self.cfg.k_start or min(4 * k, self.sae.cfg.d_sae)
        return round(start + (k - start) * self.tokens_seen / self.cfg.k_anneal_tokens)

    # --- the step --------------------------------------------------------------------------
    def aux_loss(self, x: Tensor, target: Tensor, x_hat: Tensor, pre_acts: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024 §A.2): the top-k_aux dead latents reconstruct the residual
        ``target`` − x̂ (``target`` is x, or a transcoder's output).

        ``pre_acts`` (detached) only choose the latents; their values are recomputed exactly
        with gradients, so the encoder of dead latents learns too."""
        dead = self.aux_latents().nonzero().squeeze(1)
        if dead.numel() == 0:
            return x.new_zeros(())
        residual = (target - x_hat).detach()
        with torch.no_grad():
            best = pre_acts[:, dead].topk(min(self.aux_k, dead.numel()), dim=-1, sorted=False).indices
        indices = dead[best]
        sae = self.sae
        pattern = SparsePattern.fixed_width(indices, sae.cfg.d_sae)
        values = gathered_pre_acts(x, sae.input_bias, sae.W_enc, sae.b_enc, indices, pattern).relu()
        residual_hat = sparse_decode(values.view(-1), sae.W_dec, pattern)
        return (residual_hat - residual).pow(2).sum(-1).mean()

    def aux_latents(self) -> Tensor:
        """The latents AuxK trains (a mask): the dead ones, and with aux_latents="zipf" the
        under-used ones too, once the densities cover dead_tokens tokens."""
        dead = self.tokens_since_fired >= self.dead_tokens
        if self.cfg.aux_latents == "zipf" and self.tokens_seen >= self.dead_tokens:
            dead |= under_used(self.density)
        return dead

    def skip(self) -> None:
        """Consume a batch without training on it (a non-finite one, with skip_nonfinite)."""
        self.skipped.append(self.step_count)
        self.step_count += 1

    def step(self, x: Tensor, g: Tensor | None = None, y: Tensor | None = None, objective=None) -> StepStats | None:
        """One optimiser step on this process's batch ``x`` (under torchrun, each rank
        steps on its own batch and the gradients are averaged, so one step sees
        world × batch rows). ``g``: the loss gradient at x (the gradient SAE); ``y``: a
        transcoder's target, what it learns to predict from x (an SAE's target is x).
        ``objective(x, x̂)``, when given, replaces the reconstruction loss (an e2e SAE's KL
        with its reconstruction spliced into the model: ``workbench.end_to_end``).

        A non-finite loss or gradient norm (on any rank) leaves the SAE, its optimiser and
        its statistics untouched: with ``cfg.skip_nonfinite`` the batch is counted as
        skipped and None is returned, otherwise ``NonFiniteError`` is raised."""
        sae, cfg = self.sae, self.cfg
        _, world = rank_and_world()
        k = self.k_now()
        lr = self.lr_now()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        select_kwargs = {"g": g} if g is not None else {}
        annealing = k != sae.cfg.k  # only SAEs that support k annealing get here (checked in __init__)
        if annealing:
            select_kwargs["k"] = k
        # Loaded SAEs come in eval mode (and callers may evaluate between steps); training
        # needs the training rule (BatchTopK's batch top-k), and records θ in that mode.
        sae.train()
        # Not observed yet (θ, BatchTopK's inference threshold): only once the step is known
        # to be finite, so a skipped batch leaves no trace in the SAE.
        result = sae.forward_train(x, self.selection_dtype, observe=False, **select_kwargs)
        if sae.is_transcoder != (y is not None):
            raise ValueError("a transcoder trains on (x, y) pairs, an SAE on x alone: "
                             f"this {'transcoder' if sae.is_transcoder else 'SAE'} got {'no' if y is None else 'a'} y")
        target = x if y is None else y
        # Normalise by the batch's total variance, so the loss is an FVU and the lr does not
        # depend on the activations' scale.
        variance = (torch.linalg.vector_norm(target - target.mean(0)).square() / target.shape[0]).clamp_min(1e-12)
        recon = sae.reconstruction_loss(target, result) / variance if objective is None else objective(x, result.x_hat)
        aux = self.aux_loss(x, target, result.x_hat, result.pre_acts) / variance if sae.uses_aux_k else x.new_zeros(())
        penalty = sae.sparsity_loss(x, result, variance.sqrt(), self.progress())
        loss = recon + cfg.aux_alpha * aux + (penalty if penalty is not None else 0.0)
        sae.zero_grad(set_to_none=True)  # the module: its W_enc is not the tensor Adam holds
        loss.backward()
        self._average_gradients_across_ranks()
        if sae.unit_norm_decoder:
            self._remove_parallel_decoder_grad()
        if cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in sae.parameters() if p.grad is not None])
        # One check of two scalars (one device sync, which the statistics below make anyway):
        # Adam would spread a NaN gradient into every parameter and both moments for good.
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if any_rank(not finite, x.device):
            sae.zero_grad(set_to_none=True)
            if cfg.skip_nonfinite:
                self.skip()
                return None
            raise NonFiniteError(
                f"the loss ({float(loss.detach()):.4g}) or gradient norm ({float(grad_norm):.4g}) is NaN/inf on a "
                "finite batch: the SAE diverged, or the data's scale overflows float32 when squared. Lower the lr "
                f"(now {lr:.3g}), check the data's scale, or pass TrainConfig(skip_nonfinite=True) to skip such batches")
        # θ is BatchTopK's inference stand-in for keeping k·B per batch: batches kept at
        # k_now > k would bias it low, so only batches at the final k are observed.
        if not annealing:
            sae.observe(result.code)
        for name, param in sae.named_parameters():
            alias = self.optimized[name]
            if alias is not param:
                alias.grad = None if param.grad is None else param.grad.T
        self.optimizer.step()
        sae.after_step()
        with torch.no_grad():
            if sae.unit_norm_decoder:
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fires = torch.bincount(result.code.indices[result.code.values > 0], minlength=self.density.numel())
            fires = self._sync_across_ranks(fires)
            self.tokens_since_fired += x.shape[0] * world
            self.tokens_since_fired[fires > 0] = 0
            rate = min(1.0, x.shape[0] * world / self.dead_tokens)
            self.density.mul_(1 - rate).add_(fires.float() / (x.shape[0] * world), alpha=rate)
            fvu = float(torch.linalg.vector_norm(result.x_hat - target).square() / target.shape[0] / variance)
            l0 = float((result.code.values > 0).sum(-1).float().mean())
        self.step_count += 1
        self.tokens_seen += x.shape[0] * world
        return StepStats(float(loss.detach()), fvu, l0, float(aux.detach()), float((self.tokens_since_fired >= self.dead_tokens).float().mean()), lr, k,
                         0.0 if penalty is None else float(penalty.detach()), float(grad_norm))

    @torch.no_grad()
    def _remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row: with rows renormalised after
        every step, that component only changes the norm and would be wasted (Gao et al. 2024)."""
        W, grad = self.sae.W_dec, self.sae.W_dec.grad
        if grad is not None:
            grad -= (grad * W).sum(-1, keepdim=True) * W

    def _sync_across_ranks(self, fires: Tensor) -> Tensor:
        """Keep every replica's bookkeeping identical: each latent's firing count is summed
        over the ranks (it fired if it fired on any), and buffers (BatchTopK's threshold)
        are averaged."""
        _, world = rank_and_world()
        if world == 1:
            return fires
        torch.distributed.all_reduce(fires)
        for buffer in self.sae.buffers():
            torch.distributed.all_reduce(buffer)
            buffer /= world
        return fires

    def _average_gradients_across_ranks(self) -> None:
        _, world = rank_and_world()
        if world > 1:
            for param in self.sae.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(collective_view(param.grad))
                    param.grad /= world

    # --- resumable state -------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed to resume exactly, as tensors (saved with safetensors, no pickle)."""
        state = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        state["tokens_since_fired"] = self.tokens_since_fired
        state["density"] = self.density
        for name, param in self.sae.named_parameters():
            opt = self.optimizer.state.get(self.optimized[name], {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in opt:
                    state[f"adam.{name}.{key}"] = torch.as_tensor(opt[key])
        state["counters"] = torch.tensor([self.step_count, self.tokens_seen], dtype=torch.long)
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        device = self.sae.W_dec.device
        self.sae.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("sae.")})
        self.tokens_since_fired = state["tokens_since_fired"].to(device)
        if "density" in state:  # (checkpoints written before densities were tracked lack it)
            self.density = state["density"].to(device)
        for name, param in self.optimized.items():
            if f"adam.{name}.exp_avg" in state:
                self.optimizer.state[param] = {
                    "step": state[f"adam.{name}.step"].clone(),
                    # empty_like: the moments take the layout of the tensor Adam updates.
                    "exp_avg": torch.empty_like(param).copy_(state[f"adam.{name}.exp_avg"]),
                    "exp_avg_sq": torch.empty_like(param).copy_(state[f"adam.{name}.exp_avg_sq"]),
                }
        self.step_count, self.tokens_seen = (int(v) for v in state["counters"])
