"""A sparse feature circuit: node effects over a set of pairs, thresholds, and direct edges.

``find_circuit`` runs the two passes of Marks et al. 2024 (§2): node effects of every
feature and error node (mean over pairs; summed over positions, or per position for
templated prompts of one length), then edges into the nodes above the node threshold.
Effects are kept for every node, so a lower or higher threshold re-filters without
recomputing (``nodes``, ``edges_above``); edges exist only among the nodes that were above
the threshold given to ``find_circuit`` (choose it as the lowest you will look at).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .attribution import _check, edge_effects, node_gradients
from .modules import circuit_modules, evaluating_all
from .pairs import ContrastivePairs, logit_diff


class Node(NamedTuple):
    hook: str
    feature: int | None  # None: the module's error node
    position: int | None  # None: summed over positions

    def label(self, labels: dict[str, str] | None = None) -> str:
        module = (labels or {}).get(self.hook, self.hook)
        what = "ε" if self.feature is None else str(self.feature)
        return f"{module}/{what}" + ("" if self.position is None else f"@{self.position}")


@dataclass
class Circuit:
    task: str
    hooks: list[str]  # forward order
    labels: dict[str, str]  # hook -> short module name (attn0, mlp0, resid0, ...)
    per_position: bool
    method: str
    steps: int
    n_pairs: int
    feature_effects: dict[str, Tensor]  # [pos, d_sae] per position, else [d_sae]
    error_effects: dict[str, Tensor]  # [pos], else []
    edges: dict[tuple[Node, Node], float] = field(default_factory=dict)  # (up, down) -> weight
    node_threshold: float = 0.0  # nodes above it got their incoming edges computed
    metric_clean: float = 0.0  # mean metric on the clean prompts
    metric_patch: float = 0.0  # on the patch prompts

    def node_effect(self, node: Node) -> float:
        where = () if node.position is None else (node.position,)
        if node.feature is None:
            return float(self.error_effects[node.hook][where])
        return float(self.feature_effects[node.hook][where + (node.feature,)])

    def nodes(self, threshold: float | None = None, include_errors: bool = True) -> list[tuple[Node, float]]:
        """Nodes with |effect| > threshold (default: the circuit's), largest first."""
        threshold = self.node_threshold if threshold is None else float(threshold)
        found = []
        for hook in self.hooks:
            features, errors = self.feature_effects[hook], self.error_effects[hook]
            for index in (features.abs() > threshold).nonzero().tolist():
                position, feature = (index[0], index[1]) if self.per_position else (None, index[0])
                found.append(Node(hook, feature, position))
            if include_errors:
                for index in (errors.abs().reshape(-1) > threshold).nonzero().flatten().tolist():
                    found.append(Node(hook, None, index if self.per_position else None))
        return sorted(((node, self.node_effect(node)) for node in found), key=lambda item: -abs(item[1]))

    def edges_above(self, node_threshold: float | None = None, edge_threshold: float = 0.0
                    ) -> list[tuple[Node, Node, float]]:
        """Edges with |weight| > edge_threshold between nodes with |effect| > node_threshold."""
        threshold = self.node_threshold if node_threshold is None else max(float(node_threshold), self.node_threshold)
        kept = {node for node, _ in self.nodes(threshold)}
        return sorted(((u, d, w) for (u, d), w in self.edges.items() if u in kept and d in kept and abs(w) > edge_threshold),
                      key=lambda e: -abs(e[2]))

    def summary(self, threshold: float | None = None) -> str:
        nodes = self.nodes(threshold)
        by_module = {}
        for node, _ in nodes:
            by_module[self.labels[node.hook]] = by_module.get(self.labels[node.hook], 0) + 1
        return (f"{self.task}: {len(nodes)} nodes with |effect| > {self.node_threshold if threshold is None else threshold:g} "
                f"({', '.join(f'{k} {v}' for k, v in by_module.items())}); {len(self.edges_above(threshold))} edges; "
                f"metric {self.metric_clean:.3f} clean, {self.metric_patch:.3f} patch; {self.method}"
                + (f" ({self.steps} steps)" if self.method == "ig" else "") + f", {self.n_pairs} pairs")


def find_circuit(model, saes: dict, pairs: ContrastivePairs, metric=logit_diff, method: str = "ig", steps: int = 10,
                 node_threshold: float = 0.02, edges: bool = True, per_position: bool = False, batch_size: int = 32,
                 progress: bool = True) -> Circuit:
    """Node effects of every feature and error node of ``saes`` ({hook: sae}) on ``pairs``
    (mean over pairs), then direct edges into every node with |effect| > node_threshold.

    ``method``: "atp" (attribution patching) or "ig" (integrated gradients, ``steps`` steps);
    ``per_position``: keep a node per position (templated pairs of one length) instead of
    summing each feature's effect over positions."""
    from tqdm.auto import tqdm

    _check(model, saes, pairs, method, steps)
    modules = circuit_modules(saes)
    hooks = [m.hook for m in modules]
    with evaluating_all(saes):
        batches = list(pairs.batches(batch_size))
        bar = tqdm(total=len(batches) * (2 if edges else 1), desc=f"circuit ({method}): nodes, then edges",
                   unit="batch", disable=not progress)
        sums_f = {h: torch.zeros(pairs.positions, saes[h].cfg.d_sae, dtype=torch.float64) for h in hooks}
        sums_e = {h: torch.zeros(pairs.positions, dtype=torch.float64) for h in hooks}
        metric_clean = metric_patch = 0.0
        kept_grads, kept_bytes = [], 0  # reused by the edge pass while they fit the budget
        for batch in batches:
            grads = node_gradients(model, saes, batch, metric, method, steps)
            kept_bytes += _nbytes(grads)
            kept_grads.append(grads if kept_bytes <= REUSE_BYTES else None)
            for h in hooks:
                effect_f, effect_e = grads.effects(h)
                sums_f[h] += effect_f.sum(0).detach().cpu()
                sums_e[h] += effect_e.sum(0).detach().cpu()
            metric_clean += float(grads.metric_clean.sum())
            metric_patch += float(grads.metric_patch.sum())
            bar.update(1)
        n = len(pairs)
        reduce = (lambda t: t / n) if per_position else (lambda t: t.sum(0) / n)
        circuit = Circuit(pairs.name, hooks, {m.hook: m.label for m in modules}, per_position, method, steps, n,
                          {h: reduce(sums_f[h]) for h in hooks}, {h: reduce(sums_e[h]) for h in hooks},
                          node_threshold=float(node_threshold), metric_clean=metric_clean / n,
                          metric_patch=metric_patch / n)
        if edges:
            circuit.edges = _edges(model, saes, batches, kept_grads, metric, method, steps, circuit, bar)
        bar.close()
        return circuit


REUSE_BYTES = 1 << 30  # node gradients kept for the edge pass (recomputed beyond this)


def _nbytes(grads) -> int:
    return sum(t.numel() * t.element_size() for part in (grads.clean, grads.patch, grads.grads)
               for pair in part.values() for t in pair)


def _edges(model, saes, batches, kept_grads, metric, method, steps, circuit: Circuit, bar) -> dict:
    kept = [node for node, _ in circuit.nodes()]
    down_nodes = {h: [(node.feature, node.position) for node in kept if node.hook == h] for h in circuit.hooks}
    kept_up = {}
    for node in kept:
        kept_up.setdefault(node.hook, []).append(node)
    totals: dict[tuple[Node, Node], float] = {}
    for batch, grads in zip(batches, kept_grads):
        grads = grads or node_gradients(model, saes, batch, metric, method, steps)
        for (down_hook, (feature, position)), weights in edge_effects(model, saes, batch, grads, down_nodes,
                                                                       circuit.per_position).items():
            down = Node(down_hook, feature, position)
            for up_hook, (w_f, w_e) in weights.items():
                for up in kept_up.get(up_hook, []):
                    where = () if up.position is None else (up.position,)
                    w = w_e[where] if up.feature is None else w_f[where + (up.feature,)]
                    totals[(up, down)] = totals.get((up, down), 0.0) + float(w)
        bar.update(1)
    n = circuit.n_pairs
    return {key: value / n for key, value in totals.items()}
