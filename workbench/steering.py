"""Steering with an SAE feature: add α·W_dec[f] at the SAE's hook, or clamp the feature to a value.

Two interventions (Templeton et al. 2024, "Scaling Monosemanticity", feature steering):

- ``alpha``: x ← x + α·W_dec[f] at every position (α in units of the feature's activation,
  so α = the feature's max activation adds what its strongest firing adds);
- ``clamp``: x ← x + (c − z_f(x))·W_dec[f], the feature's activation set to c at every
  position while the SAE's error term and every other feature are kept (0 ablates it).

``steer`` compares the next-token distribution after the prompt, and a greedy continuation,
with and without the intervention. Greedy decoding makes the comparison deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SteeringResult:
    prompt: str
    feature: int
    intervention: str  # "add α·W_dec[f]" or "clamp z_f to c"
    baseline: str  # greedy continuation without the intervention
    steered: str  # with it
    baseline_next: list[tuple[str, float]]  # top next tokens after the prompt, (token, probability)
    steered_next: list[tuple[str, float]]
    kl: float  # KL(baseline ‖ steered) of the next-token distribution after the prompt, nats


def steering_hook(sae, feature: int, alpha: float | None = None, clamp: float | None = None):
    """A TransformerLens forward hook (for ``sae.cfg.hook_name``) that applies the intervention."""
    if (alpha is None) == (clamp is None):
        raise ValueError("give exactly one of alpha (add α·W_dec[f]) or clamp (set the feature's activation to c)")
    if not 0 <= int(feature) < sae.cfg.d_sae:
        raise ValueError(f"feature must lie in [0, {sae.cfg.d_sae}), got {feature}")
    direction = sae.W_dec[int(feature)].detach()

    def hook(act, hook=None):
        flat = act.reshape(-1, sae.cfg.d_in)
        if alpha is not None:
            shift = float(alpha) * direction.to(act.dtype)
            return (flat + shift).reshape(act.shape)
        with torch.no_grad():
            z = sae.encode(flat.float())[:, int(feature)]
        return (flat + ((float(clamp) - z)[:, None] * direction).to(act.dtype)).reshape(act.shape)

    return hook


@torch.no_grad()
def steer(model, sae, feature: int, prompt: str, alpha: float | None = None, clamp: float | None = None,
          max_new_tokens: int = 20, top: int = 10) -> SteeringResult:
    """Greedy continuations of ``prompt`` and its next-token distribution, with and without
    steering feature ``feature`` of ``sae`` (see the module docstring for ``alpha``/``clamp``)."""
    from .evals import check_hook
    from .widgets.token_view import _check_text

    hook_name = check_hook(model, sae.cfg.hook_name)
    hook = steering_hook(sae, feature, alpha, clamp)
    tokens = _check_text(model, prompt)
    room = model.cfg.n_ctx - tokens.shape[1]
    if room < 1:
        raise ValueError(f"the prompt fills the model's context ({model.cfg.n_ctx} tokens): shorten it to leave room "
                         "for a continuation")
    steps = min(max_new_tokens, room)

    def run(steered: bool):
        hooks = [(hook_name, hook)] if steered else []
        ids = tokens.to(model.cfg.device)
        with model.hooks(fwd_hooks=hooks):
            first = model(ids)[0, -1].float().log_softmax(-1)
            for _ in range(steps):
                nxt = model(ids)[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
        text = model.tokenizer.decode(ids[0, tokens.shape[1]:].tolist())
        return first, text

    base_logp, base_text = run(False)
    steer_logp, steer_text = run(True)

    def top_tokens(logp):
        values, ids = logp.exp().topk(top)
        return [(model.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]

    kl = float((base_logp.exp() * (base_logp - steer_logp)).sum())
    what = f"add {alpha:g}·W_dec[{feature}]" if alpha is not None else f"clamp z_{feature} to {clamp:g}"
    return SteeringResult(prompt, int(feature), what, base_text, steer_text, top_tokens(base_logp),
                          top_tokens(steer_logp), kl)
