"""SAE trainer: learns synthetic ground truth, resumes exactly, sweeps in one pass, trains from a cache."""

import json

import pytest
import torch

from tests.helpers.streams import Interrupt, interrupted
from workbench import synthetic
from workbench.sae import ARCHITECTURES, load
from workbench.trainer import TrainConfig, default_lr, geometric_median, train_sae, train_saes

SMALL = synthetic.superposition(d=32, n_features=128, avg_active=3, seed=0)


def _config(**kw):
    base = dict(architecture="topk", d_sae=128, k=4, batch_size=256, total_tokens=256 * 120, warmup_steps=10,
                log_every=10)
    return TrainConfig(**{**base, **kw})


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 0.1 + 1.0, torch.full((20, 3), 100.0)])
    median = geometric_median(points)
    assert (median - 1.0).abs().max() < 0.1 and (points.mean(0) - 1.0).abs().min() > 5


def test_default_lr_scales_with_width():
    assert default_lr(2**14) == pytest.approx(2e-3)
    assert default_lr(2**12) == pytest.approx(4e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_learns_the_synthetic_dictionary(arch):
    cfg = _config(architecture=arch)
    data = SMALL.batches(256, 256 * 120, seed=1)
    if arch == "gradient":  # (x, g) pairs; a random g still leaves z in charge of the values
        gen = torch.Generator().manual_seed(2)
        data = ((x, torch.randn(x.shape, generator=gen) * 0.01) for x in data)
    sae = train_sae(cfg, data, progress=False)
    x, _ = SMALL.sample(2048, torch.Generator().manual_seed(9))
    fvu = float((sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.3, fvu
    assert synthetic.mmcs(sae.W_dec.detach(), SMALL.features) > 0.7


def test_resume_gives_the_same_weights(tmp_path):
    cfg = _config(checkpoint_every=40, total_tokens=256 * 100)
    straight = train_sae(cfg, SMALL.batches(256, 256 * 100, seed=1), run_dir=tmp_path / "a", progress=False)

    with pytest.raises(Interrupt):
        train_sae(cfg, interrupted(SMALL.batches(256, 256 * 100, seed=1), 57), run_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "0-topk-k4-128" / "checkpoint.safetensors").exists()
    resumed = train_sae(cfg, SMALL.batches(256, 256 * 100, seed=1), run_dir=tmp_path / "b", progress=False)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    saved = load(tmp_path / "b" / "0-topk-k4-128")
    assert torch.equal(saved.W_dec, resumed.W_dec)
    history = lambda run: json.loads((tmp_path / run / "0-topk-k4-128" / "metrics.json").read_text())["history"]  # noqa: E731
    assert history("b") == history("a")  # the curve before the interruption was kept


def test_a_sweep_trains_from_one_pass_like_separate_runs():
    configs = [_config(k=4), _config(k=8, d_sae=64)]
    pulled = []

    def counted(stream):
        for batch in stream:
            pulled.append(1)
            yield batch

    together = train_saes(configs, counted(SMALL.batches(256, 256 * 120, seed=1)), progress=False)
    assert len(pulled) == 120  # one pass over the data for both SAEs
    alone = train_sae(configs[1], SMALL.batches(256, 256 * 120, seed=1), progress=False)
    assert torch.equal(together[1].W_dec, alone.W_dec)


def test_k_annealing_starts_wide_and_ends_at_k():
    from workbench.trainer.step import SAETrainer
    from workbench.sae import create

    cfg = _config(k_anneal_tokens=256 * 50, k_start=16)
    trainer = SAETrainer(create("topk", 32, 128, 4), cfg)
    ks = []
    for x in SMALL.batches(256, 256 * 60, seed=1):
        ks.append(trainer.step(x).k)
    assert ks[0] == 16 and ks[-1] == 4 and ks == sorted(ks, reverse=True)


# Hierarchical SAEs train every budget ≤ k at once; annealing would start above k.
REFUSE_K_ANNEALING = {"hierarchical", "relu", "jumprelu"}
K_FREE = {"relu", "jumprelu"}  # their L0 comes from a penalty, not from k


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("anneal", [False, True])
def test_k_annealing_is_followed_or_refused(arch, anneal, tmp_path):
    """Every architecture either trains at the annealed k (the L0 of each step is k_now:
    per row for TopK-like rules, on average for BatchTopK-like ones) or refuses the config,
    naming itself; never silently ignores it."""
    kw = dict(architecture=arch, d_sae=64, k=4, batch_size=64, total_tokens=640, k_anneal_tokens=320 if anneal else 0,
              warmup_steps=1, log_every=1, device="cpu")
    if anneal and arch in REFUSE_K_ANNEALING:
        with pytest.raises(ValueError, match=f"(?s){arch}.*k_anneal_tokens"):
            TrainConfig(**kw)
        return
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(640, 16, generator=gen)
    data = [(b, torch.randn(b.shape, generator=gen)) if arch == "gradient" else b for b in x.split(64)]
    sae = train_sae(TrainConfig(**kw), data, run_dir=tmp_path, progress=False)
    [folder] = list(tmp_path.iterdir())
    history = json.loads((folder / "metrics.json").read_text())["history"]
    # k_now at 0, 64, …, 576 tokens: 16 → 4 linearly over 320 tokens (k_start = 4k), then 4.
    expected = [16, 14, 11, 9, 6, 4, 4, 4, 4, 4] if anneal else [4] * 10
    assert [h["k"] for h in history] == expected
    if arch in K_FREE:
        return
    assert [h["l0"] for h in history] == pytest.approx(expected, rel=0.02)
    if hasattr(sae, "threshold"):  # θ only averages the batches kept at the final k
        steps_at_k = expected.count(4)
        assert float(sae.threshold_weight.max()) == pytest.approx(1 - (1 - sae.cfg.threshold_ema) ** steps_at_k)


def test_dead_latents_get_aux_gradient():
    from workbench.trainer.step import SAETrainer
    from workbench.sae import create

    trainer = SAETrainer(create("topk", 32, 128, 4), _config(dead_tokens=1))
    x = next(SMALL.batches(256, 256, seed=1))
    trainer.tokens_since_fired.fill_(10)  # every latent counts as dead
    stats = trainer.step(x)
    assert stats.aux_loss > 0 and stats.dead_fraction < 1.0


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="unknown architecture"):
        TrainConfig(architecture="rellu")
    with pytest.raises(ValueError, match="less than one batch"):
        TrainConfig(total_tokens=10, batch_size=4096)
    with pytest.raises(ValueError, match="finish before training ends"):
        TrainConfig(total_tokens=4096 * 10, k_anneal_tokens=4096 * 10)


def test_two_process_data_parallel_keeps_replicas_identical(tmp_path):
    """torchrun with 2 gloo processes: each rank steps on its own batches, gradients and
    bookkeeping are averaged, so both replicas end bit-identical, one process writes the
    run folder, and the SAE has learned (steps count world × batch rows each)."""
    from safetensors.torch import load_file

    from tests.helpers.torchrun import run_two_processes
    from tests.helpers.train_ddp import BATCH, TOTAL

    run_two_processes("tests.helpers.train_ddp", str(tmp_path))
    replicas = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert replicas[0].keys() == replicas[1].keys()
    for name in replicas[0]:
        assert torch.equal(replicas[0][name], replicas[1][name]), name
    [folder] = list((tmp_path / "run").iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["steps"] == TOTAL // BATCH // 2 and metrics["tokens"] == TOTAL
    sae = load(folder)
    x, _ = SMALL.sample(2048, torch.Generator().manual_seed(9))
    with torch.no_grad():
        fvu = float((sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.4, fvu
