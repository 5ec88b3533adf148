"""One x-axis for every method: the fraction of MLP FLOPs a sparse kernel can skip.

Methods sparsify different tensors (the MLP input, the gate, x1), so their sparsities are
not comparable: 50% of the input is not 50% of x1. What they share is the work a kernel
skips (DESIGN.md, "Sparse inference"). Per token, each weight matrix of the MLP costs
d_model · d_mlp multiply-adds (plain: W_in, W_out; gated: W_gate, W_in, W_out), and:

- an input entry dropped (TEAL, WINA) skips its row of every matrix reading the input:
  W_in (and W_gate): d_mlp MACs per matrix;
- a gate entry dropped (CATS, CHESS, Top-k and FAT-ε on gated MLPs) skips that neuron's
  column of W_in and its row of W_out (the gate itself must be computed to know): 2·d_model;
- an x1 entry dropped or zero (CETT, Top-k/FAT-ε on plain MLPs, ReLU zeros) skips its row of
  W_out only (h, or act(gate) and up, had to be computed): d_model.

So the skipped fraction of a layer is (n_in·s_input + 2·s_gate + s_x1) / n_matrices, with
n_in = 2, n_matrices = 3 for gated MLPs and n_in = 1, n_matrices = 2 for plain ones. The
overall fraction weights each layer by its MACs. Attention and the unembedding are not counted.
"""

from __future__ import annotations

from .mlp import MLPSite

WEIGHTS = {"input": {True: 2, False: 1}, "gate": {True: 2, False: 0}, "x1": {True: 1, False: 1}}
"""Matrices' worth of d_model·d_mlp MACs skipped per unit of sparsity at each place, by gatedness."""


def layer_flops_skipped(site: MLPSite, sparsity: dict[str, float]) -> float:
    """Fraction of this MLP's MACs skipped, given ``sparsity`` per place ("input", "gate",
    "x1"; absent = dense)."""
    if "gate" in sparsity and not site.gated:
        raise ValueError(f"layer {site.layer}'s MLP is not gated: it has no gate sparsity")
    matrices = 3 if site.gated else 2
    return sum(WEIGHTS[where][site.gated] * value for where, value in sparsity.items()) / matrices


def flops_skipped(sites: list[MLPSite], sparsity: dict[str, float]) -> float:
    """Fraction of all MLP MACs skipped, from realised sparsity per site key
    ``"blocks.{layer}.mlp.{where}"`` (what ``SparsityMeter.sparsity()`` returns)."""
    per_layer: dict[int, dict[str, float]] = {}
    for key, value in sparsity.items():
        _, layer, _, where = key.split(".")
        per_layer.setdefault(int(layer), {})[where] = value
    total = skipped = 0.0
    for site in sites:
        macs = (3 if site.gated else 2) * site.d_model * site.d_mlp
        total += macs
        skipped += macs * layer_flops_skipped(site, per_layer.get(site.layer, {}))
    return skipped / total
