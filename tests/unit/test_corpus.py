import time

import pytest

from workbench.corpus import VAL_PERCENT, iter_documents, split_of


def test_split_is_a_stable_hash_of_the_name():
    names = [f"pkg/module_{i}.py" for i in range(20_000)]
    first = [split_of(n) for n in names]
    assert first == [split_of(n) for n in names]
    val_share = first.count("val") / len(first)
    # 20k Bernoulli(0.05) draws: standard error 0.15 percentage points; allow 4 of them.
    assert abs(val_share - VAL_PERCENT / 100) < 0.006


def test_stdlib_splits_are_disjoint_sorted_and_both_nonempty():
    train = [doc.name for doc in iter_documents("stdlib", "train")]
    val = [doc.name for doc in iter_documents("stdlib", "val")]
    assert train == sorted(train) and val == sorted(val)
    assert not set(train) & set(val)
    assert len(val) > 20 and len(train) > 10 * len(val)
    assert "os.py" in train + val and not any("site-packages" in n for n in train + val)


def test_local_folder_corpus_skips_binary_and_hidden_files(tmp_path):
    for i in range(200):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden")
    docs = list(iter_documents(str(tmp_path), "train")) + list(iter_documents(str(tmp_path), "val"))
    names = sorted(doc.name for doc in docs)
    assert names == sorted(f"doc{i}.txt" for i in range(200))
    assert {doc.name for doc in iter_documents(str(tmp_path), "val")} == {n for n in names if split_of(n) == "val"}


def test_single_text_file_is_cut_into_blocks(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    docs = list(iter_documents(str(path), "train")) + list(iter_documents(str(path), "val"))
    assert sorted(d.name for d in docs) == sorted(f"book.txt:{i}" for i in range(5))
    assert sum(d.text.count("\n") for d in docs) == 1000


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        next(iter_documents("stdlib", "test"))


def test_hub_dataset_offline_fails_fast(offline_hub):
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match="no model hub is reachable"):
        next(iter_documents("some-user/some-dataset", "train"))
    assert time.perf_counter() - started < 10
