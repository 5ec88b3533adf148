"""Sparse feature circuits (Marks et al. 2024): attribution through SAE features and error
nodes, direct edges between consecutive modules, built-in contrastive tasks, and checks of
faithfulness (mean ablation) and of the estimates (exact activation patching).

    pairs = wb.circuits.task_pairs("brackets", model, n=128)
    circuit = wb.circuits.find_circuit(model, saes, pairs)          # {hook: sae}, IG by default
    wb.circuits.faithfulness_curve(model, saes, held_out, circuit, [0.05, 0.1, 0.2])
    wb.CircuitViewer(circuit, indexes, model)
"""

from .attribution import edge_effects, node_gradients
from .circuit import Circuit, Node, find_circuit
from .modules import Module, circuit_hooks, circuit_modules, module_states, upstream
from .pairs import ContrastivePairs, logit_diff, task_performance
from .tasks import TASKS, list_tasks, task_pairs
from .validation import (PatchingCheck, ablated_metric, changed_nodes, clean_means, exact_node_effects,
                         faithfulness_curve, patching_check)

__all__ = ["Circuit", "ContrastivePairs", "Module", "Node", "PatchingCheck", "TASKS", "ablated_metric", "changed_nodes", "circuit_hooks", "circuit_modules",
           "clean_means", "edge_effects", "exact_node_effects", "faithfulness_curve", "find_circuit", "list_tasks",
           "logit_diff", "module_states", "node_gradients", "patching_check", "task_pairs", "task_performance",
           "upstream"]
