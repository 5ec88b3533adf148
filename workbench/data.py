"""Token tensors for training and evaluation, cached as memory-mapped arrays.

A split of a corpus is tokenized once into one stream (documents joined by
``<|endoftext|>``) stored as ``data/cache/tokens/<key>.npy`` (uint16, memory-mapped on
read) beside a JSON sidecar with the corpus fingerprint. ``load_tokens`` cuts that stream
into rows of ``seq_len`` that each start with BOS, as TransformerLens' ``to_tokens`` does,
so cached rows and notebook prompts look alike to the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .corpus import DEFAULT_CORPUS, Split, _folder_files, corpus_fingerprint, iter_documents, stdlib_root
from .paths import atomic_write_bytes, atomic_write_text, cache_dir
from .tokenizer import EOS_TOKEN, load_fast_tokenizer, tokenizer_dir

DEFAULT_SEQ_LEN = 128
ENCODE_CHUNK = 256  # documents per batch encode: bounds memory, keeps the Rust threads busy
HF_DEFAULT_MAX_TOKENS = 10_000_000  # a streamed dataset is read only this far unless asked


def _tokenizer_hash() -> str:
    return hashlib.sha256((tokenizer_dir() / "tokenizer.json").read_bytes()).hexdigest()


def _source_hash(corpus: str) -> str:
    """What the corpus is now, so an edited local corpus gets a new cache entry.

    Local file or folder: sha256 over each file's relative path and bytes (the files
    ``iter_documents`` reads). A content hash, not size + mtime: an edit that keeps both
    (``cp -p``, a restored backup, a coarse-mtime file system) still changes it. Measured on
    this machine (2 shared cores): a 1.1 MB file 0.7 ms, a 32 MB file 30 ms (~1 GB/s); an
    822 MB folder of 50,721 files 4.3 s, of which 3.0 s is the listing any per-file key
    needs and 0.4 s would be a size + mtime stat: small next to tokenizing it. The stdlib is
    identified by the interpreter's version and path instead (it changes only with them),
    so the default corpus pays nothing. A Hugging Face dataset is identified by name only
    (hashing it would mean downloading it)."""
    if corpus == DEFAULT_CORPUS:
        return hashlib.sha256(f"{sys.version}\0{stdlib_root()}".encode()).hexdigest()
    path = Path(corpus)
    if not path.exists():
        return hashlib.sha256(corpus.encode()).hexdigest()
    files = [(path.name, path)] if path.is_file() else _folder_files(path)
    digest = hashlib.sha256()
    for rel, file in files:
        digest.update(rel.encode("utf-8") + b"\0")
        with open(file, "rb") as handle:  # streamed: a multi-GB file is not read into memory
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def _stream_prefix(corpus: str, split: str) -> str:
    """The part of the cache key that names the corpus and split (not their content)."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(corpus).name if corpus != DEFAULT_CORPUS else corpus)
    ident = hashlib.sha256(f"{Path(corpus).resolve() if Path(corpus).exists() else corpus}".encode()).hexdigest()
    return f"{readable[:40]}-{ident[:8]}-{split}"


def _stream_key(corpus: str, split: str) -> str:
    return f"{_stream_prefix(corpus, split)}-tok{_tokenizer_hash()[:8]}-src{_source_hash(corpus)[:12]}"


def _encode_stream(corpus: str, split: Split, max_tokens: int | None) -> tuple[np.ndarray, dict]:
    tokenizer = load_fast_tokenizer()
    eos = tokenizer.token_to_id(EOS_TOKEN)
    documents, pieces, total = [], [], 0
    batch: list = []

    def flush() -> None:
        nonlocal total
        for encoding in tokenizer.encode_batch([doc.text for doc in batch]):
            ids = np.asarray(encoding.ids + [eos], dtype=np.uint16)
            pieces.append(ids)
            total += len(ids)
        batch.clear()

    for doc in iter_documents(corpus, split):
        documents.append(doc)
        batch.append(doc)
        if len(batch) == ENCODE_CHUNK:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    flush()
    if not pieces:
        raise ValueError(f"corpus {corpus!r} has no documents in its {split!r} split")
    stream = np.concatenate(pieces)
    meta = {
        "corpus": corpus,
        "split": split,
        "corpus_sha256": corpus_fingerprint(documents),
        "n_documents": len(documents),
        "n_tokens": int(stream.size),
        "tokenizer_sha256": _tokenizer_hash(),
    }
    return stream, meta


def token_stream(corpus: str = DEFAULT_CORPUS, split: Split = "train") -> tuple[np.ndarray, dict]:
    """The whole tokenized split as a read-only memory-mapped uint16 array, and its metadata.

    Built on first use (tens of seconds for the stdlib), then opened from the cache.
    """
    folder = cache_dir() / "tokens"
    key = _stream_key(corpus, split)
    array_path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    if not (array_path.exists() and meta_path.exists()):
        is_local = corpus == DEFAULT_CORPUS or Path(corpus).exists()
        stream, meta = _encode_stream(corpus, split, None if is_local else HF_DEFAULT_MAX_TOKENS)
        buffer = io.BytesIO()
        np.save(buffer, stream)
        atomic_write_bytes(array_path, buffer.getvalue())
        atomic_write_text(meta_path, json.dumps(meta, indent=2))  # written last: marks completion
        _remove_superseded(folder, corpus, split, key)
    meta = json.loads(meta_path.read_text())
    stream = np.load(array_path, mmap_mode="r")
    if stream.size != meta["n_tokens"]:
        raise RuntimeError(
            f"token cache {array_path} holds {stream.size} tokens but its sidecar says "
            f"{meta['n_tokens']}: it is corrupted. Delete both files to rebuild it."
        )
    return stream, meta


def _remove_superseded(folder: Path, corpus: str, split: str, key: str) -> None:
    """Delete the cached streams of earlier contents of this corpus and split (same
    tokenizer), so editing a local corpus does not pile up stale arrays. A reader that still
    has one memory-mapped keeps its data: unlinking an open file is safe on POSIX."""
    tokenizer = key.rsplit("-src", 1)[0]
    for old in folder.glob(f"{_stream_prefix(corpus, split)}-tok*-src*.*"):
        if old.name.startswith(tokenizer + "-src") and not old.name.startswith(key + "."):
            old.unlink(missing_ok=True)


def load_tokens(
    corpus: str = DEFAULT_CORPUS,
    split: Split = "train",
    n_tokens: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> torch.Tensor:
    """Token ids ``[n_seq, seq_len]`` (int64) in the zoo models' tokenization.

    Each row is BOS followed by ``seq_len - 1`` consecutive tokens of the split's stream
    (rows do not overlap). ``n_tokens`` counts tokens including BOS and is rounded down to
    whole rows; ``None`` takes the whole split.
    """
    if not isinstance(seq_len, numbers.Integral) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer of at least 2 (BOS plus one token), got {seq_len!r}")
    if n_tokens is not None and not isinstance(n_tokens, numbers.Integral):
        raise ValueError(f"n_tokens must be an integer (or None for the whole split), got {n_tokens!r}")
    stream, _ = token_stream(corpus, split)
    available = stream.size // (seq_len - 1)
    n_seq = available if n_tokens is None else n_tokens // seq_len
    if n_seq < 1:
        raise ValueError(f"n_tokens={n_tokens} is less than one row of seq_len={seq_len}")
    if n_seq > available:
        raise ValueError(
            f"the {split!r} split of {corpus!r} has {stream.size:,} tokens, enough for "
            f"{available:,} rows of seq_len={seq_len}; asked for {n_seq:,} rows "
            f"(n_tokens={n_tokens:,}). Ask for fewer tokens or use the 'train' split."
        )
    body = torch.from_numpy(np.asarray(stream[: n_seq * (seq_len - 1)], dtype=np.int64))
    bos = load_fast_tokenizer().token_to_id(EOS_TOKEN)
    rows = torch.full((n_seq, seq_len), bos, dtype=torch.long)
    rows[:, 1:] = body.view(n_seq, seq_len - 1)
    return rows


def unigram_entropy(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution of ``tokens``.

    The loss of the best model that ignores context: a trained model must beat it.
    """
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def corpus_sha256(corpus: str = DEFAULT_CORPUS, split: Split = "train") -> str:
    return token_stream(corpus, split)[1]["corpus_sha256"]


def check_disjoint(calibration: torch.Tensor, evaluation: torch.Tensor, what: str = "calibration") -> None:
    """Refuse ``calibration`` and ``evaluation`` token sets [n_seq, seq_len] that share a row.

    ``load_tokens`` rows are fixed, non-overlapping windows of a split, so two sets taken
    from it overlap exactly when they share rows (``load_tokens(split, n)`` always starts at
    the split's first row: slice one larger call instead). Sets with different row lengths
    cannot be compared row by row: that is said in a warning rather than passed silently.
    """
    if calibration.ndim != 2 or evaluation.ndim != 2:
        raise ValueError(f"token sets must be [n_seq, seq_len]; got {tuple(calibration.shape)} and {tuple(evaluation.shape)}")
    if calibration.shape[1] != evaluation.shape[1]:
        import logging

        logging.getLogger(__name__).warning(
            "cannot check that the %s and evaluation tokens are disjoint (rows of %d and %d tokens): make sure they "
            "come from different text", what, calibration.shape[1], evaluation.shape[1])
        return
    seen = {row.numpy().tobytes() for row in evaluation.cpu()}
    shared = sum(row.numpy().tobytes() in seen for row in calibration.cpu())
    if shared:
        raise ValueError(
            f"{shared} of the {calibration.shape[0]} {what} sequences also occur in the evaluation tokens: a number "
            "fitted and scored on the same text is not held out. Take disjoint slices of one call, e.g. "
            "rows = load_tokens('stdlib', 'val', n_tokens=a + b); calibration, evaluation = rows[:a // seq_len], "
            "rows[a // seq_len:]")
