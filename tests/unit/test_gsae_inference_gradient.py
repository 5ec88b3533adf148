"""The gradient a g-SAE selects with at evaluation: per position, and label-free by default.

Position t's selection may use what the model knows at t (tokens ≤ t), never the token it
is scored on (t + 1) nor anything later. The sequence-summed label gradient breaks both.
"""

import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench import sae as saes
from workbench.evals import downstream_metrics, hook_gradients

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post"]


def _with_future_changed(tokens: torch.Tensor, t: int) -> torch.Tensor:
    changed = tokens.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 7) % 64
    return changed


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("objective", ["entropy", "argmax"])
def test_label_free_gradient_ignores_the_label_and_the_future(hook, objective):
    model, tokens, t = tiny_model(), tiny_tokens(n_seq=3), 6
    before = hook_gradients(model, tokens, hook, objective)
    after = hook_gradients(model, _with_future_changed(tokens, t), hook, objective)
    assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:], atol=1e-6)  # the test can fail


@pytest.mark.parametrize("hook", HOOKS)
def test_label_gradient_sees_only_its_own_label(hook):
    # g_t for "labels" uses token t+1 (the paper's protocol), but no later position's loss.
    model, tokens, t = tiny_model(), tiny_tokens(n_seq=3), 6
    before = hook_gradients(model, tokens, hook, "labels")
    after = hook_gradients(model, _with_future_changed(tokens, t), hook, "labels")
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)
    assert not torch.allclose(before[:, t], after[:, t], atol=1e-6)


@pytest.mark.parametrize("hook", HOOKS + ["blocks.1.attn.hook_q"])
def test_one_backward_equals_the_jacobian_diagonal(hook):
    # The fast path rewrites attention's backward; it must equal one backward per position.
    model, tokens = tiny_model(), tiny_tokens(n_seq=2)
    fast = hook_gradients(model, tokens, hook, "entropy")
    exact = hook_gradients(model, tokens, hook, "entropy", exact_jacobian=True)
    assert fast.shape == exact.shape and fast.abs().max() > 0
    assert torch.allclose(fast, exact, atol=1e-6)


def test_gradient_sae_evaluation_modes_differ_and_default_is_label_free():
    model, tokens, hook = tiny_model(), tiny_tokens(n_seq=4), "blocks.0.hook_resid_post"
    sae = saes.create("gradient", model.cfg.d_model, 64, 4, beta=1e6, hook_name=hook).eval()
    ce = {g: downstream_metrics(model, sae, tokens, gradient=g).ce_spliced for g in ("entropy", "labels", "none")}
    assert downstream_metrics(model, sae, tokens).ce_spliced == ce["entropy"]
    assert len({round(v, 6) for v in ce.values()}) == 3
    precomputed = hook_gradients(model, tokens, hook, "labels")
    assert downstream_metrics(model, sae, tokens, gradient="labels", gradients=precomputed).ce_spliced == pytest.approx(ce["labels"])
    with pytest.raises(ValueError, match="gradient must be one of"):
        downstream_metrics(model, sae, tokens, gradient="clean")


def test_evaluation_leaves_a_training_mode_sae_unchanged():
    model, tokens, hook = tiny_model(), tiny_tokens(n_seq=4), "blocks.0.hook_resid_post"
    sae = saes.create("batchtopk", model.cfg.d_model, 64, 4, hook_name=hook)  # training mode
    sae.threshold.fill_(0.1)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    downstream_metrics(model, sae, tokens)
    assert sae.training
    assert all(torch.equal(state[k], v) for k, v in sae.state_dict().items())


@pytest.mark.parametrize("gradient", ["entropy", "labels", "none"])
def test_spliced_loss_alone_equals_the_full_downstream_metric(gradient):
    from workbench.evals import spliced_loss

    model, tokens, hook = tiny_model(), tiny_tokens(n_seq=4), "blocks.0.hook_resid_post"
    sae = saes.create("gradient", model.cfg.d_model, 64, 4, beta=1e6, hook_name=hook).eval()
    assert spliced_loss(model, sae, tokens, gradient=gradient, batch_size=3) == pytest.approx(
        downstream_metrics(model, sae, tokens, gradient=gradient).ce_spliced, rel=1e-6)
