"""End-to-end SAEs (Braun et al. 2024) on the tiny model: the objective is the KL of the
spliced model from the clean one (zero when the reconstruction is exact), e2e+ds adds the
later layers' normalised errors, training lowers it without touching the model, and the
trainer takes the loss object without learning about models."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.end_to_end import EndToEnd
from workbench.sae import create
from workbench.trainer import TrainConfig, train_sae
from workbench.trainer.run_folder import data_fingerprint

HOOK, LATER = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@torch.no_grad()
def test_the_objective_is_the_kl_of_the_spliced_model_and_ds_adds_later_errors():
    model, tokens = tiny_model(), tiny_tokens(n_seq=8)
    data = EndToEnd(model, tokens, HOOK, sequences_per_batch=4, downstream=(LATER,), downstream_coefficient=2.0)
    x = next(iter(data))
    assert x.shape == (data.batch_rows, 32) == (64, 32)
    assert data.objective(x, x) == pytest.approx(0.0, abs=1e-6)  # the exact activations: nothing changes
    noisy = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    clean_tokens = data._clean["tokens"]
    clean = model(clean_tokens).log_softmax(-1)
    captured = {}
    with model.hooks(fwd_hooks=[(HOOK, lambda act, hook: noisy.reshape(act.shape)),
                                (LATER, lambda act, hook: captured.__setitem__("later", act))]):
        spliced = model(clean_tokens).log_softmax(-1)
    kl = float((clean.exp() * (clean - spliced)).sum(-1).mean())
    _, clean_cache = model.run_with_cache(clean_tokens, names_filter=[LATER])
    target = clean_cache[LATER].reshape(-1, 32)
    error = float((captured["later"].reshape(-1, 32) - target).pow(2).sum(-1).mean()
                  / (target - target.mean(0)).pow(2).sum(-1).mean())
    assert kl > 0 and error > 0
    assert float(data.objective(x, noisy)) == pytest.approx(kl + 2.0 * error, rel=1e-4)
    without_ds = EndToEnd(model, tokens, HOOK, sequences_per_batch=4)
    assert torch.equal(next(iter(without_ds)), x)  # the same seeded first batch
    assert float(without_ds.objective(x, noisy)) == pytest.approx(kl, rel=1e-4)


def test_training_lowers_the_kl_and_leaves_the_model_alone():
    model, tokens = tiny_model(), tiny_tokens(n_seq=64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = EndToEnd(model, tokens, HOOK, sequences_per_batch=4)
    cfg = TrainConfig(d_sae=64, k=8, batch_size=data.batch_rows, total_tokens=data.n_rows, hook_name=HOOK, warmup_steps=2,
                      log_every=1, device="cpu")
    sae = train_sae(cfg, data, progress=False)
    assert all(torch.equal(p, before[name]) and p.grad is None and p.requires_grad for name, p in model.named_parameters())
    # the KL of the same held-out batch before and after training (a fresh SAE's start is far worse)
    held_out = EndToEnd(model, tiny_tokens(n_seq=4, seed=7), HOOK, sequences_per_batch=4)
    x = next(iter(held_out))
    with torch.no_grad():
        trained = float(held_out.objective(x, sae(x).x_hat))
        torch.manual_seed(0)
        fresh = create("topk", d_in=32, d_sae=64, k=8)
        untrained = float(held_out.objective(x, fresh(x).x_hat))
    assert trained < 0.5 * untrained, (trained, untrained)


def test_bad_e2e_setups_are_explained():
    model, tokens = tiny_model(), tiny_tokens(n_seq=8)
    data = EndToEnd(model, tokens, HOOK, sequences_per_batch=4)
    with pytest.raises(ValueError, match="set TrainConfig.batch_size=64"):
        train_sae(TrainConfig(d_sae=64, k=8, batch_size=32, hook_name=HOOK), data, progress=False)
    with pytest.raises(ValueError, match="not a hook"):
        EndToEnd(model, tokens, "blocks.0.hook_resid_pots")
    with pytest.raises(RuntimeError, match="iterate the EndToEnd data first"):
        data.objective(torch.zeros(64, 32), torch.zeros(64, 32))
    first, again = data_fingerprint(data), data_fingerprint(EndToEnd(model, tokens, HOOK, sequences_per_batch=4))
    assert first["sha256"] == again["sha256"]
    assert data_fingerprint(EndToEnd(model, tiny_tokens(n_seq=8, seed=1), HOOK, sequences_per_batch=4))["sha256"] != first["sha256"]
