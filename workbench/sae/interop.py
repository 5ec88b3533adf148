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
| jumprelu, featurechoice       | ``jumprelu`` with its per-latent thresholds         |
| relu (ReLU-L1)                | ``standard``                                        |
| relu transcoder               | ``transcoder`` (input_centre folded into b_enc)     |
| threshold-like transcoder     | ``jumprelu_transcoder`` (the same, with thresholds) |

SAELens has no TopK transcoder, so a TopK-family transcoder is refused rather than exported
as an SAE (which would subtract b_dec from its input).

Opening a SAELens folder honours every config field that changes the encoding (sae_lens
6.54, ``saes/sae.py`` and ``saes/topk_sae.py``), by folding it into the weights where it is
linear and carrying it in our config where it is per input:

| SAELens field                                  | here                                           |
|------------------------------------------------|------------------------------------------------|
| rescale_acts_by_decoder_norm=True (topk)       | folded: W_enc, b_enc ×‖W_dec,i‖; W_dec rows unit |
| normalize_activations=expected_average_only_in | folded from activation_scaler.json (×s)        |
| normalize_activations=covariance_whitening     | folded from activation_scaler.json + its matrix |
| normalize_activations=layer_norm               | cfg.normalize_activations (per row)            |
| normalize_activations=constant_norm_rescale    | cfg.normalize_activations (per row)            |
| reshape_activations=hook_z                     | cfg.reshape_activations                        |
| apply_b_dec_to_input=False                     | folded: b_enc += b_dec W_enc                   |
| hook_head_index set (one head of hook_z)       | refused: workbench SAEs read whole hooks       |

Their architectures open as: ``topk`` → topk; ``standard`` → relu; ``jumprelu`` with one
threshold shared by every latent (how BatchTopK SAEs are exported) → batchtopk, with
per-latent thresholds → jumprelu (decoder norms folded in, thresholds scaled with them, so
the rows are unit-norm as our JumpReLU trainer keeps them). Transcoders open the same way
with ``target_hook`` = metadata.hook_name_out and input_centre 0 (SAELens' transcoder reads
x uncentred): ``transcoder`` → relu, ``jumprelu_transcoder`` → jumprelu or batchtopk. Skip
transcoders (x·W_skipᵀ added) and transcoders whose output is wider or narrower than the
input are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import CFG_FILE, SparseAutoencoder, create, did_you_mean

SCALER_FILE = "activation_scaler.json"  # sae_lens.constants.ACTIVATION_SCALER_CFG_FILENAME

TOPK_LIKE = ("topk", "hierarchical", "gradient")
THRESHOLD_LIKE = ("batchtopk", "matryoshka", "featurechoice", "jumprelu")  # one θ, or one per latent
SUPPORTED = ("topk", "jumprelu", "standard", "transcoder", "jumprelu_transcoder")  # SAELens architectures we open
TRANSCODERS = {"transcoder": "standard", "jumprelu_transcoder": "jumprelu"}  # → the SAE form of the same rule


def _metadata(sae: SparseAutoencoder):
    from sae_lens.saes.sae import SAEMetadata

    out = {"hook_name_out": sae.cfg.target_hook} if sae.is_transcoder else {}  # the field SAELens' loaders set
    return SAEMetadata(hook_name=sae.cfg.hook_name or None, model_name=sae.cfg.model_name or None, **out)


def to_sae_lens(sae: SparseAutoencoder):
    """The equivalent SAELens SAE object (inference form)."""
    if sae.is_transcoder:
        return _transcoder_to_sae_lens(sae)
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    common = dict(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, dtype="float32", device="cpu",
                  apply_b_dec_to_input=True, normalize_activations=sae.cfg.normalize_activations,
                  reshape_activations=sae.cfg.reshape_activations, metadata=_metadata(sae))
    weights = {name: getattr(sae, name).detach().float().cpu().clone() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if sae.architecture in TOPK_LIKE:
        target = TopKSAE(TopKSAEConfig(k=sae.cfg.k, **common))
    elif sae.architecture in THRESHOLD_LIKE:
        target = JumpReLUSAE(JumpReLUSAEConfig(**common))
        weights["threshold"] = sae.threshold.detach().float().cpu().expand(sae.cfg.d_sae).clone()
    elif sae.architecture == "relu":
        target = StandardSAE(StandardSAEConfig(**common))
    else:
        raise ValueError(f"no SAELens inference form for architecture {sae.architecture!r}")
    target.load_state_dict(weights)
    return target


def _transcoder_to_sae_lens(sae: SparseAutoencoder):
    """SAELens' Transcoder reads its input uncentred: our fixed input_centre c folds into the
    encoder bias (b_enc − c·W_enc), which leaves every pre-activation, and so every
    threshold comparison, as it was."""
    from sae_lens.saes.transcoder import (JumpReLUTranscoder, JumpReLUTranscoderConfig, Transcoder,
                                          TranscoderConfig)

    common = dict(d_in=sae.cfg.d_in, d_out=sae.cfg.d_in, d_sae=sae.cfg.d_sae, dtype="float32", device="cpu",
                  apply_b_dec_to_input=False, metadata=_metadata(sae))
    weights = {name: getattr(sae, name).detach().float().cpu().clone() for name in ("W_enc", "W_dec", "b_dec")}
    weights["b_enc"] = (sae.b_enc - sae.input_centre @ sae.W_enc).detach().float().cpu()
    if sae.architecture == "relu":
        target = Transcoder(TranscoderConfig(**common))
    elif sae.architecture in THRESHOLD_LIKE:
        target = JumpReLUTranscoder(JumpReLUTranscoderConfig(**common))
        weights["threshold"] = sae.threshold.detach().float().cpu().expand(sae.cfg.d_sae).clone()
    else:
        raise ValueError(f"SAELens has no {sae.architecture} transcoder (it has ReLU and JumpReLU transcoders): train "
                         "the transcoder as relu, jumprelu, batchtopk, matryoshka or featurechoice to export it")
    target.load_state_dict(weights)
    return target


def export_sae_lens(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``sae`` as a SAELens folder (open with ``sae_lens.SAE.load_from_disk``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    to_sae_lens(sae).save_model(str(folder))
    return folder


def load_sae_lens(folder: str | Path) -> SparseAutoencoder:
    """Open a SAELens SAE folder as one of ours: ``topk`` as TopK, ``standard`` as ReLU,
    ``jumprelu`` with per-latent thresholds as JumpReLU and with a single threshold as
    BatchTopK (its inference form; the training k is not recorded there, so k is set to 1,
    which matters only if training continues); ``transcoder`` and ``jumprelu_transcoder`` as
    the same rules' transcoders; other SAELens architectures are refused.
    Encodings and reconstructions equal SAELens' own (see the table above for how each
    config field is carried)."""
    import sae_lens
    from sae_lens import SAE

    folder = Path(folder)
    try:
        theirs = SAE.load_from_disk(str(folder), device="cpu")
    except Exception as err:  # SAELens fails on a malformed cfg.json with e.g. a bare KeyError
        arch = _raw_cfg(folder).get("architecture")
        from sae_lens.registry import SAE_CLASS_REGISTRY

        known = "" if not isinstance(arch, str) or arch in SAE_CLASS_REGISTRY else (
            f" Its architecture {arch!r} is not one SAELens knows.{did_you_mean(arch, SAE_CLASS_REGISTRY)} "
            f"SAELens has {sorted(SAE_CLASS_REGISTRY)}; workbench opens {SUPPORTED}.")
        raise ValueError(f"{folder}: sae_lens {sae_lens.__version__} cannot open this SAELens folder "
                         f"({type(err).__name__}: {err}).{known}") from err
    cfg, arch = theirs.cfg, theirs.cfg.architecture()
    if arch not in SUPPORTED:
        skip = " (a skip transcoder adds x·W_skipᵀ, which workbench transcoders do not have)" if "skip" in arch else ""
        raise ValueError(f"{folder}: SAELens architecture {arch!r} has no workbench equivalent{skip} (workbench opens "
                         f"{SUPPORTED}); use it through sae_lens directly")
    transcoder = _transcoder_fields(folder, theirs) if arch in TRANSCODERS else {}
    arch = TRANSCODERS.get(arch, arch)
    shared_threshold = arch == "jumprelu" and torch.unique(theirs.threshold).numel() == 1
    meta = cfg.metadata
    if getattr(meta, "hook_head_index", None) is not None:
        raise ValueError(f"{folder}: this SAE reads one attention head (hook_head_index={meta.hook_head_index}) of "
                         f"{meta.hook_name}; workbench SAEs read whole hooks. Use it through sae_lens directly")
    with torch.no_grad():
        if arch == "jumprelu" and not shared_threshold:
            theirs.fold_W_dec_norm()  # SAELens' own: unit decoder rows, encoder and θ scaled by the norms
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):
            # z = TopK(pre · ‖W_dec,i‖), x̂ = Σ z_i W_dec,i/‖W_dec,i‖ + b_dec: the same SAE with
            # unit decoder rows and encoder columns scaled by the norms, which is what SAELens'
            # fold_W_dec_norm does (and TopKSAE.fold_activation_whitening before it folds).
            theirs.fold_W_dec_norm()
            cfg.rescale_acts_by_decoder_norm = False
        if cfg.normalize_activations in ("expected_average_only_in", "covariance_whitening"):
            _fold_dataset_normalization(theirs, folder)  # SAELens' own folds; they reset the field to "none"
    info = dict(hook_name=getattr(meta, "hook_name", None) or "", model_name=getattr(meta, "model_name", None) or "",
                normalize_activations=cfg.normalize_activations, reshape_activations=cfg.reshape_activations, **transcoder)
    if arch == "topk":
        ours = create("topk", cfg.d_in, cfg.d_sae, cfg.k, **info)
    elif arch == "standard":
        ours = create("relu", cfg.d_in, cfg.d_sae, 1, **info)
    elif not shared_threshold:
        ours = create("jumprelu", cfg.d_in, cfg.d_sae, 1, **info)
        with torch.no_grad():  # SAELens: ReLU(pre)·1[pre > θ], ours pre·1[pre > θ]: equal once θ ≥ 0
            ours.scale.fill_(1 / ours.cfg.threshold_unit)  # θ's unit exactly 1: the thresholds are copied bit for bit
            ours.set_threshold(theirs.threshold.float().clamp_min(0))
    else:
        ours = create("batchtopk", cfg.d_in, cfg.d_sae, 1, **info)
        # SAELens: z = ReLU(pre) · 1[pre > θ] = pre · 1[pre > max(θ, 0)], our threshold rule.
        ours.threshold.copy_(theirs.threshold[0].clamp_min(0))
        ours.threshold_weight.fill_(1.0)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(ours, name).copy_(getattr(theirs, name).float())
        if not cfg.apply_b_dec_to_input and not transcoder:
            # SAELens: pre = x W_enc + b_enc; ours subtracts b_dec first, so add it back in b_enc.
            # (A transcoder subtracts its input_centre, which stays 0: pre = x W_enc + b_enc as theirs.)
            ours.b_enc += ours.b_dec @ ours.W_enc
    return ours.eval()


def _transcoder_fields(folder: Path, theirs) -> dict:
    """The config of a SAELens transcoder opened as ours: its output hook (SAELens keeps it in
    metadata.hook_name_out), checked to be one that ours can predict (the input's width)."""
    cfg = theirs.cfg
    if cfg.d_out != cfg.d_in:
        raise ValueError(f"{folder}: this transcoder maps d_in={cfg.d_in} to d_out={cfg.d_out}; workbench transcoders "
                         "predict an output of the input's width (an MLP's output from its input). Use it through "
                         "sae_lens directly")
    hook_in = getattr(cfg.metadata, "hook_name", None) or ""
    hook_out = getattr(cfg.metadata, "hook_name_out", None) or ""
    if not hook_out or hook_out == hook_in:
        raise ValueError(f"{folder}: a transcoder, but its cfg.json names no output hook (metadata.hook_name_out): "
                         "without it workbench cannot tell which activations it predicts. Add "
                         "\"hook_name_out\" (e.g. \"blocks.0.hook_mlp_out\") to the metadata in cfg.json")
    if cfg.normalize_activations in ("layer_norm", "constant_norm_rescale"):  # per input; dataset-level ones fold
        raise ValueError(f"{folder}: a transcoder with normalize_activations={cfg.normalize_activations!r}; workbench "
                         "transcoders read their input as it is. Use it through sae_lens directly")
    return {"target_hook": hook_out}


def _raw_cfg(folder: Path) -> dict:
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _fold_dataset_normalization(theirs, folder: Path) -> None:
    """Fold the dataset-level input normalisation of a SAELens training run into the weights.

    SAELens' trainer scales inputs by a constant s = √d_in / E‖x‖ (expected_average_only_in)
    or whitens them, saves the statistics in activation_scaler.json beside a checkpoint, and
    folds them into the weights at the end of training. SAELens' inference SAE ignores the
    field, so a folder still marked with it needs those statistics: without them the SAE would
    read unscaled inputs, so it is refused rather than opened wrong."""
    from sae_lens.training.activation_scaler import ActivationScaler

    rule = theirs.cfg.normalize_activations
    scaler = ActivationScaler()
    if (folder / SCALER_FILE).exists():
        scaler.load(folder / SCALER_FILE)
    if rule == "expected_average_only_in" and scaler.scaling_factor is not None:
        theirs.fold_activation_norm_scaling_factor(scaler.scaling_factor)
    elif rule == "covariance_whitening" and scaler.whitening is not None:
        w = scaler.whitening
        theirs.fold_activation_whitening(w.mean, w.matrix, w.inverse_matrix)
    else:
        what = "scaling factor" if rule == "expected_average_only_in" else "whitening statistics"
        raise ValueError(
            f"{folder}: cfg.json says normalize_activations={rule!r}, but the folder holds no {SCALER_FILE} with the "
            f"{what} the weights were trained with, so its encodings cannot be reproduced. Put the training run's "
            f"{SCALER_FILE} beside it, or fold the statistics with sae_lens (e.g. "
            "sae.fold_activation_norm_scaling_factor(s); sae.save_model(new_folder)) and open that folder.")
