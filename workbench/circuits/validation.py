"""Is a circuit faithful, and are its estimates right? (Marks et al. 2024, §3.2 and App. C)

Faithfulness of a set of nodes C: run the clean prompts with every node outside C
mean-ablated (its value replaced by its mean over the task's clean prompts, per position),
and compare the metric with the full model's and with the empty circuit's:
    F(C) = (m(C) − m(∅)) / (m(M) − m(∅)).
Completeness is the same measure for the complement, F(M \\ C): ablate the circuit's nodes
and keep everything else; a complete circuit drives it towards 0. Both are curves over the
node threshold (``faithfulness_curve``).

Exact activation patching (``patching_check``): for a sample of nodes of each module type,
set the node to its patch value in the clean run and read the change of the metric; the
attribution-patching and integrated-gradients estimates are compared with it (Pearson r
per module type).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .circuit import Circuit, Node, find_circuit
from .modules import circuit_modules, evaluating_all, join, module_states, split, transcoder_inputs
from .pairs import ContrastivePairs, logit_diff


@torch.no_grad()
def clean_means(model, saes: dict, pairs: ContrastivePairs, batch_size: int = 64) -> dict:
    """Per position, the mean of every feature and of every error vector over the clean prompts."""
    sums, n = {}, 0
    device = next(model.parameters()).device
    for batch in pairs.batches(batch_size):
        _, states = module_states(model, saes, batch.clean.to(device))
        for hook, (f, eps) in states.items():
            s_f, s_e = sums.get(hook, (0.0, 0.0))
            sums[hook] = (s_f + f.double().sum(0), s_e + eps.double().sum(0))
        n += len(batch)
    return {hook: ((s_f / n).float(), (s_e / n).float()) for hook, (s_f, s_e) in sums.items()}


def _masks(circuit: Circuit, nodes, saes: dict, positions: int, invert: bool) -> dict:
    """Per module, which features [pos, d_sae] and error nodes [pos] are kept."""
    masks = {h: (torch.zeros(positions, saes[h].cfg.d_sae, dtype=torch.bool), torch.zeros(positions, dtype=torch.bool))
             for h in circuit.hooks}
    for node in nodes:
        where = slice(None) if node.position is None else node.position
        features, errors = masks[node.hook]
        if node.feature is None:
            errors[where] = True
        else:
            features[where, node.feature] = True
    return {h: (~f, ~e) if invert else (f, e) for h, (f, e) in masks.items()}


@torch.no_grad()
def ablated_metric(model, saes: dict, pairs: ContrastivePairs, keep: dict, means: dict, metric=logit_diff,
                   batch_size: int = 64) -> float:
    """Mean metric on the clean prompts with every feature and error node that ``keep`` does
    not keep replaced by its clean mean ({hook: (feature mask [pos, d_sae], error mask [pos])})."""
    device = next(model.parameters()).device

    def ablate(x, hook):
        sae, (keep_f, keep_e), (mean_f, mean_e) = saes[hook.name], keep[hook.name], means[hook.name]
        f, eps = split(sae, x, inputs.get(hook.name))
        f = torch.where(keep_f.to(x.device), f, mean_f.to(x.device))
        eps = torch.where(keep_e.to(x.device)[:, None], eps, mean_e.to(x.device))
        return join(sae, f, eps, x)

    total = 0.0
    with transcoder_inputs(model, saes) as inputs, model.hooks(fwd_hooks=[(hook, ablate) for hook in keep]):
        for batch in pairs.batches(batch_size):
            total += float(metric(model(batch.clean.to(device)), batch).sum())
    return total / len(pairs)


def faithfulness_curve(model, saes: dict, pairs: ContrastivePairs, circuit: Circuit, thresholds, metric=logit_diff,
                       batch_size: int = 64, progress: bool = True) -> list[dict]:
    """For each node threshold: the circuit's size, m(C), m(M \\ C), faithfulness F(C) and
    completeness F(M \\ C), with m(M) the full model and m(∅) everything mean-ablated.
    Evaluate on pairs held out from those the circuit was found on, to keep it honest."""
    from tqdm.auto import tqdm

    with evaluating_all(saes):
        means = clean_means(model, saes, pairs, batch_size)
        positions = pairs.positions
        full = _masks(circuit, [], saes, positions, invert=True)
        empty = _masks(circuit, [], saes, positions, invert=False)
        m_full = ablated_metric(model, saes, pairs, full, means, metric, batch_size)
        m_empty = ablated_metric(model, saes, pairs, empty, means, metric, batch_size)
        span = m_full - m_empty
        rows = []
        for threshold in tqdm(list(thresholds), desc="faithfulness", unit="threshold", disable=not progress):
            nodes = [node for node, _ in circuit.nodes(threshold)]
            m_c = ablated_metric(model, saes, pairs, _masks(circuit, nodes, saes, positions, False), means, metric,
                                 batch_size)
            m_rest = ablated_metric(model, saes, pairs, _masks(circuit, nodes, saes, positions, True), means, metric,
                                    batch_size)
            rows.append({"threshold": float(threshold), "nodes": len(nodes),
                         "features": sum(node.feature is not None for node in nodes), "metric_circuit": m_c,
                         "metric_complement": m_rest, "faithfulness": (m_c - m_empty) / span,
                         "completeness": (m_rest - m_empty) / span, "metric_full": m_full, "metric_empty": m_empty})
    return rows


@torch.no_grad()
def exact_node_effects(model, sae, hook: str, pairs: ContrastivePairs, nodes: list[Node], metric=logit_diff,
                       batch_size: int = 64) -> list[float]:
    """For each node of ``hook``: the change of the mean metric when that node alone takes its
    patch value in the clean run (at its position, or at every position for an aggregated
    node), everything downstream recomputed. One forward pass per node and batch."""
    device = next(model.parameters()).device
    totals = [0.0] * len(nodes)
    for batch in pairs.batches(batch_size):
        clean, patch = batch.clean.to(device), batch.patch.to(device)
        f_patch, e_patch = module_states(model, {hook: sae}, patch)[1][hook]
        base = metric(model(clean), batch)
        for i, node in enumerate(nodes):
            where = slice(None) if node.position is None else slice(node.position, node.position + 1)

            def substitute(x, hook, node=node, where=where, f_patch=f_patch, e_patch=e_patch):
                f, eps = split(sae, x, inputs.get(hook.name))
                if node.feature is None:
                    eps[:, where] = e_patch[:, where]
                else:
                    f[:, where, node.feature] = f_patch[:, where, node.feature]
                return join(sae, f, eps, x)

            with transcoder_inputs(model, {hook: sae}) as inputs, model.hooks(fwd_hooks=[(hook, substitute)]):
                totals[i] += float((metric(model(clean), batch) - base).sum())
    return [total / len(pairs) for total in totals]


@dataclass
class PatchingCheck:
    rows: list[dict]  # one per sampled node: module, kind, node, exact, atp, ig
    correlation: dict[str, dict[str, float]]  # module kind -> {"atp": r, "ig": r}
    steps: int

    def table(self) -> str:
        lines = ["| module type | nodes | r (AtP vs exact) | r (IG vs exact) |", "|---|---|---|---|"]
        for kind, r in self.correlation.items():
            count = sum(row["kind"] == kind for row in self.rows)
            lines.append(f"| {kind} | {count} | {r['atp']:.3f} | {r['ig']:.3f} |")
        return "\n".join(lines)


def patching_check(model, saes: dict, pairs: ContrastivePairs, per_module: int = 8, steps: int = 10,
                   metric=logit_diff, seed: int = 0, progress: bool = True) -> PatchingCheck:
    """AtP and IG node effects against exact activation patching, for ``per_module`` nodes of
    every module: half the nodes with the largest AtP estimates, half drawn at random among
    those whose value differs between clean and patch somewhere (a node that never changes
    has effect 0 by every method and would only inflate the correlation); plus the module's
    error node. Nodes are aggregated over positions (patched at every position at once)."""
    from tqdm.auto import tqdm

    kwargs = dict(metric=metric, edges=False, progress=False)
    atp = find_circuit(model, saes, pairs, method="atp", **kwargs)
    ig = find_circuit(model, saes, pairs, method="ig", steps=steps, **kwargs)
    rng = random.Random(seed)
    modules = circuit_modules(saes)
    changed = changed_nodes(model, saes, pairs)
    rows = []
    with evaluating_all(saes):
        for module in tqdm(modules, desc="exact patching", unit="module", disable=not progress):
            candidates = changed[module.hook]
            ranked = sorted(candidates, key=lambda n: -abs(atp.node_effect(n)))
            chosen = ranked[:per_module // 2]
            rest = [n for n in candidates if n not in chosen]
            chosen += rng.sample(rest, min(len(rest), per_module - len(chosen)))
            nodes = chosen + [Node(module.hook, None, None)]
            for node, exact in zip(nodes, exact_node_effects(model, saes[module.hook], module.hook, pairs, nodes, metric)):
                rows.append({"module": module.label, "kind": module.kind, "node": node, "exact": exact,
                             "atp": atp.node_effect(node), "ig": ig.node_effect(node)})
    correlation = {}
    for kind in dict.fromkeys(m.kind for m in modules):
        mine = [row for row in rows if row["kind"] == kind]
        exact = torch.tensor([row["exact"] for row in mine])
        correlation[kind] = {method: _pearson(exact, torch.tensor([row[method] for row in mine]))
                             for method in ("atp", "ig")}
    return PatchingCheck(rows, correlation, steps)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2 or float(a.std()) == 0 or float(b.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@torch.no_grad()
def changed_nodes(model, saes: dict, pairs: ContrastivePairs) -> dict[str, list[Node]]:
    """Aggregated feature nodes whose value differs between a clean and its patch prompt."""
    with evaluating_all(saes):
        _, clean = module_states(model, saes, pairs.clean.to(next(model.parameters()).device))
        _, patch = module_states(model, saes, pairs.patch.to(next(model.parameters()).device))
    return {hook: [Node(hook, int(f), None) for f in ((clean[hook][0] - patch[hook][0]).abs().amax((0, 1)) > 0)
                   .nonzero().flatten()] for hook in saes}

