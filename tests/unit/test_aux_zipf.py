"""aux_zipf (Ayonrinde 2024): AuxK extended from dead latents to latents below a fitted Zipf law."""

import json

import pytest
import torch

from tests.helpers.streams import Interrupt, interrupted
from workbench import synthetic
from workbench.sae import create
from workbench.trainer import TrainConfig, train_sae
from workbench.trainer.run_folder import _differences
from workbench.trainer.step import SAETrainer
from workbench.trainer.zipf import under_used, zipf_expected

SMALL = synthetic.superposition(d=32, n_features=128, avg_active=3, seed=0)


def _zipf(n=1000, alpha=1.1, scale=0.3):
    """Densities that follow a Zipf law exactly, in shuffled order."""
    density = scale * torch.arange(1, n + 1, dtype=torch.float64) ** -alpha
    return density[torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def test_a_zipf_law_is_recovered_and_nothing_on_it_is_under_used():
    density = _zipf()
    torch.testing.assert_close(zipf_expected(density), density, rtol=1e-9, atol=0)
    assert not under_used(density).any()


def test_latents_pushed_below_the_law_are_the_under_used_ones():
    density = _zipf()
    tail = density.argsort()[:50]  # the 5% rarest: outside the fit (the densest 80%)
    low, mid = tail[:20], tail[20:]
    density[low] *= 0.2  # far below their expectation
    density[mid] *= 0.8  # below it, but within the factor of 2
    flagged = under_used(density)
    assert set(flagged.nonzero().squeeze(1).tolist()) == set(low.tolist())
    assert not under_used(torch.zeros(10)).any()  # nothing fires yet: nothing to fit


def test_the_trainer_adds_under_used_latents_to_auxk_only_with_zipf():
    masks = {}
    for rule in ("dead", "zipf"):
        cfg = TrainConfig(d_sae=1000, k=4, total_tokens=10_000, dead_tokens=1000, aux_latents=rule)
        trainer = SAETrainer(create("topk", 16, 1000, 4), cfg)
        trainer.density = _zipf().float()
        trainer.density[:5] *= 0.01  # five alive but rarely firing latents
        trainer.tokens_since_fired[5:8] = 1000  # three dead ones
        trainer.tokens_seen = 999
        assert trainer.aux_latents().nonzero().squeeze(1).tolist() == [5, 6, 7]  # densities not yet trusted
        trainer.tokens_seen = 1000
        masks[rule] = set(trainer.aux_latents().nonzero().squeeze(1).tolist())
    assert masks["dead"] == {5, 6, 7}
    assert masks["zipf"] >= {0, 1, 2, 3, 4, 5, 6, 7}
    with pytest.raises(ValueError, match="aux_latents must be 'dead' or 'zipf'"):
        TrainConfig(aux_latents="rare")


def test_training_tracks_densities_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(architecture="batchtopk", d_sae=128, k=4, batch_size=256, total_tokens=256 * 60, warmup_steps=5,
                      aux_latents="zipf", dead_tokens=256 * 10, checkpoint_every=20, log_every=10)
    stream = lambda: SMALL.batches(256, 256 * 60, seed=1)  # noqa: E731
    straight = train_sae(cfg, stream(), run_dir=tmp_path / "a", progress=False)
    with pytest.raises(Interrupt):
        train_sae(cfg, interrupted(stream(), 33), run_dir=tmp_path / "b", progress=False)
    resumed = train_sae(cfg, stream(), run_dir=tmp_path / "b", progress=False)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    history = lambda run: json.loads(next((tmp_path / run).glob("*/metrics.json")).read_text())["history"]  # noqa: E731
    assert history("b") == history("a")  # the AuxK losses, which read the densities, match step for step
    assert any(h["aux_loss"] > 0 for h in history("a"))


def test_a_run_recorded_before_a_setting_existed_counts_it_at_its_default():
    from workbench.trainer.run_folder import _plain

    identity = {"train_config": _plain(TrainConfig()), "data": {"kind": "tensor", "sha256": "x"}, "world_size": 1}
    older = json.loads(json.dumps(identity))
    del older["train_config"]["aux_latents"]
    assert _differences(older, identity) == []
    changed = json.loads(json.dumps(identity))
    changed["train_config"]["aux_latents"] = "zipf"
    assert _differences(older, changed) == ["topk k=32 d_sae=2048: aux_latents 'dead' → 'zipf'"]
