"""The base of every SAE: parameters, encode/decode/forward, save/load, and the registry.

An architecture subclasses ``SparseAutoencoder`` in a file of its own, overrides
``select`` (which latents fire, from the pre-activations) and, where its paper says so,
``reconstruction_loss``, and registers itself with ``@register``. Loading looks the name
up in the registry, so no if/elif chain grows with the architectures.

Layout follows SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, and
x̂ = z W_dec + b_dec with z = select(W_encᵀ(x − b_dec) + b_enc) (Gao et al. 2024, eq. 1–2).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import numbers
from pathlib import Path
from typing import Callable, ClassVar, NamedTuple

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..paths import atomic_write_text
from .sparse_ops import SparsePattern, gathered_pre_acts, gathered_pre_acts_csr, row_pointers, sparse_decode

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
SAE_LENS_WEIGHTS_FILE = "sae_weights.safetensors"  # what sae_lens' save_model writes beside its cfg.json

# Per-input normalisations: each row is normalised before encoding and restored after
# decoding, exactly as SAELens 6 does at run time (sae_lens/saes/sae.py,
# SAE._setup_activation_normalization). Dataset-level ones (a constant scale, whitening) are
# folded into the weights when a SAELens folder is opened (interop), so they never reach here.
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")

# A ragged training code denser than this (real entries over batch × d_sae) is computed with
# dense products. Measured for a ReLU SAE step (256 → 2048, batch 4096, 2 CPU cores): sparse
# 0.80 s vs dense 1.06 s at density 1/8, 2.1 s vs 1.25 s at 1/4 (``_dense_forward``).
DENSE_TRAINING_ABOVE = 1 / 6


def warmup_factor(progress: float, warmup: float) -> float:
    """A penalty weight's linear warm-up: 0 → 1 over the first ``warmup`` fraction of training."""
    return min(1.0, progress / warmup) if warmup > 0 else 1.0


def did_you_mean(name: str, options) -> str:
    """' Did you mean 'x'?' for the options closest to a misspelt ``name`` (or '')."""
    close = difflib.get_close_matches(str(name), [str(option) for option in options], n=3, cutoff=0.6)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


@dataclasses.dataclass
class SAEConfig:
    """What an SAE is (its shape and inference rule); training settings live in TrainConfig."""

    d_in: int
    """Width of the activations it reads (d_model for the residual stream, d_mlp for MLP outputs)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    k: int
    """Active latents per token (for BatchTopK, Matryoshka and Feature Choice: on average over the
    batch; unused by relu and jumprelu, whose L0 comes from their sparsity penalty)."""
    architecture: str = "topk"
    """Registered architecture name: topk, batchtopk, matryoshka, gradient, hierarchical, relu, jumprelu,
    featurechoice."""
    hook_name: str = ""
    """TransformerLens hook it was trained on (metadata, used by exports and splicing)."""
    model_name: str = ""
    """Model it was trained on (metadata)."""
    normalize_activations: str = "none"
    """How each input row is normalised before encoding and restored after decoding, as
    SAELens' run-time rules: "none"; "constant_norm_rescale" (x·√d_in/‖x‖); "layer_norm"
    ((x − mean)/(std + 1e-5), restored as x̂·std + mean). Set when a SAELens SAE is
    opened; SAEs trained here use "none"."""
    reshape_activations: str = "none"
    """"hook_z": inputs may also come as [batch, n_heads, d_head] (an attention layer's
    hook_z) and are flattened to d_in = n_heads·d_head, as SAELens' hook_z SAEs."""
    target_hook: str = ""
    """Set for a transcoder (Dunefsky et al. 2024): the hook whose activations it predicts
    from hook_name's, e.g. an MLP's output (blocks.L.hook_mlp_out) from its input
    (blocks.L.ln2.hook_normalized). Empty for an SAE, which reconstructs its own input. A
    transcoder's b_dec is the output's bias (as SAELens' Transcoder); its encoder subtracts
    a fixed ``input_centre`` instead, z = select((x − c) W_enc + b_enc); the target has the
    input's width (true of every MLP in TransformerLens: input and output are both d_model)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k"):
            value = getattr(self, name)
            # int() would turn k=2.5 into 2 and d_sae="64" into 64: refuse, don't guess.
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))  # a numpy integer would not serialise to cfg.json
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}: at most d_sae latents can be active")
        if self.architecture not in REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}.{did_you_mean(self.architecture, REGISTRY)} "
                             f"Registered: {sorted(REGISTRY)}")
        for name in ("hook_name", "model_name", "target_hook"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string (empty when unknown), got {getattr(self, name)!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}")
        if self.reshape_activations not in RESHAPES:
            raise ValueError(f"reshape_activations must be one of {RESHAPES}, got {self.reshape_activations!r}")
        if self.reshape_activations == "hook_z" and self.hook_name and not self.hook_name.endswith("hook_z"):
            # as SAELens (SAE.turn_on_forward_pass_hook_z_reshaping), which would refuse to export it
            raise ValueError(f"reshape_activations='hook_z' is for an attention layer's hook_z, not {self.hook_name!r}")
        if self.target_hook and self.target_hook == self.hook_name:
            raise ValueError(f"target_hook is the hook a transcoder predicts from hook_name's; both are {self.hook_name!r}. "
                             "Leave target_hook empty for an SAE that reconstructs its input")
        if self.target_hook and self.normalize_activations != "none":
            raise ValueError("a transcoder reads its input as it is: normalize_activations must be 'none'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SparseCode(NamedTuple):
    """The active latents of each row: ``values[b, j]`` of latent ``indices[b, j]``.

    Rows may hold zeros in ``values`` (BatchTopK and thresholds give a varying count);
    zeros contribute nothing to decoding, and a zero slot may repeat a latent of its row.
    """

    values: Float[Tensor, "batch k"]
    indices: Int[Tensor, "batch k"]

    def dense(self, d_sae: int) -> Float[Tensor, "batch d_sae"]:
        # Added, not scattered: a padding slot (value 0) may repeat a latent of its row.
        z = self.values.new_zeros(self.values.shape[0], d_sae)
        return z.scatter_add(1, self.indices, self.values)

    @classmethod
    def from_entries(cls, rows: int, row: Tensor, latent: Tensor, values: Tensor) -> "SparseCode":
        """Entries (row[e], latent[e]) = values[e], given in row-major order, as a padded code
        of [rows, w] slots, w the most any row holds. The rest of a row's slots are padding,
        value 0 at latent 0: zeros add nothing to a decode, and every consumer of a code skips
        values ≤ 0, so the repeated index is harmless (``dense`` adds rather than overwrites)."""
        counts = torch.bincount(row, minlength=rows)
        width = max(1, int(counts.max())) if row.numel() else 1
        slot = torch.arange(row.numel(), device=row.device) - (counts.cumsum(0) - counts)[row]
        out_values = values.new_zeros(rows, width)
        out_indices = torch.zeros(rows, width, dtype=torch.long, device=values.device)
        out_values[row, slot] = values
        out_indices[row, slot] = latent
        return cls(out_values, out_indices)

    @classmethod
    def from_dense(cls, z: Float[Tensor, "batch d_sae"]) -> "SparseCode":
        """The nonzero entries of a dense code (a varying number per row) as a padded code."""
        row, latent = (z != 0).nonzero(as_tuple=True)  # row-major
        return cls.from_entries(z.shape[0], row, latent, z[row, latent])


class ForwardResult(NamedTuple):
    x_hat: Float[Tensor, "batch d_in"]
    code: SparseCode
    pre_acts: Float[Tensor, "batch d_sae"]
    levels: Float[Tensor, "levels batch d_in"] | None = None
    """Set by the trainer's forward for SAEs whose loss decodes parts of the code separately
    (Matryoshka's groups of latents): those partial decodes, from the same code, with autograd."""


REGISTRY: dict[str, tuple[type["SparseAutoencoder"], type[SAEConfig]]] = {}


def register(name: str, config_class: type[SAEConfig] = SAEConfig):
    """Class decorator: make an architecture loadable by ``name``."""

    def wrap(cls: type["SparseAutoencoder"]) -> type["SparseAutoencoder"]:
        if name in REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        cls.architecture = name
        REGISTRY[name] = (cls, config_class)
        return cls

    return wrap


class SparseAutoencoder(nn.Module):
    architecture: ClassVar[str] = ""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        # Gao et al. 2024 §2.3: decoder rows of unit norm, encoder initialised to the
        # decoder's transpose (an SAE that starts close to the identity on its span).
        W_dec = torch.randn(cfg.d_sae, cfg.d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # Column-major [d_in, d_sae]: each latent's encoder column is contiguous, which the
        # sparse training encoder reads and writes (sparse_ops); loads copy into this layout.
        self.W_enc = nn.Parameter(W_dec.clone().T)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.target_hook:
            # A transcoder's b_dec is the output's bias, so its input is centred by a fixed
            # vector instead, set by the trainer to the inputs' geometric median. (Uncentred,
            # the inputs' shared direction pushes every pre-activation one way: on block 2's
            # MLP of the default model, 39% of a k=8 transcoder's latents ended dead, 2% centred.)
            self.register_buffer("input_centre", torch.zeros(cfg.d_in))

    @property
    def is_transcoder(self) -> bool:
        """Whether this predicts another hook's activations (cfg.target_hook) rather than its input."""
        return bool(self.cfg.target_hook)

    @property
    def input_bias(self) -> Tensor:
        """What the encoder subtracts from its input: b_dec for an SAE (Gao et al. 2024, eq. 1),
        the fixed input_centre for a transcoder, whose b_dec lives in the output's space."""
        return self.input_centre if self.is_transcoder else self.b_dec

    # --- the pieces an architecture may override ------------------------------------------
    def pre_acts(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        return (x - self.input_bias) @ self.W_enc + self.b_enc

    def select(self, pre_acts: Float[Tensor, "batch d_sae"], **context) -> SparseCode:
        """Which latents fire and with what value. ``context`` carries e.g. gradients."""
        raise NotImplementedError

    def select_entries(self, pre_acts: Float[Tensor, "batch d_sae"], **context) -> tuple[Tensor, Tensor, Tensor] | None:
        """A ragged code's training selection as its real entries (row, latent, value; rows
        ascending), for architectures that find them without a padded code: the trainer's
        forward then builds its sparse pattern from them directly, skipping a round trip
        through ``select``'s [batch, widest row] padding. None (the default): use ``select``."""
        return None

    def observe(self, code: SparseCode) -> None:
        """Called with each training batch's code (BatchTopK records its threshold here)."""

    sorted_code: ClassVar[bool] = False
    """Whether ``select`` returns each row's latents sorted by value (largest first)."""

    ragged_code: ClassVar[bool] = False
    """Whether training codes keep a varying number of latents per row (padded with zeros):
    then the trainer's forward computes only the real entries."""

    supports_k_annealing: ClassVar[bool] = False
    """Whether ``select`` takes ``k`` above cfg.k, so the trainer can anneal k down from
    TrainConfig.k_start. False (the default, so a new architecture is refused rather than
    silently trained at fixed k) makes TrainConfig reject k_anneal_tokens, giving
    ``no_k_annealing_because`` as the reason."""
    no_k_annealing_because: ClassVar[str] = "its select takes no k to anneal"

    uses_k: ClassVar[bool] = True
    """Whether cfg.k sets the L0 (False for SAEs sparse by a penalty: tables show no k for them)."""

    uses_aux_k: ClassVar[bool] = True
    """Whether the trainer adds the AuxK loss for dead latents (Gao et al. 2024 §A.2): the
    TopK family's remedy. SAEs whose sparsity comes from a penalty (L1, L0) train without it."""

    unit_norm_decoder: ClassVar[bool] = True
    """Whether the trainer keeps decoder rows at unit norm (removing the gradient along each
    row, then renormalising after the step). False for SAEs whose penalty is weighted by the
    decoder norms instead (Anthropic's 2024 ReLU-L1 update)."""

    # --- the training hooks an architecture may override (the trainer calls them) -----------
    def prepare(self, rows: Float[Tensor, "batch d_in"], targets: Float[Tensor, "batch d_in"]) -> None:
        """Called once before training, after b_dec is initialised, with rows of the first
        batch and what they should reconstruct (the rows themselves, or a transcoder's
        targets): an architecture whose settings are in units of the data's scale sets them here."""

    def sparsity_loss(self, x: Tensor, result: ForwardResult, scale: Tensor, progress: float) -> Tensor | None:
        """The architecture's sparsity penalty for this training batch, or None (TopK-style
        SAEs are sparse by construction). ``scale`` is √(Σ‖x − x̄‖²/B), the batch's RMS
        distance from its mean: the trainer divides the reconstruction loss by scale², so a
        penalty in x's units divides by scale (and one on counts by nothing), and its
        coefficient then means the same whatever the activations' magnitude. ``progress`` is
        the fraction of training done (1.0 when the run length is unknown), for warm-ups."""
        return None

    @torch.no_grad()
    def scale_encoder_to_fit(self, rows: Float[Tensor, "batch d_in"], targets: Float[Tensor, "batch d_in"]) -> None:
        """Scale the encoder (W_enc, b_enc) by the c that best reconstructs ``targets`` (the
        rows themselves for an SAE) from ``rows`` at initialisation (least squares:
        c = ⟨t − b_dec, y⟩/‖y‖² with t the target and y the current x̂ − b_dec).

        For SAEs whose activation keeps every positive pre-activation (ReLU, JumpReLU), the
        transposed-decoder start fires about half the latents per row, and their sum
        overshoots x several-fold (FVU ≫ 1 at step 0 on 2048 latents of 256 dimensions); the
        fitted scale starts them at FVU < 1, as Anthropic's small-norm initialisation does."""
        centered = targets - self.b_dec
        y = self.forward(rows).x_hat - self.b_dec
        scale = float((centered * y).sum() / y.pow(2).sum().clamp_min(1e-12))
        if scale > 0:
            self.W_enc *= scale
            self.b_enc *= scale

    def after_step(self) -> None:
        """Called after each optimiser step (JumpReLU keeps its thresholds non-negative here)."""

    def refuse_k(self, k) -> None:
        """For SAEs sparse by a penalty (``uses_k`` False): they have no top-k to change, so
        asking for one is an error, not a no-op."""
        if k is not None:
            raise ValueError(f"a {self.architecture} SAE keeps the latents its activation passes (its L0 was set by "
                             f"its sparsity penalty in training); it has no top-k, so k={k} cannot apply")

    def reconstruction_loss(self, x: Tensor, result: ForwardResult) -> Tensor:
        """Sum over dimensions, mean over rows, of ‖x − x̂‖² (the TopK paper's MSE, unnormalised)."""
        return (result.x_hat - x).pow(2).sum(-1).mean()

    # --- shared ---------------------------------------------------------------------------
    def rows(self, x: Tensor) -> Tensor:
        """``x`` as the [batch, d_in] rows this SAE reads, or a ValueError that says what it
        reads (a raw matmul error names neither the SAE nor its hook). hook_z SAEs also take
        [batch, n_heads, d_head], flattened as SAELens does ("... n_heads d_head -> ...
        (n_heads d_head)")."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, {self.cfg.d_in}], got {type(x).__name__}")
        given = tuple(x.shape)
        if self.cfg.reshape_activations == "hook_z" and x.ndim == 3:
            x = x.flatten(1)
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            trained_on = f" ({self.cfg.hook_name})" if self.cfg.hook_name else ""
            hint = " (one vector v is v[None])" if given == (self.cfg.d_in,) else ""
            raise ValueError(f"this SAE reads rows of d_in={self.cfg.d_in} activations{trained_on}; got x of shape "
                             f"{given}{hint}. Give it [batch, {self.cfg.d_in}] activations of the hook it was trained on.")
        return x

    def normalize(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``x`` as the encoder reads it ([batch, d_in], normalised per cfg.normalize_activations),
        and the map that takes a reconstruction back to x's scale and shape.

        SAELens 6 (sae_lens/saes/sae.py, ``_setup_activation_normalization``):
        constant_norm_rescale multiplies by c = √d_in/‖x‖ and divides the output by c;
        layer_norm subtracts the mean μ, divides by std + 1e-5 (std unbiased, torch's default)
        and restores with x̂·std + μ (without the eps: SAELens does so, and we match it)."""
        shape, x = getattr(x, "shape", None), self.rows(x)
        rule = self.cfg.normalize_activations
        if rule == "constant_norm_rescale":
            coeff = self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
            x, restore = x * coeff, (lambda x_hat: x_hat / coeff)
        elif rule == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            x, restore = (x - mu) / (std + 1e-5), (lambda x_hat: x_hat * std + mu)
        else:
            restore = lambda x_hat: x_hat  # noqa: E731
        return x, (lambda x_hat: restore(x_hat).reshape(shape))

    def check_context(self, x: Tensor, context: dict) -> dict:
        """The selection context that architectures share, checked once here: ``k`` (a
        positive int ≤ d_sae; topk would read k=0 as "the trained k") and ``g`` (the loss
        gradient at the input: x's shape, flattened like x)."""
        k = context.get("k")
        if k is not None and (not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 1 <= k <= self.cfg.d_sae):
            raise ValueError(f"k must be a positive integer of at most d_sae={self.cfg.d_sae} (None: the trained "
                             f"k={self.cfg.k}), got {k!r}")
        g = context.get("g")
        if g is not None:
            shape = getattr(x, "shape", None)
            if not isinstance(g, Tensor) or g.shape != shape:
                raise ValueError(f"g, the loss gradient at the SAE's input, must have the shape of x {tuple(shape or ())}; "
                                 f"got {tuple(getattr(g, 'shape', ())) or type(g).__name__}")
            context = {**context, "g": g.flatten(1)}
        return context

    def encode_sparse(self, x: Float[Tensor, "batch d_in"], **context) -> SparseCode:
        context = self.check_context(x, context)
        return self.select(self.pre_acts(self.normalize(x)[0]), **context)

    def encode(self, x: Float[Tensor, "batch d_in"], **context) -> Float[Tensor, "batch d_sae"]:
        """Dense latent activations z (zeros for inactive latents), as SAELens' ``encode``."""
        return self.encode_sparse(x, **context).dense(self.cfg.d_sae)

    def decode(self, z: Float[Tensor, "batch d_sae"], x: Tensor | None = None) -> Float[Tensor, "batch d_in"]:
        """x̂ = z W_dec + b_dec. An SAE that normalises each input (cfg.normalize_activations)
        needs that input ``x`` to restore the scale: SAELens keeps it in hidden state from
        the last ``encode``; we ask for it instead. Given ``x``, x̂ also takes its shape."""
        x_hat = z @ self.W_dec + self.b_dec
        if x is not None:
            return self.normalize(x)[1](x_hat)
        if self.cfg.normalize_activations != "none":
            raise ValueError(f"this SAE normalises each input ({self.cfg.normalize_activations}), so decoding needs "
                             "the input the code came from: decode(z, x=x), or forward(x).x_hat")
        return x_hat

    def decode_sparse(self, code: SparseCode) -> Float[Tensor, "batch d_in"]:
        """x̂ = Σ_j values_j · W_dec[indices_j] + b_dec, touching only the active rows."""
        return torch.nn.functional.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values, mode="sum") + self.b_dec

    def forward(self, x: Float[Tensor, "batch d_in"], **context) -> ForwardResult:
        context = self.check_context(x, context)
        x, restore = self.normalize(x)
        pre = self.pre_acts(x)
        code = self.select(pre, **context)
        if self.training:
            self.observe(code)
        return ForwardResult(restore(self.decode_sparse(code)), code, pre)

    def forward_train(self, x: Float[Tensor, "batch d_in"], selection_dtype: torch.dtype = torch.float32,
                      observe: bool = True, **context) -> ForwardResult:
        """The trainer's forward: same code and x̂ as ``forward`` (up to ties at
        ``selection_dtype`` precision), but only the selected pre-activations are computed
        with autograd, exactly in float32, with a sparse backward (see ``sparse_ops``).
        ``pre_acts`` in the result is detached (at ``selection_dtype``) and lives in a
        scratch buffer that the next call overwrites. ``observe=False`` keeps this batch out
        of the inference statistics (the trainer does so while k is annealed)."""
        if self.cfg.normalize_activations != "none":
            raise NotImplementedError(f"training an SAE that normalises each input ({self.cfg.normalize_activations}, "
                                      "from SAELens) is not supported: train it with sae_lens, or train a new one here")
        context = self.check_context(x, context)
        x = self.rows(x)
        with torch.no_grad():
            pre = self._selection_pre_acts(x, selection_dtype)
            entries = self.select_entries(pre, **context) if self.ragged_code else None
            chosen = self.select(pre, **context) if entries is None else None
        if self.ragged_code:
            code, x_hat, levels = self._ragged_forward(x, chosen) if entries is None else self._entries_forward(x, *entries)
            if self.training and observe:
                self.observe(code)
            return ForwardResult(x_hat, code, pre, levels)
        pattern = SparsePattern.fixed_width(chosen.indices, self.cfg.d_sae)  # shared by encode and decode
        exact = gathered_pre_acts(x, self.input_bias, self.W_enc, self.b_enc, chosen.indices, pattern)
        # ReLU; a latent chosen at value 0 (fewer than k positive) stays 0 whatever its exact value.
        code = SparseCode(torch.where(chosen.values > 0, exact.relu(), 0.0), chosen.indices)
        if self.sorted_code:
            order = code.values.argsort(dim=-1, descending=True, stable=True)
            code = SparseCode(code.values.gather(1, order), code.indices.gather(1, order))
            x_hat = self.decode_sparse(code)
        else:
            x_hat = sparse_decode(code.values.view(-1), self.W_dec, pattern) + self.b_dec
        if self.training and observe:
            self.observe(code)
        return ForwardResult(x_hat, code, pre)

    def _ragged_forward(self, x: Tensor, chosen: SparseCode) -> tuple[SparseCode, Tensor, Tensor | None]:
        """forward_train's values and x̂ for a code whose rows keep different numbers of
        latents: only the real entries (value > 0) are computed, encoded and decoded as one
        CSR pattern, then laid back into the padded [batch, width] code. Padding to the
        fullest row and computing it too made BatchTopK's step ~10× the work of TopK's
        (width ≈ 150 slots per row at k = 16 on the synthetic benchmark)."""
        real = chosen.values > 0
        if int(real.sum()) > x.shape[0] * self.cfg.d_sae * DENSE_TRAINING_ABOVE:
            return self._dense_forward(x, chosen, real)
        cols = chosen.indices[real]  # row-major: grouped by row, as CSR wants
        crow = torch.zeros(x.shape[0] + 1, dtype=torch.long, device=x.device)
        crow[1:] = real.sum(1).cumsum(0)
        pattern = SparsePattern(crow, cols, self.cfg.d_sae)
        values = gathered_pre_acts_csr(x, self.input_bias, self.W_enc, self.b_enc, pattern).relu()
        x_hat, levels = self.decode_entries(pattern, values)
        code = SparseCode(values.new_zeros(chosen.values.shape).masked_scatter(real, values), chosen.indices)
        return code, x_hat, levels

    def _entries_forward(self, x: Tensor, row: Tensor, latent: Tensor, chosen_values: Tensor
                         ) -> tuple[SparseCode, Tensor, Tensor | None]:
        """``_ragged_forward`` for a selection given as its real entries (``select_entries``)."""
        rows = x.shape[0]
        if row.numel() > rows * self.cfg.d_sae * DENSE_TRAINING_ABOVE:
            return self._ragged_forward(x, SparseCode.from_entries(rows, row, latent, chosen_values))
        pattern = SparsePattern(row_pointers(row, rows), latent, self.cfg.d_sae, rows=row)
        values = gathered_pre_acts_csr(x, self.input_bias, self.W_enc, self.b_enc, pattern).relu()
        x_hat, levels = self.decode_entries(pattern, values)
        return SparseCode.from_entries(rows, row, latent, values), x_hat, levels

    def decode_entries(self, pattern: SparsePattern, values: Tensor) -> tuple[Tensor, Tensor | None]:
        """x̂ of a code given as the entries of a pattern (flat ``values``), and the
        ``levels`` of ``ForwardResult`` for architectures whose loss needs them (else None)."""
        return sparse_decode(values, self.W_dec, pattern) + self.b_dec, None

    def _dense_forward(self, x: Tensor, chosen: SparseCode, real: Tensor) -> tuple[SparseCode, Tensor, None]:
        """``_ragged_forward``'s code and x̂ (the same values and gradients, summed in another
        order) through dense float32 products, for codes too dense for the sparse kernels to
        win: an L1 or JumpReLU SAE early in training keeps about half its latents per row."""
        mask = torch.zeros(x.shape[0], self.cfg.d_sae, dtype=torch.bool, device=x.device)
        mask[real.nonzero()[:, 0], chosen.indices[real]] = True
        z = self.pre_acts(x).relu() * mask
        values = z.gather(1, chosen.indices) * real  # a padding slot may repeat a real latent: it stays 0
        return SparseCode(values, chosen.indices), z @ self.W_dec + self.b_dec, None

    @torch.no_grad()
    def _selection_pre_acts(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """(x − input_bias) W_enc + b_enc at ``dtype``, as one matmul into a reused buffer.

        Both biases fold into one extra input column: [x, 1] · [W_enc; b_enc − input_biasᵀW_enc].
        Writing into a buffer kept between steps halves the time of this matmul on CPU,
        where a fresh [batch, d_sae] output costs as much in page faults as the product.
        """
        rows, (d_in, d_sae) = x.shape[0], self.W_enc.shape
        width = d_in + 16  # the bias column, padded so the inner dimension stays aligned
        scratch = self.__dict__.setdefault("_scratch", {})
        key = (rows, dtype, x.device)
        if scratch.get("key") != key:
            scratch.update(key=key, out=torch.empty(rows, d_sae, dtype=dtype, device=x.device),
                           x=torch.zeros(rows, width, dtype=dtype, device=x.device))
            scratch["x"][:, d_in] = 1
        weights = torch.empty(d_sae, width, dtype=dtype, device=x.device)  # column-major [width, d_sae]
        weights[:, :d_in] = self.W_enc.T
        weights[:, d_in] = self.b_enc - self.input_bias @ self.W_enc
        weights[:, d_in + 1:] = 0
        scratch["x"][:, :d_in] = x
        return torch.mm(scratch["x"], weights.T, out=scratch["out"])

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (and the encoder columns inversely, so outputs are unchanged)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec /= norms[:, None]
        self.W_enc *= norms[None, :]
        self.b_enc *= norms

    # --- persistence ----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae.safetensors`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS_FILE}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(folder / WEIGHTS_FILE)
        atomic_write_text(folder / CFG_FILE, json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return folder


def _config(config_class: type[SAEConfig], fields: dict, where: str) -> SAEConfig:
    """``config_class(**fields)``, naming unknown fields and their likely spelling instead of a
    bare ``TypeError: unexpected keyword argument``."""
    known = [field.name for field in dataclasses.fields(config_class)]
    unknown = [name for name in fields if name not in known]
    if unknown:
        hints = "".join(did_you_mean(name, known) for name in unknown)
        raise ValueError(f"{where}: {config_class.__name__} has no field {', '.join(map(repr, unknown))}.{hints} "
                         f"Its fields: {known}")
    return config_class(**fields)


def create(architecture: str, d_in: int, d_sae: int, k: int, **cfg) -> SparseAutoencoder:
    """A freshly initialised SAE of a registered architecture."""
    if architecture not in REGISTRY:
        raise ValueError(f"unknown architecture {architecture!r}.{did_you_mean(architecture, REGISTRY)} "
                         f"Registered: {sorted(REGISTRY)}")
    sae_class, config_class = REGISTRY[architecture]
    return sae_class(_config(config_class, dict(d_in=d_in, d_sae=d_sae, k=k, architecture=architecture, **cfg),
                             f"create({architecture!r}, ...)"))


def load(folder: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Open an SAE saved by ``save`` (or a SAELens SAE folder, through ``interop``), in
    eval mode: its inference rule, so each row's code is independent of the batch and
    forward passes leave its state (BatchTopK's θ) untouched.

    The weights file tells the formats apart: ours is ``sae.safetensors``, SAELens'
    ``sae_weights.safetensors`` (both beside a ``cfg.json``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the folder that holds {CFG_FILE} and the weights")
    if not (folder / CFG_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {CFG_FILE}: not an SAE folder (it holds "
                                f"{sorted(p.name for p in folder.iterdir())[:10]})")
    if (folder / WEIGHTS_FILE).exists():
        sae = _load_ours(folder)
    elif (folder / SAE_LENS_WEIGHTS_FILE).exists():
        from .interop import load_sae_lens

        sae = load_sae_lens(folder)
    else:
        raise FileNotFoundError(f"{folder} has {CFG_FILE} but no weights: expected {WEIGHTS_FILE} (a workbench SAE) or "
                                f"{SAE_LENS_WEIGHTS_FILE} (a SAELens SAE). Was the save interrupted, or the weights not copied?")
    sae = sae.to(device) if device is not None else sae
    # A fresh nn.Module is in training mode, where BatchTopK keeps the batch's top k·B
    # (codes depend on the other rows) and each forward moves θ. Training resumes through
    # SAETrainer, which switches it back.
    return sae.eval()


def _load_ours(folder: Path) -> SparseAutoencoder:
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CFG_FILE} is not valid JSON ({err}): the file is damaged; save the SAE again") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{folder / CFG_FILE} must hold a JSON object of SAEConfig fields, got {type(raw).__name__}")
    arch = raw.get("architecture")
    if not isinstance(arch, str) or arch not in REGISTRY:
        raise ValueError(f"{folder / CFG_FILE}: unknown architecture {arch!r}.{did_you_mean(arch, REGISTRY)} "
                         f"Registered: {sorted(REGISTRY)}")
    sae_class, config_class = REGISTRY[arch]
    sae = sae_class(_config(config_class, raw, str(folder / CFG_FILE)))
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except Exception as err:  # safetensors' own error names no file
        raise ValueError(f"{folder / WEIGHTS_FILE} cannot be read ({err}): it is damaged or not a safetensors file; "
                         "save the SAE again") from err
    try:
        sae.load_state_dict(weights)
    except RuntimeError as err:  # missing/unexpected tensors or a shape that cfg.json does not give
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match {folder / CFG_FILE} (d_in={sae.cfg.d_in}, "
                         f"d_sae={sae.cfg.d_sae}, {arch}): {err}") from err
    return sae
