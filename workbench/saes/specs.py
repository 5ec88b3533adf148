"""The shipped SAEs: which hooks of which zoo model, which architectures, and the recipe.

For the default model: a TopK (Gao et al. 2024) and a Matryoshka (Bussmann et al. 2025)
SAE on the residual stream after each block, and a TopK SAE on each attention output and
each MLP output, so that every module a sparse feature circuit passes through (Marks et
al. 2024) has a dictionary. One width and one k for all, so SAEs of different hooks
compare directly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..zoo.specs import DEFAULT_MODEL, ZOO

D_SAE = 2048  # 16x the residual width of the zoo models
K = 32
TRAIN_TOKENS = 2_097_152  # rows of the train split, cached once for every hook
EVAL_TOKENS = 32_768  # held-out rows of the val split: FVU, L0, dead fraction, spliced-in CE
SEED = 0


@dataclass(frozen=True)
class SAESpec:
    """One shipped SAE: where it reads, what it is, and how it was trained."""

    model: str
    hook: str
    architecture: str
    d_sae: int = D_SAE
    k: int = K
    train_tokens: int = TRAIN_TOKENS
    seed: int = SEED

    @property
    def name(self) -> str:
        """``<model>/<hook>/<architecture>-<d_sae>``, e.g. ``stdlib-gelu/blocks.2.hook_resid_post/topk-2048``."""
        return f"{self.model}/{self.hook}/{self.architecture}-{self.d_sae}"

    def to_dict(self) -> dict:
        return asdict(self)


def _catalogue(model: str) -> list[SAESpec]:
    specs = []
    for layer in range(ZOO[model].n_layers):
        specs += [SAESpec(model, f"blocks.{layer}.hook_resid_post", "topk"),
                  SAESpec(model, f"blocks.{layer}.hook_resid_post", "matryoshka"),
                  SAESpec(model, f"blocks.{layer}.hook_attn_out", "topk"),
                  SAESpec(model, f"blocks.{layer}.hook_mlp_out", "topk")]
    return specs


CATALOGUE: dict[str, SAESpec] = {spec.name: spec for spec in _catalogue(DEFAULT_MODEL)}
