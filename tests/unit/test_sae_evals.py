"""SAE evaluation metrics on hand-built SAEs whose answers are known."""

import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench import sae as saes
from workbench.evals import downstream_metrics, reconstruction_metrics


def exact_sae(d: int, hook: str = ""):
    """TopK SAE with W_enc = [I, −I], W_dec = [I; −I], k = d: for every nonzero x exactly d
    pre-activations are positive (one of ±x_i), so x̂ = ReLU(x) − ReLU(−x) = x."""
    sae = saes.create("topk", d, 2 * d, d, hook_name=hook)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_perfect_reconstruction_has_zero_fvu_and_l0_d():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    metrics = reconstruction_metrics(exact_sae(8), [x[:250], x[250:]])
    assert metrics.fvu == pytest.approx(0.0, abs=1e-10)
    assert metrics.l0 == pytest.approx(8.0) and metrics.n_rows == 500
    assert metrics.dead_fraction == 0.0


def test_predicting_the_mean_has_fvu_one():
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(1)) * 3 + 2
    sae = exact_sae(8)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.double().mean(0).float())
    metrics = reconstruction_metrics(sae, [x])
    assert metrics.fvu == pytest.approx(1.0, abs=1e-6)
    assert metrics.mse == pytest.approx(float((x - x.mean(0)).pow(2).mean()), rel=1e-5)


def test_density_and_dead_latents_are_counted():
    sae = exact_sae(4)
    x = torch.rand(10, 4, generator=torch.Generator().manual_seed(2)) + 0.1  # positive: only the +I half fires
    metrics = reconstruction_metrics(sae, [x])
    assert torch.equal(metrics.density, torch.tensor([1.0] * 4 + [0.0] * 4))
    assert metrics.dead_fraction == 0.5
    counts, edges = metrics.density_histogram(bins=5)
    assert int(counts.sum()) == 4 and len(edges) == 6


def test_splicing_an_exact_sae_changes_nothing():
    model, tokens = tiny_model(), tiny_tokens(n_seq=8)
    sae = exact_sae(model.cfg.d_model, hook="blocks.0.hook_resid_post")
    metrics = downstream_metrics(model, sae, tokens, batch_size=4)
    assert metrics.ce_spliced == pytest.approx(metrics.ce_clean, abs=1e-5)
    assert metrics.kl == pytest.approx(0.0, abs=1e-6)
    assert metrics.ce_recovered_vs_zero == pytest.approx(1.0, abs=1e-3)
    assert metrics.ce_zero_ablation != pytest.approx(metrics.ce_clean, abs=1e-3)


def test_splicing_a_bad_sae_changes_predictions():
    # (The tiny model is untrained, worse than uniform, so only the KL has a known sign.)
    model, tokens = tiny_model(), tiny_tokens(n_seq=8)
    sae = saes.create("topk", model.cfg.d_model, 64, 2, hook_name="blocks.0.hook_resid_post").eval()
    metrics = downstream_metrics(model, sae, tokens, batch_size=4)
    assert metrics.kl > 1e-3 and metrics.ce_spliced != pytest.approx(metrics.ce_clean, abs=1e-4)
