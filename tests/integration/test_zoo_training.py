"""The zoo's training command runs end to end: weights, card, checkpoints, reload."""

import json

import pytest
import torch

import workbench
from workbench import paths
from workbench.zoo.train import train_zoo_model


@pytest.fixture()
def scratch_data_dir(tmp_path, monkeypatch):
    """A data folder of its own that shares the shipped tokenizer and the token cache."""
    real = paths.data_dir()
    (tmp_path / "tokenizer").symlink_to(real / "tokenizer")
    (tmp_path / "cache").symlink_to(paths.cache_dir())
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    return tmp_path


def test_train_writes_weights_card_and_checkpoints(scratch_data_dir):
    card = train_zoo_model("stdlib-relu", train_tokens=12 * 32 * 128, eval_tokens=4 * 128)
    folder = scratch_data_dir / "zoo" / "stdlib-relu"
    assert json.loads((folder / "card.json").read_text())["tokens_seen"] == 12 * 32 * 128 == card.tokens_seen
    assert workbench.list_models() == ["stdlib-relu"]

    checkpoints = workbench.zoo_checkpoints("stdlib-relu")
    assert [tokens for tokens, _ in checkpoints] == [i * 32 * 128 for i in range(1, 13)]
    first = workbench.load_model("stdlib-relu", "cpu", checkpoint=checkpoints[0][1])
    final = workbench.load_model("stdlib-relu", "cpu")
    last = workbench.load_model("stdlib-relu", "cpu", checkpoint=checkpoints[-1][1])
    assert torch.equal(final.W_in, last.W_in)  # the last checkpoint is the shipped weights
    assert not torch.equal(first.W_in, final.W_in)


def test_training_is_seeded(scratch_data_dir):
    a = train_zoo_model("stdlib-gelu", train_tokens=2 * 32 * 128, eval_tokens=4 * 128)
    weights_a = (scratch_data_dir / "zoo" / "stdlib-gelu" / "model.safetensors").read_bytes()
    b = train_zoo_model("stdlib-gelu", train_tokens=2 * 32 * 128, eval_tokens=4 * 128)
    assert (scratch_data_dir / "zoo" / "stdlib-gelu" / "model.safetensors").read_bytes() == weights_a
    assert a.val_loss_nats == b.val_loss_nats
