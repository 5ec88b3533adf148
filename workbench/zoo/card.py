"""Model cards of the zoo: what each shipped model is, what it saw, and how good it is."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..corpus import VAL_PERCENT
from ..data import corpus_sha256
from ..paths import atomic_write_text
from ..tokenizer import tokenizer_dir
from .specs import ZooSpec

CARD_FILE = "card.json"


@dataclass
class ModelCard:
    name: str
    architecture: str
    config: dict  # the ZooSpec: shape and training recipe
    corpus: str
    corpus_train_sha256: str
    corpus_val_sha256: str
    python_version: str  # the stdlib corpus is this interpreter's standard library
    tokenizer_sha256: str
    tokens_seen: int
    val_loss_nats: float
    val_unigram_entropy_nats: float
    val_tokens: int
    train_time_s: float
    n_params: int
    machine: str

    @property
    def loss_below_unigram(self) -> float:
        """How many nats/token the model beats the context-free unigram model by."""
        return self.val_unigram_entropy_nats - self.val_loss_nats

    @classmethod
    def build(cls, spec: ZooSpec, **measured) -> "ModelCard":
        import hashlib

        mlp = "gated SiLU (SwiGLU)" if spec.gated_mlp else spec.act_fn
        return cls(
            name=spec.name,
            architecture=(
                f"{spec.n_layers}-layer HookedTransformer, d_model={spec.d_model}, "
                f"{spec.n_heads} heads, d_mlp={spec.d_mlp}, MLP {mlp}, context {spec.n_ctx}"
            ),
            config=spec.to_dict(),
            corpus=f"Python {sys.version.split()[0]} standard library source, "
            f"split by path hash ({100 - VAL_PERCENT}% train / {VAL_PERCENT}% val)",
            corpus_train_sha256=corpus_sha256("stdlib", "train"),
            corpus_val_sha256=corpus_sha256("stdlib", "val"),
            python_version=sys.version.split()[0],
            tokenizer_sha256=hashlib.sha256((tokenizer_dir() / "tokenizer.json").read_bytes()).hexdigest(),
            **measured,
        )

    def table_row(self) -> str:
        """One row of the README's zoo table."""
        mlp = "gated SiLU (SwiGLU)" if self.config["gated_mlp"] else self.config["act_fn"]
        return (f"| `{self.name}` | {mlp} | {self.val_loss_nats:.3f} | {self.val_unigram_entropy_nats:.3f} | "
                f"{self.loss_below_unigram:.3f} | {self.tokens_seen:,} | {self.train_time_s / 60:.1f} min |")

    def to_markdown(self) -> str:
        return "\n".join(
            [
                f"# {self.name}",
                "",
                self.architecture + f" ({self.n_params:,} parameters).",
                "",
                "| | |",
                "|---|---|",
                f"| validation loss | {self.val_loss_nats:.3f} nats/token |",
                f"| unigram entropy of validation tokens | {self.val_unigram_entropy_nats:.3f} nats/token |",
                f"| loss below unigram | {self.loss_below_unigram:.3f} nats/token |",
                f"| tokens seen | {self.tokens_seen:,} |",
                f"| training time | {self.train_time_s / 60:.1f} min ({self.machine}) |",
                f"| corpus | {self.corpus} |",
                f"| corpus sha256 (train) | `{self.corpus_train_sha256[:16]}…` |",
                "",
            ]
        )


def write_card(folder: Path, card: ModelCard) -> None:
    atomic_write_text(Path(folder) / CARD_FILE, json.dumps(asdict(card), indent=2) + "\n")
    atomic_write_text(Path(folder) / "README.md", card.to_markdown())


def read_card(folder: Path) -> ModelCard:
    return ModelCard(**json.loads((Path(folder) / CARD_FILE).read_text()))
