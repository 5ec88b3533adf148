"""Sparse feature circuits (Marks et al. 2024): attribution through SAE features and error
nodes, direct edges between consecutive modules, and faithfulness checks by mean ablation."""

from .attribution import edge_effects, node_gradients
from .circuit import Circuit, Node, find_circuit
from .modules import Module, circuit_modules, module_states, upstream
from .pairs import ContrastivePairs, logit_diff, task_performance

__all__ = ["Circuit", "ContrastivePairs", "Module", "Node", "circuit_modules", "edge_effects", "find_circuit",
           "logit_diff", "module_states", "node_gradients", "task_performance", "upstream"]
