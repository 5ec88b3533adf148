"""Node and edge effects of SAE features and error nodes (Marks et al. 2024, §2).

Node effect of feature i at a module (attribution patching, Nanda 2023; Syed et al. 2023):
    IE_i ≈ ∂m/∂f_i · (f_i^patch − f_i^clean), at the clean input, one per position;
error node: IE_ε ≈ ∂m/∂ε · (ε^patch − ε^clean), summed over the model dimension.
Integrated gradients (Sundararajan et al. 2017; the paper's IG variant) averages the
gradient over the straight path from clean to patch values of the module,
f(α) = f_c + α(f_p − f_c), ε(α) likewise, upstream clean and downstream recomputed. We use
the midpoint rule α = (k + ½)/N, k = 0…N−1 (error O(1/N²) for a smooth path, against O(1/N)
for the left sum): the effects of one module then sum to the exact effect of patching the
whole module as N grows (tested).

All modules' AtP gradients come from one backward pass per batch of pairs: at each hook the
output is rewritten y = decode(f) + (x − decode(f).detach()), its value x and its Jacobian to
x the identity, so upstream gradients are the model's own while ∂m/∂f and ∂m/∂ε (= ∂m/∂y)
are recorded. IG takes one backward per module per batch, the N steps stacked in the batch.

Edge u → d between consecutive modules (``modules.upstream``): ∂m/∂d · ∂d/∂u · Δu, with the
upstream modules held as leaves so that the edge is direct (the paper's stop-gradients: a
path through another module of the graph is that module's edge, not this one's). ∂m/∂d is
the node gradient of the chosen method; ∂d/∂u is taken at the clean input (the paper's
linear edge approximation). One vectorised backward (``is_grads_batched``) per chunk of
downstream nodes, per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .modules import circuit_modules, join, module_states, split, transcoder_inputs, upstream
from .pairs import ContrastivePairs, logit_diff


class _Stop(Exception):
    """Raised in a hook to end a forward pass once the module of interest is computed."""


@dataclass
class NodeGradients:
    """Per batch of pairs: each module's clean and patch states and ∂m/∂f, ∂m/∂ε at them."""
    clean: dict[str, tuple[Tensor, Tensor]]
    patch: dict[str, tuple[Tensor, Tensor]]
    grads: dict[str, tuple[Tensor, Tensor]]
    metric_clean: Tensor  # [batch]
    metric_patch: Tensor

    def effects(self, hook: str) -> tuple[Tensor, Tensor]:
        """Per pair and position: feature effects [batch, pos, d_sae] and error effects [batch, pos]."""
        (f_c, e_c), (f_p, e_p), (g_f, g_e) = self.clean[hook], self.patch[hook], self.grads[hook]
        return g_f * (f_p - f_c), (g_e * (e_p - e_c)).sum(-1)


def _check(model, saes: dict, pairs: ContrastivePairs, method: str, steps: int) -> None:
    if method not in ("atp", "ig"):
        raise ValueError(f"method must be 'atp' (attribution patching) or 'ig' (integrated gradients), got {method!r}")
    if method == "ig" and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps (integrated-gradients steps) must be a positive integer, got {steps!r}")
    if not saes:
        raise ValueError("give at least one SAE: {hook name: sae}")
    circuit_modules(saes)
    for hook, sae in saes.items():
        if sae.is_transcoder and hook != sae.cfg.target_hook:
            raise ValueError(f"the transcoder given for {hook} predicts {sae.cfg.target_hook!r}: put it at that hook")
        if sae.cfg.d_in != model.cfg.d_model:
            raise ValueError(f"the SAE for {hook} reads d_in={sae.cfg.d_in}, but the model writes d_model="
                             f"{model.cfg.d_model} there")
    if pairs.clean.max() >= model.cfg.d_vocab or pairs.clean.min() < 0:
        raise ValueError(f"token ids must lie in [0, {model.cfg.d_vocab}) for this model")


def node_gradients(model, saes: dict, pairs: ContrastivePairs, metric=logit_diff, method: str = "atp",
                   steps: int = 10) -> NodeGradients:
    """Clean and patch states of every module and the metric's gradients at them (one batch)."""
    device = next(model.parameters()).device
    clean_tokens, patch_tokens = pairs.clean.to(device), pairs.patch.to(device)
    logits_patch, patch = module_states(model, saes, patch_tokens)
    metric_patch = metric(logits_patch, pairs).detach()
    if method == "atp":
        clean, grads, metric_clean = _transparent_gradients(model, saes, clean_tokens, pairs, metric)
    else:
        logits_clean, clean = module_states(model, saes, clean_tokens)
        metric_clean = metric(logits_clean, pairs).detach()
        grads = {hook: _ig_gradients(model, saes[hook], hook, clean_tokens, pairs, metric, clean[hook], patch[hook], steps)
                 for hook in saes}
    return NodeGradients(clean, patch, grads, metric_clean, metric_patch)


def _transparent_gradients(model, saes, tokens, pairs, metric):
    """One forward/backward at the clean input, recording (f, ε) and (∂m/∂f, ∂m/∂ε) everywhere."""
    recorded = {}

    def rewrite(x, hook):
        sae = saes[hook.name]
        with torch.no_grad():
            f, eps = split(sae, x, inputs.get(hook.name))
        f = f.requires_grad_()
        x_hat = join(sae, f, torch.zeros_like(x), x.detach())
        y = x_hat + (x - x_hat.detach())
        y.retain_grad()
        recorded[hook.name] = (f, eps, y)
        return y

    with torch.enable_grad(), transcoder_inputs(model, saes) as inputs, \
            model.hooks(fwd_hooks=[(hook, rewrite) for hook in saes]):
        m = metric(model(tokens), pairs)
        hooks = list(recorded)
        wrt = [recorded[h][0] for h in hooks] + [recorded[h][2] for h in hooks]
        found = torch.autograd.grad(m.sum(), wrt, allow_unused=True)  # the model's own .grad stay untouched
    n = len(hooks)
    grads = {h: (_or_zeros(found[i], recorded[h][0]), _or_zeros(found[n + i], recorded[h][2])) for i, h in enumerate(hooks)}
    states = {hook: (f.detach(), eps) for hook, (f, eps, _) in recorded.items()}
    return states, grads, m.detach()


def _or_zeros(grad, like):
    """A module the metric does not depend on (e.g. after the answer position) gets zeros."""
    return torch.zeros_like(like) if grad is None else grad


def _ig_gradients(model, sae, hook, tokens, pairs, metric, clean, patch, steps):
    """∂m/∂f and ∂m/∂ε averaged over the midpoints of the clean→patch path of one module."""
    (f_c, e_c), (f_p, e_p) = clean, patch
    alphas = ((torch.arange(steps, device=f_c.device, dtype=f_c.dtype) + 0.5) / steps).repeat_interleave(len(pairs))
    shape = (-1,) + (1,) * (f_c.ndim - 1)
    f = (f_c.repeat(steps, 1, 1) + alphas.view(shape) * (f_p - f_c).repeat(steps, 1, 1)).requires_grad_()
    eps = (e_c.repeat(steps, 1, 1) + alphas.view(shape) * (e_p - e_c).repeat(steps, 1, 1)).requires_grad_()
    x_ref = None
    if sae.cfg.normalize_activations != "none":  # the clean input sets the scale of every step
        x_ref = join(sae, f_c, e_c, None).repeat(steps, 1, 1)
    repeated = ContrastivePairs(pairs.clean.repeat(steps, 1), pairs.patch.repeat(steps, 1),
                                pairs.clean_answer.repeat(steps), pairs.patch_answer.repeat(steps), pairs.name)
    with torch.enable_grad(), model.hooks(fwd_hooks=[(hook, lambda x, hook: join(sae, f, eps, x_ref))]):
        m = metric(model(tokens.repeat(steps, 1)), repeated)
        g_f, g_e = torch.autograd.grad(m.sum(), [f, eps], allow_unused=True)
    g_f, g_e, n = _or_zeros(g_f, f), _or_zeros(g_e, eps), len(pairs)
    return g_f.view(steps, n, *f_c.shape[1:]).mean(0), g_e.view(steps, n, *e_c.shape[1:]).mean(0)


def edge_effects(model, saes: dict, pairs: ContrastivePairs, gradients: NodeGradients,
                 down_nodes: dict[str, list[tuple[int | None, int | None]]], per_position: bool,
                 node_chunk: int = 32) -> dict:
    """Direct edges into the given downstream nodes, summed over this batch's pairs.

    ``down_nodes[hook]`` lists nodes as (feature, position): feature None is the error node,
    position None sums over positions (aggregated circuits). Returns
    {(down_hook, down_node): {up_hook: (feature weights, error weights)}}, weights shaped
    [pos, d_sae] and [pos] when per_position, else [d_sae] and [] (summed over positions)."""
    device = next(model.parameters()).device
    tokens = pairs.clean.to(device)
    links = upstream(circuit_modules(saes))
    edges = {}
    for down, nodes in down_nodes.items():
        ups = links[down]
        if not nodes or not ups:
            continue
        leaves = {hook: tuple(t.detach().clone().requires_grad_() for t in gradients.clean[hook]) for hook in ups}
        computed = {}

        def as_leaf(x, hook):
            f, eps = leaves[hook.name]
            return join(saes[hook.name], f, eps, x)

        def downstream(x, hook):
            # A transcoder's features are computed from its input: the edges into them run
            # through its encoder, not the MLP (Dunefsky et al. 2024's input invariance).
            computed["f"], computed["eps"] = split(saes[down], x, inputs.get(down))
            raise _Stop

        hooks = [(hook, as_leaf) for hook in ups] + [(down, downstream)]
        with torch.enable_grad(), transcoder_inputs(model, {down: saes[down]}) as inputs, model.hooks(fwd_hooks=hooks):
            try:
                model(tokens)
            except _Stop:
                pass
        g_f, g_e = gradients.grads[down]
        flat = [t for hook in ups for t in leaves[hook]]
        # One vectorised backward per chunk of downstream nodes (is_grads_batched): node j's
        # target is Σ g·value over its feature (or error) and positions, so its grad_output is
        # the node gradient masked to that node.
        for start in range(0, len(nodes), node_chunk):
            chunk = nodes[start:start + node_chunk]
            v_f = torch.zeros((len(chunk),) + tuple(g_f.shape), dtype=g_f.dtype, device=g_f.device)
            v_e = torch.zeros((len(chunk),) + tuple(g_e.shape), dtype=g_e.dtype, device=g_e.device)
            for j, (feature, position) in enumerate(chunk):
                where = slice(None) if position is None else slice(position, position + 1)
                if feature is None:
                    v_e[j, :, where] = g_e[:, where]
                else:
                    v_f[j, :, where, feature] = g_f[:, where, feature]
            grads = torch.autograd.grad([computed["f"], computed["eps"]], flat, grad_outputs=[v_f, v_e],
                                        retain_graph=True, allow_unused=True, is_grads_batched=True)
            for j, (feature, position) in enumerate(chunk):
                weights = {}
                for i, hook in enumerate(ups):
                    (f_c, e_c), (f_p, e_p) = gradients.clean[hook], gradients.patch[hook]
                    gf, ge = grads[2 * i], grads[2 * i + 1]
                    wf = (gf[j] * (f_p - f_c)).sum(0) if gf is not None else torch.zeros_like(f_c[0])
                    we = (ge[j] * (e_p - e_c)).sum((0, -1)) if ge is not None else torch.zeros_like(e_c[0, :, 0])
                    weights[hook] = (wf, we) if per_position else (wf.sum(0), we.sum())
                edges[(down, (feature, position))] = weights
    return edges
