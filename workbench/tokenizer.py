"""The zoo's byte-level BPE tokenizer, trained with `tokenizers` on the stdlib train split.

Byte-level BPE (as GPT-2) so that every string round-trips exactly. It is saved with
``PreTrainedTokenizerFast.save_pretrained`` and loaded from that folder, because
TransformerLens re-loads a tokenizer by its ``name_or_path`` (DESIGN.md, "Known traps").
"""

from __future__ import annotations

import functools
from pathlib import Path

from .corpus import iter_documents
from .paths import data_dir

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"  # separates documents and doubles as BOS, as in GPT-2


def tokenizer_dir() -> Path:
    return data_dir() / "tokenizer"


def train_tokenizer(vocab_size: int = VOCAB_SIZE, out_dir: Path | None = None) -> Path:
    """Train the BPE tokenizer on the stdlib train split and save it; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir or tokenizer_dir())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((doc.text for doc in iter_documents("stdlib", "train")), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
    )
    wrapped.save_pretrained(str(out_dir))
    return out_dir


def _require_tokenizer() -> Path:
    path = tokenizer_dir()
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer at {path}. It ships with the repository; if you deleted it, "
            "rebuild it with `python -m workbench.zoo tokenizer`."
        )
    return path


@functools.lru_cache(maxsize=1)
def load_fast_tokenizer():
    """The raw `tokenizers.Tokenizer` (fast batch encoding, no transformers overhead)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_require_tokenizer() / "tokenizer.json"))


def load_tokenizer():
    """The tokenizer as a `PreTrainedTokenizerFast`, loaded from its local folder (no hub)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(_require_tokenizer()))
