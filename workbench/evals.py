"""Evaluation metrics: model loss, and SAE reconstruction and downstream (spliced-in) metrics."""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .sae.base import did_you_mean


def check_tokens(model, tokens: torch.Tensor, batch_size: int = 1) -> None:
    """Refuse token sets a model pass would fail on deep inside (an empty cat, an embedding
    'index out of range'): they must be integer ids [n_seq ≥ 1, seq_len ≥ 2] below d_vocab."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor of token ids, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq >= 1, seq_len >= 2], got shape {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.cfg.d_vocab:
        raise ValueError(f"token ids must lie in [0, d_vocab={model.cfg.d_vocab}), got ids from {low} to {high}: "
                         "were they made by another tokenizer?")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def check_hook(model, hook: str) -> str:
    """``hook`` if it is a hook point of ``model``; otherwise a ValueError naming the closest
    ones (TransformerLens raises a bare KeyError from deep inside the run)."""
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"name a hook of the model, e.g. 'blocks.0.hook_resid_post'; got {hook!r}")
    if hook not in model.hook_dict:
        raise ValueError(f"{hook!r} is not a hook of this model.{did_you_mean(hook, model.hook_dict)} "
                         "List them with sorted(model.hook_dict).")
    return hook


@torch.no_grad()
def check_splice(model, sae, hook: str | None, tokens: torch.Tensor, batch_size: int = 1) -> str:
    """The hook at which ``sae`` is spliced into ``model`` (``hook``, default the SAE's own
    hook_name; a transcoder writes its target_hook), checked once before any long pass: every
    entry point that hooks an SAE into a model goes through here. Checks the tokens, that the
    hook exists, and that its width per position is the SAE's d_in, probed on one row of two
    tokens (a mismatch would otherwise surface as 'The size of tensor a ... must match' in the
    middle of the run). A transcoder's input hook is checked the same way."""
    if sae.is_transcoder:
        if hook not in (None, sae.cfg.target_hook):
            raise ValueError(f"a transcoder replaces {sae.cfg.target_hook!r} (its target) with its prediction from "
                             f"{sae.cfg.hook_name!r}; it cannot be spliced at {hook!r}")
        check_tokens(model, tokens, batch_size)
        _check_width(model, sae, sae.cfg.hook_name, tokens)
        return _check_width(model, sae, sae.cfg.target_hook, tokens)
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ValueError("name the hook to splice at (the SAE has no hook_name recorded)")
    check_tokens(model, tokens, batch_size)
    return _check_width(model, sae, hook, tokens)


def _check_width(model, sae, hook: str, tokens: torch.Tensor) -> str:
    check_hook(model, hook)
    _, cache = model.run_with_cache(tokens[:1, :2].to(model.cfg.device), names_filter=hook)
    shape = tuple(cache[hook].shape)  # [batch, pos, ...]: the SAE reads the flattened rest
    width = cache[hook][0, 0].numel()
    if width != sae.cfg.d_in:
        trained = f"trained on {sae.cfg.hook_name!r}" if sae.cfg.hook_name else "its hook is not recorded"
        model_name = f" of {sae.cfg.model_name!r}" if sae.cfg.model_name else ""
        raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} activations ({trained}{model_name}), but {hook!r} of this "
                         f"model carries {width} per position (activation shape {shape}). Splice it at a hook of width "
                         f"{sae.cfg.d_in}, or use an SAE trained on {hook!r}.")
    return hook


@torch.no_grad()
def sequence_losses(model, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[n_seq] float64: each sequence's summed next-token cross-entropy (nats), for means and
    bootstrap intervals over sequences."""
    check_tokens(model, tokens, batch_size)
    sums = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        sums.append(model(batch, return_type="loss", loss_per_token=True).double().sum(1).cpu())
    return torch.cat(sums)


def model_loss(model, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over all predicted positions.

    Summed in float64 across batches so the mean does not depend on the batch size.
    """
    return float(sequence_losses(model, tokens, batch_size).sum()) / (tokens.shape[0] * (tokens.shape[1] - 1))


def bootstrap_ratio_ci(dense: torch.Tensor, sparse: torch.Tensor, tokens_per_sequence: int, n_resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the perplexity ratio exp(mean loss sparse − mean loss
    dense), resampling sequences (paired: one draw picks a sequence's dense and sparse loss).

    ``dense``, ``sparse``: [n_seq] summed losses per sequence (``sequence_losses``). Sequences,
    not tokens, are the unit: tokens of one sequence are not independent.
    """
    if dense.shape != sparse.shape or dense.ndim != 1 or dense.numel() < 2:
        raise ValueError(f"need two [n_seq ≥ 2] loss vectors of one shape, got {tuple(dense.shape)} and {tuple(sparse.shape)}")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(dense.numel(), (n_resamples, dense.numel()), generator=generator)
    gap = (sparse.double() - dense.double())[picks].sum(1) / (dense.numel() * tokens_per_sequence)
    low, high = torch.quantile(gap.exp(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(low), float(high)


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
    (tensors, or (x, g) pairs, passed on as g to SAEs that select with it; a transcoder takes
    (x, y) pairs and is scored on predicting y)."""
    sse = sum_sq = 0.0
    sum_x = None
    n = 0
    l0_total = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    device = sae.W_dec.device
    with evaluating(sae):
        for batch in batches:
            x, second = (batch if isinstance(batch, (tuple, list)) else (batch, None))
            if sae.is_transcoder and second is None:
                raise ValueError(f"a transcoder is scored on (x, y) batches: y of {sae.cfg.target_hook!r} beside x of "
                                 f"{sae.cfg.hook_name!r} (ActivationCache.batches(..., target_hook=...))")
            g = None if sae.is_transcoder else second
            x = x.to(device, torch.float32)
            result = sae(x, **({"g": g.to(device, torch.float32)} if g is not None else {}))
            if sae.is_transcoder:
                x = second.to(device, torch.float32)  # the target: FVU of the prediction
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


GRADIENTS = ("entropy", "argmax", "labels", "none")
"""What a gradient SAE is given at evaluation (``downstream_metrics(gradient=...)``):

- ``"entropy"`` (default, label-free): ∂H_t/∂x_t, H_t = Σ_y p_t(y)·(−log p_t(y)) the
  model's expected next-token loss under its own prediction at position t;
- ``"argmax"`` (label-free): ∂(−log p_t(argmax p_t))/∂x_t, the argmax held fixed;
- ``"labels"``: ∂(−log p_t(token_{t+1}))/∂x_t, the paper's protocol (Olmo et al. 2024). It
  knows the token being scored, so it leaks the answer into the selection: use it only to
  reproduce that protocol, never as the headline number;
- ``"none"``: no gradient, selection by z alone (the floor: what generation can use).

Each is a per-position gradient: the objective of position t only, differentiated with
respect to the activation at t only. A gradient of the sequence sum would let x_t's
selection see the losses (and so the labels) of every later position through attention.
"""


def _position_objective(logits: torch.Tensor, tokens: torch.Tensor, objective: str) -> torch.Tensor:
    """[batch, pos] per-position objective whose gradient the SAE selects with."""
    log_probs = logits.float().log_softmax(-1)
    if objective == "entropy":
        return -(log_probs.exp() * log_probs).sum(-1)
    if objective == "argmax":
        return -log_probs.gather(-1, log_probs.detach().argmax(-1, keepdim=True)).squeeze(-1)
    # labels: position t predicts token t+1; the last position has no label (objective 0).
    nll = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return torch.cat([nll, nll.new_zeros(nll.shape[0], 1)], dim=1)


def hook_gradients(model, tokens: torch.Tensor, hook: str, objective: str = "entropy", batch_size: int = 16,
                   exact_jacobian: bool = False) -> torch.Tensor:
    """Per-position gradients g[s, t] = ∂objective_t/∂x_t of the activation at ``hook`` on the
    clean model, for every sequence s of ``tokens`` [n_seq, seq_len] (see ``GRADIENTS``).

    Position t's objective depends on x_{≤t} only (causal attention), and the gradient we
    want is the diagonal of the Jacobian ∂objective/∂x. Differentiating the sum of the
    objectives would add every later position's term. One backward gives the diagonal when
    the attention layers above the hook pass gradient only from a query to its own key and
    value (``_diagonal_attention_hooks``): the forward values are unchanged. Where that
    rewrite does not apply (hooks inside an attention layer, rotary, grouped or soft-capped
    attention), or with ``exact_jacobian=True``, one backward per position is run instead
    (batched with vmap; ~seq_len times slower). The activation is replaced by a leaf tensor,
    so nothing below the hook is differentiated. Returned on the CPU, float32, shaped like
    the activation.
    """
    if objective not in GRADIENTS or objective == "none":
        raise ValueError(f"objective must be one of {GRADIENTS[:-1]}, got {objective!r}")
    check_hook(model, hook)
    check_tokens(model, tokens, batch_size)
    device = model.cfg.device
    diagonal = None if exact_jacobian else _diagonal_attention_hooks(model, hook)
    out = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size].to(device)
        captured = {}

        def leaf(act, hook):
            captured["x"] = act.detach().requires_grad_(True)
            return captured["x"]

        with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, leaf)] + (diagonal or [])):
            per_position = _position_objective(model(batch), batch, objective)  # [batch, pos]
            x = captured["x"]
            if diagonal is not None:
                (grads,) = torch.autograd.grad(per_position.sum(), x)
            else:
                grads = _jacobian_diagonal(per_position, x)
        out.append(grads.detach().float().cpu())
    return torch.cat(out)


def _jacobian_diagonal(per_position: torch.Tensor, x: torch.Tensor, positions_per_pass: int = 8) -> torch.Tensor:
    """[batch, pos, ...]: ∂per_position[:, t]/∂x[:, t] by one backward per position, vmapped."""
    seq_len, device = per_position.shape[1], x.device
    grads = torch.empty_like(x)
    for first in range(0, seq_len, positions_per_pass):
        positions = torch.arange(first, min(first + positions_per_pass, seq_len), device=device)
        rows = torch.arange(len(positions), device=device)
        one_hot = torch.zeros(len(positions), *per_position.shape, device=device, dtype=per_position.dtype)
        one_hot[rows, :, positions] = 1
        (jac,) = torch.autograd.grad(per_position, x, grad_outputs=one_hot, retain_graph=True, is_grads_batched=True)
        grads[:, positions] = jac[rows, :, positions].transpose(0, 1)
    return grads


_INSIDE_ATTENTION = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
                     "hook_attn_input", "hook_q_input", "hook_k_input", "hook_v_input")


def _diagonal_attention_hooks(model, hook: str) -> list | None:
    """Hooks that make every attention layer after ``hook`` pass gradient from query t only to
    key t and value t, leaving forward values unchanged; None where that is not supported.

    Scores: s_ts − [q_t · (k_s − sg(k_s)) / scale] for s ≠ t (the bracket is zero in value and
    removes ∂s_ts/∂k_s). Outputs: z_t − Σ_{s≠t} A_ts (v_s − sg(v_s)) (removes ∂z_t/∂v_s).
    """
    cfg = model.cfg
    if (cfg.positional_embedding_type == "rotary" or getattr(cfg, "n_key_value_heads", None)
            or getattr(cfg, "attn_scores_soft_cap", -1) > 0 or getattr(cfg, "use_logn_attn", False)
            or getattr(cfg, "use_attention_sinks", False)):
        return None
    parts = hook.split(".")
    if parts[0] != "blocks":
        first = 0 if hook in ("hook_embed", "hook_pos_embed") else cfg.n_layers
    else:
        layer, rest = int(parts[1]), ".".join(parts[2:])
        if any(rest.endswith(name) for name in _INSIDE_ATTENTION):
            return None
        first = layer if rest == "hook_resid_pre" or rest.startswith("ln1.") else layer + 1
    hooks = []
    for layer in range(first, cfg.n_layers):
        attn, live = model.blocks[layer].attn, {}

        def keep(name, live=live):
            def hook_fn(act, hook):
                live[name] = act
            return hook_fn

        def scores(act, hook, attn=attn, live=live):
            q = live["q"].transpose(1, 2)  # [batch, head, query, d_head]
            dk = (live["k"] - live["k"].detach()).permute(0, 2, 3, 1)  # [batch, head, d_head, key]
            off = ~torch.eye(act.shape[-2], act.shape[-1], dtype=torch.bool, device=act.device)
            return act - torch.where(off, q @ dk / attn.attn_scale, 0.0)

        def z(act, hook, live=live):
            pattern = live["pattern"]
            off = ~torch.eye(pattern.shape[-2], pattern.shape[-1], dtype=torch.bool, device=act.device)
            dv = (live["v"] - live["v"].detach()).transpose(1, 2)  # [batch, head, key, d_head]
            return act - (torch.where(off, pattern, 0.0) @ dv).transpose(1, 2)

        prefix = f"blocks.{layer}.attn."
        hooks += [(prefix + "hook_q", keep("q")), (prefix + "hook_k", keep("k")), (prefix + "hook_v", keep("v")),
                  (prefix + "hook_attn_scores", scores), (prefix + "hook_pattern", keep("pattern")), (prefix + "hook_z", z)]
    return hooks


@contextmanager
def evaluating(sae):
    """Evaluate ``sae`` in eval mode (BatchTopK then uses its threshold, not the batch, and no
    statistic is updated), restoring its mode afterwards: evaluation never changes an SAE."""
    was_training = sae.training
    sae.eval()
    try:
        yield sae
    finally:
        sae.train(was_training)


@torch.no_grad()
def downstream_metrics(model, sae, tokens: torch.Tensor, hook: str | None = None, batch_size: int = 16,
                       gradient: str = "entropy", gradients: torch.Tensor | None = None) -> DownstreamMetrics:
    """Next-token CE with the SAE's reconstruction spliced in at ``hook`` (default: the
    SAE's own hook_name), against the clean model, zero- and mean-ablation; and the KL
    of the spliced model's predictions from the clean ones.

    A gradient SAE (Olmo et al. 2024) selects with a per-position gradient on the clean
    model chosen by ``gradient`` (see ``GRADIENTS``): label-free ``"entropy"`` by default,
    ``"labels"`` for the paper's protocol (it sees the answer), ``"none"`` for z alone.
    ``gradients`` [n_seq, seq_len, ...] may pass ``hook_gradients(...)`` computed once for
    several SAEs. The SAE is evaluated in eval mode and left exactly as it was."""
    hook = check_splice(model, sae, hook, tokens, batch_size)
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    device = model.cfg.device
    if sae.architecture == "gradient" and gradient != "none" and gradients is None:
        gradients = hook_gradients(model, tokens, hook, gradient, batch_size=batch_size)
    if sae.architecture != "gradient" or gradient == "none":
        gradients = None
    if gradients is not None and tuple(gradients.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"gradients {tuple(gradients.shape)} do not match tokens {tuple(tokens.shape)}")
    with evaluating(sae):
        return _downstream(model, sae, tokens, hook, batch_size, gradients, device)


@torch.no_grad()
def spliced_loss(model, sae, tokens: torch.Tensor, hook: str | None = None, batch_size: int = 16,
                 gradient: str = "entropy", gradients: torch.Tensor | None = None) -> float:
    """Only the CE loss (nats/token) with the SAE spliced in: one forward per batch, for
    sweeps that score many SAEs against one clean model (``downstream_metrics`` also runs
    the clean model and both ablations every time). Same arguments and gradient rules."""
    hook = check_splice(model, sae, hook, tokens, batch_size)
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if sae.architecture == "gradient" and gradient != "none" and gradients is None:
        gradients = hook_gradients(model, tokens, hook, gradient, batch_size=batch_size)
    if sae.architecture != "gradient" or gradient == "none":
        gradients = None
    total, count = 0.0, 0
    with evaluating(sae):
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start:start + batch_size].to(model.cfg.device)
            grad = gradients[start:start + batch_size].to(model.cfg.device) if gradients is not None else None
            loss = model.run_with_hooks(batch, return_type="loss", loss_per_token=True,
                                        fwd_hooks=splice_hooks(sae, hook, grad))
            total += float(loss.double().sum())
            count += loss.numel()
    return total / count


def splice_hooks(sae, hook: str, grad: torch.Tensor | None = None) -> list:
    """The forward hooks that replace ``hook``'s activation by the SAE's reconstruction of it;
    for a transcoder, that replace its target hook by its prediction from its input hook,
    captured earlier in the same pass (the MLP's output computed by the transcoder instead)."""
    def run(source, act):
        flat = source.reshape(act.shape[0] * act.shape[1], -1).float()
        extra = {"g": grad.reshape(flat.shape).float()} if grad is not None else {}
        return sae(flat.to(sae.W_dec.device), **extra).x_hat.to(act.dtype).reshape(act.shape)

    if not sae.is_transcoder:
        return [(hook, lambda act, hook: run(act, act))]
    captured = {}

    def capture(act, hook):
        captured["x"] = act

    return [(sae.cfg.hook_name, capture), (hook, lambda act, hook: run(captured.pop("x"), act))]


def _downstream(model, sae, tokens, hook, batch_size, gradients, device) -> DownstreamMetrics:
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
        grad = gradients[start:start + batch_size].to(device) if gradients is not None else None

        clean_logits = model(batch)
        spliced_logits = model.run_with_hooks(batch, fwd_hooks=splice_hooks(sae, hook, grad))
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
