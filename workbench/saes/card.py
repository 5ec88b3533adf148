"""SAE cards: what each shipped SAE reads, how it was trained, and how good it is."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

CARD_FILE = "card.json"


@dataclass
class SAECard:
    name: str
    model: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    k: int
    seed: int
    tokens_seen: int
    train_time_s: float  # wall time of the sweep that trained this SAE (one pass shared by its hook's SAEs)
    trained_with: list[str]  # the other SAEs of that sweep
    # Held out: measured on rows of the val split, disjoint from the training rows.
    eval_tokens: int
    fvu: float
    l0: float
    dead_fraction: float  # latents that never fired on the evaluation rows
    ce_clean: float
    ce_spliced: float
    ce_recovered_vs_zero: float  # 1: as good as the clean model; 0: as bad as zero-ablating the hook
    kl: float  # mean KL(clean ‖ spliced) per token, nats
    corpus_train_sha256: str
    model_config_sha256: str
    model_weights_sha256: str
    weights_dtype: str
    machine: str

    def save(self, folder: Path) -> None:
        from ..paths import atomic_write_text

        atomic_write_text(folder / CARD_FILE, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "SAECard":
        return cls(**json.loads((folder / CARD_FILE).read_text()))

    def table_row(self) -> str:
        """One row of the README's table of shipped SAEs."""
        return (f"| `{self.name}` | {self.k} | {self.l0:.1f} | {self.fvu:.3f} | {self.dead_fraction:.1%} | "
                f"{self.ce_spliced:.3f} | {self.ce_recovered_vs_zero:.3f} |")


TABLE_HEADER = ("| SAE | k | L0 | FVU | dead | CE spliced in (nats) | CE recovered vs zero-ablation |\n"
                "|---|---|---|---|---|---|---|")
