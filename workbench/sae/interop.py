"""SAELens interoperability: export our SAEs to SAELens folders, and open SAELens folders.

The export is written by SAELens itself (its own SAE classes and ``save_model``), so
``sae_lens.SAE.load_from_disk`` reads exactly what SAELens would have written. Weight
layout is shared (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec subtracted from the
input), so only the inference rule has to be mapped:

| ours                          | SAELens inference form                              |
|-------------------------------|-----------------------------------------------------|
| topk, hierarchical (full k)   | ``topk`` with the same k                            |
| gradient (no g at inference)  | ``topk`` with the same k                            |
| batchtopk, matryoshka         | ``jumprelu`` with every threshold = the EMA θ       |
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import SparseAutoencoder, create

TOPK_LIKE = ("topk", "hierarchical", "gradient")
THRESHOLD_LIKE = ("batchtopk", "matryoshka")


def _metadata(sae: SparseAutoencoder):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(hook_name=sae.cfg.hook_name or None, model_name=sae.cfg.model_name or None)


def to_sae_lens(sae: SparseAutoencoder):
    """The equivalent SAELens SAE object (inference form)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    common = dict(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, dtype="float32", device="cpu",
                  apply_b_dec_to_input=True, metadata=_metadata(sae))
    weights = {name: getattr(sae, name).detach().float().cpu().clone() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if sae.architecture in TOPK_LIKE:
        target = TopKSAE(TopKSAEConfig(k=sae.cfg.k, **common))
    elif sae.architecture in THRESHOLD_LIKE:
        target = JumpReLUSAE(JumpReLUSAEConfig(**common))
        weights["threshold"] = sae.threshold.detach().float().cpu().expand(sae.cfg.d_sae).clone()
    else:
        raise ValueError(f"no SAELens inference form for architecture {sae.architecture!r}")
    target.load_state_dict(weights)
    return target


def export_sae_lens(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``sae`` as a SAELens folder (open with ``sae_lens.SAE.load_from_disk``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_sae_lens(sae).save_model(str(folder))
    return folder


def load_sae_lens(folder: str | Path) -> SparseAutoencoder:
    """Open a SAELens SAE folder as one of ours: ``topk`` as TopK, ``jumprelu`` with a single
    threshold as BatchTopK (its inference form; the training k is not recorded there, so
    k is set to 1, which matters only if training continues); other SAELens
    architectures are refused."""
    from sae_lens import SAE

    theirs = SAE.load_from_disk(str(folder), device="cpu")
    arch = theirs.cfg.architecture()
    meta = theirs.cfg.metadata
    info = dict(hook_name=getattr(meta, "hook_name", None) or "", model_name=getattr(meta, "model_name", None) or "")
    if arch == "topk":
        ours = create("topk", theirs.cfg.d_in, theirs.cfg.d_sae, theirs.cfg.k, **info)
    elif arch == "jumprelu" and torch.unique(theirs.threshold).numel() == 1:
        ours = create("batchtopk", theirs.cfg.d_in, theirs.cfg.d_sae, 1, **info)
        ours.threshold.copy_(theirs.threshold[0])
        ours.threshold_weight.fill_(1.0)
    else:
        raise ValueError(f"{folder}: SAELens architecture {arch!r} (per-latent thresholds or other rules) "
                         "has no workbench equivalent; use it through sae_lens directly")
    if not getattr(theirs.cfg, "apply_b_dec_to_input", True):
        raise ValueError(f"{folder}: apply_b_dec_to_input=False is not supported (workbench subtracts b_dec)")
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(ours, name).copy_(getattr(theirs, name).float())
    return ours.eval()
