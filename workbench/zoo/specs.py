"""The offline model zoo: one transformer shape, three MLP flavours.

The three models differ only in the MLP, so the activation-sparsity comparisons of the
papers (ReLU vs SiLU, gated vs plain; Zhang et al. 2024, Luo et al. 2024) can be run in
miniature: ``relu`` and ``gelu`` are plain MLPs h = act(W_in x); ``swiglu`` is gated,
x1 = SiLU(W_gate x) ⊙ (W_in x). All keep d_mlp = 4·d_model, so the gated MLP has 1.5× the
MLP parameters of the plain ones (the LLaMA-style 2/3 shrink is not applied: the neuron
count, which the sparsity metrics are normalised by, stays equal across the flavours).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..tokenizer import VOCAB_SIZE


@dataclass(frozen=True)
class ZooSpec:
    """Shape and training recipe of one zoo model (all fields go into its model card)."""

    name: str
    act_fn: str
    gated_mlp: bool = False
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 128
    d_vocab: int = VOCAB_SIZE
    seed: int = 0
    # training recipe
    train_tokens: int = 2_500_000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_tokens: int = 262_144
    n_checkpoints: int = 12  # saved evenly along training, for sparsity-vs-training curves
    extra: dict = field(default_factory=dict)

    def hooked_config(self) -> dict:
        """Keyword arguments of TransformerLens' ``HookedTransformerConfig``."""
        return dict(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            d_vocab=self.d_vocab,
            act_fn=self.act_fn,
            gated_mlp=self.gated_mlp,
            normalization_type="LN",
            positional_embedding_type="standard",
            seed=self.seed,
            default_prepend_bos=True,
        )

    def to_dict(self) -> dict:
        return asdict(self)


ZOO: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        ZooSpec(name="stdlib-relu", act_fn="relu"),
        ZooSpec(name="stdlib-gelu", act_fn="gelu_new"),
        ZooSpec(name="stdlib-swiglu", act_fn="silu", gated_mlp=True),
    )
}
DEFAULT_MODEL = "stdlib-gelu"
