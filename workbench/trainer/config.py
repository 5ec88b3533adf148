"""TrainConfig: everything about how an SAE is trained (what it *is* lives in SAEConfig)."""

from __future__ import annotations

import dataclasses
import math


def default_lr(d_sae: int) -> float:
    """Learning-rate default for Adam on a variance-normalised loss.

    Gao et al. (2024) fit 2e-4/√(d_sae/2¹⁴) for runs of billions of tokens; for the
    short runs this workbench is built for (millions of tokens) that is far too slow. The
    same √-width scaling is kept, anchored 10× higher: 2e-3 at 16,384 latents (≈ 5.7e-3 at
    2,048), which converged on the synthetic benchmark at every width tried.
    """
    return 2e-3 / math.sqrt(d_sae / 2**14)


@dataclasses.dataclass
class TrainConfig:
    """One SAE training run. Defaults finish in minutes on a laptop CPU."""

    architecture: str = "topk"
    """SAE architecture: topk, batchtopk, matryoshka, gradient, hierarchical, relu (ReLU-L1), jumprelu,
    featurechoice."""
    d_sae: int = 2048
    """Number of latents."""
    k: int = 32
    """Active latents per token."""
    sae_kwargs: dict = dataclasses.field(default_factory=dict)
    """Architecture extras, e.g. {"beta": 1.0} (gradient) or {"prefixes": [...]} (matryoshka)."""
    hook_name: str = ""
    """Hook to read from an ActivationCache (and recorded as metadata)."""
    target_hook: str = ""
    """Train a transcoder (Dunefsky et al. 2024): predict this hook's activations from
    hook_name's, e.g. blocks.L.hook_mlp_out from blocks.L.ln2.hook_normalized (a cache of
    both, written in one pass: ``transcoder_hooks``). Batches are then (x, y) pairs."""
    model_name: str = ""
    """Model the activations came from (metadata)."""
    batch_size: int = 4096
    """Rows per step when the data is a tensor or a cache."""
    total_tokens: int | None = None
    """Stop after this many rows; None: when the data runs out. Needed for lr decay."""
    lr: float | None = None
    """Adam learning rate; None: default_lr(d_sae)."""
    warmup_steps: int = 50
    """Linear lr warm-up steps."""
    decay_fraction: float = 0.2
    """Final fraction of training over which lr decays linearly to zero (needs total_tokens)."""
    k_anneal_tokens: int = 0
    """Anneal k linearly from k_start down to k over this many tokens (0: fixed k)."""
    k_start: int | None = None
    """Starting k when annealing; None: 4·k (capped at d_sae)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None: d_in // 2 (Gao et al. 2024 §A.2)."""
    aux_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    aux_latents: str = "dead"
    """Which latents the AuxK loss trains: "dead" (Gao et al. 2024: no firing for dead_tokens),
    or "zipf" (Ayonrinde 2024's aux_zipf_loss: the dead ones and those firing at under half
    the density a Zipf law fitted to all latents' densities predicts at their rank; see
    ``trainer.zipf``). Densities are averaged over about dead_tokens tokens."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing; None: min(10M, total/5)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm (None: no clipping)."""
    skip_nonfinite: bool = False
    """Skip batches with NaN/inf in x or g, or whose loss or gradient is NaN/inf, instead of
    stopping with an error that names the batch; skipped batches are counted in
    metrics.json ("skipped_nonfinite"). Off: bad data should be found, not averaged over."""
    b_dec_init: str = "geometric_median"
    """Decoder-bias initialisation: geometric_median, mean or zeros."""
    init_samples: int = 8192
    """At most this many rows of the first batch initialise b_dec."""
    selection_precision: str = "auto"
    """Precision of the pre-activations used only to choose the active latents: "bfloat16",
    "float32", or "auto" (bfloat16 where this device has fast bf16 matmuls: CUDA, or a CPU
    with AMX/AVX512-BF16). The chosen latents' values and all gradients are float32 either way."""
    seed: int = 0
    """Seed of the SAE's initialisation."""
    device: str | None = None
    """Device; None: cuda when available, else cpu."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: none, except every minute in a
    notebook and when interrupted)."""
    log_every: int = 25
    """Steps between logged metrics (and live-plot updates)."""

    def __post_init__(self) -> None:
        from ..sae import ARCHITECTURES, REGISTRY

        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {ARCHITECTURES}")
        if self.k < 1 or self.d_sae < self.k:
            raise ValueError(f"need 1 <= k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.checkpoint_every < 0 or self.log_every < 1:
            raise ValueError(f"need checkpoint_every >= 0 (0: none) and log_every >= 1, got {self.checkpoint_every} "
                             f"and {self.log_every}")
        if self.aux_latents not in ("dead", "zipf"):
            raise ValueError(f"aux_latents must be 'dead' or 'zipf', got {self.aux_latents!r}")
        if not 0 <= self.decay_fraction < 1:
            raise ValueError(f"decay_fraction must lie in [0, 1), got {self.decay_fraction}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")
        if self.selection_precision not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"selection_precision must be auto, bfloat16 or float32, got {self.selection_precision!r}")
        if self.total_tokens is not None and self.total_tokens < self.batch_size:
            raise ValueError(f"total_tokens={self.total_tokens} is less than one batch ({self.batch_size})")
        if self.target_hook and self.needs_grads:
            raise ValueError("the gradient SAE selects with ∂L/∂x of its own input; it cannot be a transcoder "
                             "(target_hook): use another architecture")
        if self.target_hook and self.target_hook == self.hook_name:
            raise ValueError(f"target_hook is the hook a transcoder predicts from hook_name's; both are {self.hook_name!r}")
        if self.k_anneal_tokens > 0:
            sae_class = REGISTRY[self.architecture][0]
            if not sae_class.supports_k_annealing:
                raise ValueError(f"architecture {self.architecture!r} cannot anneal k: {sae_class.no_k_annealing_because}; "
                                 f"got k_anneal_tokens={self.k_anneal_tokens}")
            # The last batch must train at k: the SAE is saved for k, and BatchTopK's θ
            # only averages batches kept at the final k.
            if self.total_tokens is not None and self.k_anneal_tokens > self.total_tokens - self.batch_size:
                raise ValueError(f"k annealing must finish before training ends: k_anneal_tokens={self.k_anneal_tokens} "
                                 f"leaves no batch at k within total_tokens={self.total_tokens}; make it at most "
                                 f"{self.total_tokens - self.batch_size}")

    @property
    def needs_grads(self) -> bool:
        """Whether batches must be (x, g) pairs (the gradient SAE selects with g)."""
        return self.architecture == "gradient"

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.d_sae)

    def selection_dtype(self, device) -> "torch.dtype":
        import torch

        from ..sae.sparse_ops import fast_bf16_matmul

        if self.selection_precision == "auto":
            return torch.bfloat16 if fast_bf16_matmul(torch.device(device)) else torch.float32
        return getattr(torch, self.selection_precision)

    def total_steps(self) -> int | None:
        return None if self.total_tokens is None else self.total_tokens // self.batch_size

    def resolved_dead_tokens(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return min(10_000_000, (self.total_tokens or 50_000_000) // 5)
