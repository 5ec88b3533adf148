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
import json
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..paths import atomic_write_text
from .sparse_ops import gathered_pre_acts

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


@dataclasses.dataclass
class SAEConfig:
    """What an SAE is (its shape and inference rule); training settings live in TrainConfig."""

    d_in: int
    """Width of the activations it reads (d_model for the residual stream, d_mlp for MLP outputs)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    k: int
    """Active latents per token (for BatchTopK: on average over the batch)."""
    architecture: str = "topk"
    """Registered architecture name: topk, batchtopk, matryoshka, gradient, hierarchical."""
    hook_name: str = ""
    """TransformerLens hook it was trained on (metadata, used by exports and splicing)."""
    model_name: str = ""
    """Model it was trained on (metadata)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}: at most d_sae latents can be active")
        if self.architecture not in REGISTRY:
            raise ValueError(f"unknown architecture {self.architecture!r}; registered: {sorted(REGISTRY)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SparseCode(NamedTuple):
    """The active latents of each row: ``values[b, j]`` of latent ``indices[b, j]``.

    Rows may hold zeros in ``values`` (BatchTopK and thresholds give a varying count);
    zeros contribute nothing to decoding.
    """

    values: Float[Tensor, "batch k"]
    indices: Int[Tensor, "batch k"]

    def dense(self, d_sae: int) -> Float[Tensor, "batch d_sae"]:
        z = self.values.new_zeros(self.values.shape[0], d_sae)
        return z.scatter(1, self.indices, self.values)


class ForwardResult(NamedTuple):
    x_hat: Float[Tensor, "batch d_in"]
    code: SparseCode
    pre_acts: Float[Tensor, "batch d_sae"]


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

    # --- the pieces an architecture may override ------------------------------------------
    def pre_acts(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def select(self, pre_acts: Float[Tensor, "batch d_sae"], **context) -> SparseCode:
        """Which latents fire and with what value. ``context`` carries e.g. gradients."""
        raise NotImplementedError

    def observe(self, code: SparseCode) -> None:
        """Called with each training batch's code (BatchTopK records its threshold here)."""

    sorted_code: ClassVar[bool] = False
    """Whether ``select`` returns each row's latents sorted by value (largest first)."""

    supports_k_annealing: ClassVar[bool] = False
    """Whether ``select`` takes ``k`` above cfg.k, so the trainer can anneal k down from
    TrainConfig.k_start. False (the default, so a new architecture is refused rather than
    silently trained at fixed k) makes TrainConfig reject k_anneal_tokens, giving
    ``no_k_annealing_because`` as the reason."""
    no_k_annealing_because: ClassVar[str] = "its select takes no k to anneal"

    def reconstruction_loss(self, x: Tensor, result: ForwardResult) -> Tensor:
        """Sum over dimensions, mean over rows, of ‖x − x̂‖² (the TopK paper's MSE, unnormalised)."""
        return (result.x_hat - x).pow(2).sum(-1).mean()

    # --- shared ---------------------------------------------------------------------------
    def encode_sparse(self, x: Float[Tensor, "batch d_in"], **context) -> SparseCode:
        return self.select(self.pre_acts(x), **context)

    def encode(self, x: Float[Tensor, "batch d_in"], **context) -> Float[Tensor, "batch d_sae"]:
        """Dense latent activations z (zeros for inactive latents), as SAELens' ``encode``."""
        return self.encode_sparse(x, **context).dense(self.cfg.d_sae)

    def decode(self, z: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_in"]:
        return z @ self.W_dec + self.b_dec

    def decode_sparse(self, code: SparseCode) -> Float[Tensor, "batch d_in"]:
        """x̂ = Σ_j values_j · W_dec[indices_j] + b_dec, touching only the active rows."""
        return torch.nn.functional.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values, mode="sum") + self.b_dec

    def forward(self, x: Float[Tensor, "batch d_in"], **context) -> ForwardResult:
        pre = self.pre_acts(x)
        code = self.select(pre, **context)
        if self.training:
            self.observe(code)
        return ForwardResult(self.decode_sparse(code), code, pre)

    def forward_train(self, x: Float[Tensor, "batch d_in"], selection_dtype: torch.dtype = torch.float32,
                      observe: bool = True, **context) -> ForwardResult:
        """The trainer's forward: same code and x̂ as ``forward`` (up to ties at
        ``selection_dtype`` precision), but only the selected pre-activations are computed
        with autograd, exactly in float32, with a sparse backward (see ``sparse_ops``).
        ``pre_acts`` in the result is detached (at ``selection_dtype``) and lives in a
        scratch buffer that the next call overwrites. ``observe=False`` keeps this batch out
        of the inference statistics (the trainer does so while k is annealed)."""
        with torch.no_grad():
            pre = self._selection_pre_acts(x, selection_dtype)
            chosen = self.select(pre, **context)
        exact = gathered_pre_acts(x, self.b_dec, self.W_enc, self.b_enc, chosen.indices)
        # ReLU, and the padding slots of variable-width codes (BatchTopK) stay zero.
        code = SparseCode(torch.where(chosen.values > 0, exact.relu(), 0.0), chosen.indices)
        if self.sorted_code:
            order = code.values.argsort(dim=-1, descending=True, stable=True)
            code = SparseCode(code.values.gather(1, order), code.indices.gather(1, order))
        if self.training and observe:
            self.observe(code)
        return ForwardResult(self.decode_sparse(code), code, pre)

    @torch.no_grad()
    def _selection_pre_acts(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """(x − b_dec) W_enc + b_enc at ``dtype``, as one matmul into a reused buffer.

        Both biases fold into one extra input column: [x, 1] · [W_enc; b_enc − b_decᵀW_enc].
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
        weights[:, d_in] = self.b_enc - self.b_dec @ self.W_enc
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


def create(architecture: str, d_in: int, d_sae: int, k: int, **cfg) -> SparseAutoencoder:
    """A freshly initialised SAE of a registered architecture."""
    if architecture not in REGISTRY:
        raise ValueError(f"unknown architecture {architecture!r}; registered: {sorted(REGISTRY)}")
    sae_class, config_class = REGISTRY[architecture]
    return sae_class(config_class(d_in=d_in, d_sae=d_sae, k=k, architecture=architecture, **cfg))


def load(folder: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Open an SAE saved by ``save`` (or a SAELens SAE folder, through ``interop``), in
    eval mode: its inference rule, so each row's code is independent of the batch and
    forward passes leave its state (BatchTopK's θ) untouched."""
    folder = Path(folder)
    if not (folder / CFG_FILE).exists():
        raise FileNotFoundError(f"{folder} has no {CFG_FILE}: not an SAE folder")
    raw = json.loads((folder / CFG_FILE).read_text())
    if "architecture" in raw and raw["architecture"] in REGISTRY and (folder / WEIGHTS_FILE).exists() and "d_in" in raw and "k" in raw:
        sae_class, config_class = REGISTRY[raw["architecture"]]
        sae = sae_class(config_class(**raw))
        sae.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    else:
        from .interop import load_sae_lens

        sae = load_sae_lens(folder)
    sae = sae.to(device) if device is not None else sae
    # A fresh nn.Module is in training mode, where BatchTopK keeps the batch's top k·B
    # (codes depend on the other rows) and each forward moves θ. Training resumes through
    # SAETrainer, which switches it back.
    return sae.eval()
