"""Transcoders (Dunefsky, Chlenski & Nanda 2024): a sparse map from an MLP's input to its output.

Any architecture becomes a transcoder when its config names a ``target_hook``: it encodes
the input hook's activations (centred by a fixed ``input_centre``) and decodes a prediction
of the target's (``SAEConfig``). The
trainer then takes (x, y) batches, from one cache of both hooks written in one pass; the
evals splice the prediction in place of the MLP's output (CE with the MLP replaced); the
circuits module takes it at the MLP's output, its features computed from the MLP's input.

The input is ``ln2.hook_normalized``, the MLP's input before ln2's affine weights: the
weights and bias are a fixed affine map, which the encoder absorbs (W_enc·(w⊙n + b) =
(diag(w) W_enc)·n + W_enc·b), so nothing the MLP sees is lost (Dunefsky et al. read the
same hook of GPT-2, where TransformerLens folds those weights into the MLP).
"""

from __future__ import annotations


def transcoder_hooks(layer: int) -> tuple[str, str]:
    """(input hook, target hook) of the MLP of block ``layer``: what a transcoder reads and predicts."""
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer must be a block index ≥ 0, got {layer!r}")
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
