import math

import numpy as np
import pytest
import torch

from workbench.data import load_tokens, token_stream, unigram_entropy
from workbench.tokenizer import EOS_TOKEN, load_fast_tokenizer


def test_rows_start_with_bos_and_follow_the_stream():
    seq_len = 64
    rows = load_tokens("stdlib", "val", n_tokens=10 * seq_len, seq_len=seq_len)
    stream, meta = token_stream("stdlib", "val")
    assert rows.shape == (10, seq_len) and rows.dtype == torch.long
    bos = load_fast_tokenizer().token_to_id(EOS_TOKEN)
    assert (rows[:, 0] == bos).all()
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1).numpy(), stream[: 10 * (seq_len - 1)])
    assert meta["n_tokens"] == stream.size and len(meta["corpus_sha256"]) == 64


def test_stream_is_memory_mapped_and_cached():
    stream, _ = token_stream("stdlib", "val")
    assert isinstance(stream, np.memmap) and stream.dtype == np.uint16
    again, _ = token_stream("stdlib", "val")
    assert again.filename == stream.filename


def test_too_many_tokens_says_how_many_exist():
    with pytest.raises(ValueError, match="enough for"):
        load_tokens("stdlib", "val", n_tokens=10**10)


def test_local_corpus_tokens(tmp_path):
    for i in range(50):
        (tmp_path / f"f{i}.py").write_text(f"x_{i} = {i} * 2\nprint(x_{i})\n" * 20)
    rows = load_tokens(str(tmp_path), "train", n_tokens=8 * 32, seq_len=32)
    assert rows.shape == (8, 32)
    assert load_fast_tokenizer().decode(rows[0, 1:].tolist()).startswith("x_")


def test_unigram_entropy_by_hand():
    assert unigram_entropy(torch.tensor([0, 0, 1, 1]), 8) == pytest.approx(math.log(2))
    assert unigram_entropy(torch.tensor([3, 3, 3]), 8) == pytest.approx(0.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert unigram_entropy(torch.tensor([0, 0, 1, 2]), 8) == pytest.approx(float(-(p * p.log()).sum()))
