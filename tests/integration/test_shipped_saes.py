"""The shipped SAEs: every catalogue entry is present, loads by name in eval mode, and its
card's held-out numbers are what its weights give; the training command writes the same
kind of folder; SAELens releases fail fast offline."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import workbench as wb
from workbench.saes import CATALOGUE, SAEUnavailableOffline, list_saes, load_sae, sae_card
from workbench.saes.train import train_catalogue

NAME = "stdlib-gelu/blocks.2.hook_resid_post/topk-2048"


def test_every_catalogue_entry_is_shipped_small_and_loads_in_eval_mode():
    assert list_saes() == list(CATALOGUE)
    assert len(CATALOGUE) == 16  # TopK + Matryoshka per residual stream, TopK per attention and MLP output
    total = 0
    for name in CATALOGUE:
        sae = load_sae(name, device="cpu")
        card = sae_card(name)
        assert not sae.training and sae.cfg.hook_name == card.hook and sae.architecture == card.architecture
        assert (card.d_sae, card.k) == (sae.cfg.d_sae, sae.cfg.k)
        assert 0 < card.fvu < 0.5 and card.ce_recovered_vs_zero > 0.5, name
        total += sum(p.stat().st_size for p in (wb.paths.REPO_ROOT / "saes" / name).iterdir())
    assert total < 30 * 2**20


def test_a_card_is_what_the_shipped_weights_give(default_model):
    """FVU and L0 of the card re-measured on the same held-out rows (val split, disjoint from training)."""
    from workbench.evals import reconstruction_metrics

    card, sae = sae_card(NAME), load_sae(NAME, device="cpu")
    val = wb.load_tokens("stdlib", "val", n_tokens=card.eval_tokens)
    _, acts = default_model.run_with_cache(val[:64], names_filter=[card.hook])
    x = acts[card.hook].reshape(-1, sae.cfg.d_in)
    metrics = reconstruction_metrics(sae, [x])
    # A quarter of the card's rows: FVU within 15% of it (it varies across the val split), L0 exactly k.
    assert metrics.fvu == pytest.approx(card.fvu, rel=0.15)
    assert metrics.l0 == pytest.approx(card.l0, abs=0.5)


def test_the_training_command_writes_a_loadable_folder_with_a_card(tmp_path):
    cards = train_catalogue([NAME], train_tokens=16_384, eval_tokens=4_096, out_dir=tmp_path / 'saes',
                             run_root=tmp_path / 'runs', progress=False)
    folder = tmp_path / 'saes' / NAME
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "cfg.json", "sae.safetensors"]
    card = json.loads((folder / "card.json").read_text())
    assert card["tokens_seen"] == 16_384 and card["hook"] == "blocks.2.hook_resid_post" and card["weights_dtype"] == "float16"
    assert cards[0].fvu == card["fvu"] and math.isfinite(card["fvu"])  # 4 steps: the plumbing; the shipped cards test quality
    sae = wb.sae.load(folder)
    assert sae.W_dec.dtype == torch.float32 and not sae.training


def test_unknown_names_and_offline_releases_say_what_to_do(offline_hub):
    with pytest.raises(ValueError, match="did you mean|list_saes"):
        load_sae("stdlib-gelu/blocks.2.hook_resid_post/topk-2049")
    started = time.perf_counter()
    with pytest.raises(SAEUnavailableOffline, match="shipped SAEs load offline"):
        load_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")
    assert time.perf_counter() - started < 10
