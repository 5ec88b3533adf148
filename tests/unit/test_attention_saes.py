"""Attention-output SAEs (Kissane et al. 2024) on the tiny model's concatenated hook_z.

Head attribution is each head's share of the decoder norm; direct feature attribution splits
a feature's pre-activation over (head, source token) exactly; the feature index writes the
head shares and maps the decoder through W_O for the logit effects; the FeatureBrowser shows
the heads and where a feature reads from; an SAE trained on a hook_z cache splices back in.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.cache import ActivationCache, cache_activations
from workbench.evals import spliced_loss
from workbench.features import build_index
from workbench.features.attention import (attention_layer, decoder_in_residual, direct_feature_attribution,
                                          head_attribution)
from workbench.sae import create
from workbench.trainer import TrainConfig, train_sae
from workbench.widgets import FeatureBrowser, feature_data
from workbench.widgets.feature_browser import activation_of, prompt_features, prompt_sources, vocabulary

HOOK = "blocks.1.attn.hook_z"
N_HEADS, D_HEAD = 4, 8  # the tiny model's: n_heads · d_head = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("cache")
    cache_activations(model, tiny_tokens(), [HOOK], folder, dtype="float32", batch_size=8, progress=False)
    cache = ActivationCache.open(folder)
    cfg = TrainConfig(d_sae=48, k=4, batch_size=64, hook_name=HOOK, total_tokens=cache.n_tokens, warmup_steps=2,
                      log_every=2, device="cpu")
    return model, cache, train_sae(cfg, cache, progress=False)


def test_head_attribution_is_each_heads_share_of_the_decoder_norm():
    torch.manual_seed(0)
    sae = create("topk", d_in=N_HEADS * D_HEAD, d_sae=6, k=2, hook_name=HOOK)
    with torch.no_grad():
        sae.W_dec[0].zero_()
        sae.W_dec[0, 2 * D_HEAD:3 * D_HEAD] = 1.0  # feature 0 lives in head 2 alone
    shares = head_attribution(sae, N_HEADS)
    assert shares.shape == (6, N_HEADS)
    torch.testing.assert_close(shares.sum(1), torch.ones(6))
    assert shares[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    norms = sae.W_dec[3].detach().reshape(N_HEADS, D_HEAD).norm(dim=1)
    torch.testing.assert_close(shares[3], norms / norms.sum())
    with pytest.raises(ValueError, match="does not split"):
        head_attribution(sae, 5)
    assert attention_layer(sae) == 1 and attention_layer(create("topk", d_in=8, d_sae=8, k=1, hook_name="blocks.1.hook_z_")) is None


@torch.no_grad()
def test_direct_feature_attribution_sums_exactly_to_the_pre_activation(trained):
    model, _, sae = trained
    tokens = tiny_tokens(n_seq=1, seq_len=12, seed=3)[0]
    _, cache = model.run_with_cache(tokens[None], names_filter=HOOK)
    z = cache[HOOK][0].reshape(12, -1)
    pre = sae.pre_acts(z)
    for feature, query in ((0, 11), (7, 5), (30, 0)):
        dfa = direct_feature_attribution(model, sae, tokens, feature, query)
        assert dfa.by_head_and_source.shape == (N_HEADS, query + 1)
        assert dfa.pre_activation == pytest.approx(float(pre[query, feature]), abs=1e-4)
        assert float(dfa.by_source.sum()) == pytest.approx(float(dfa.by_head.sum()), abs=1e-5)
    with pytest.raises(ValueError, match="query in"):
        direct_feature_attribution(model, sae, tokens, 0, 12)
    resid_sae = create("topk", d_in=32, d_sae=8, k=1, hook_name="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="reads blocks.L.attn.hook_z"):
        direct_feature_attribution(model, resid_sae, tokens, 0, 0)


@torch.no_grad()
def test_an_attention_sae_trained_on_a_hook_z_cache_splices_back_in(trained):
    model, cache, sae = trained
    assert cache.d(HOOK) == N_HEADS * D_HEAD
    tokens = tiny_tokens(n_seq=4)

    def by_hand(act, hook):
        return sae(act.reshape(-1, N_HEADS * D_HEAD)).x_hat.reshape(act.shape)

    expected = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(HOOK, by_hand)])
    assert spliced_loss(model, sae, tokens) == pytest.approx(float(expected), rel=1e-5)


def test_the_index_and_the_browser_show_heads_and_sources(trained, tmp_path, monkeypatch):
    model, cache, sae = trained
    # The tiny model has no tokenizer: the prompt box's text becomes fixed token ids.
    import workbench.widgets.feature_browser as browser_module
    monkeypatch.setattr(browser_module, "_check_text", lambda model, text: tiny_tokens(n_seq=1, seq_len=12, seed=3))
    index = build_index(sae, cache, out_dir=tmp_path / "index", top_n=3, model=model, window=(3, 2), n_bins=2,
                        samples_per_bin=1, batch_size=100, progress=False)
    shares = head_attribution(sae, N_HEADS)
    for f in (0, 5):
        assert index.head_shares(f) == pytest.approx(shares[f].tolist(), abs=1e-6)
    # logit effects of the direction the layer writes (decoder through W_O), ln_final's scale applied
    direction = decoder_in_residual(sae, model)
    logits = direction[5] @ (model.W_U.detach() * model.ln_final.w.detach()[:, None])
    assert index.logit_tokens(5)["top"][0][1] == pytest.approx(float(logits.max()), rel=1e-4)

    vocab = vocabulary(getattr(model, "tokenizer", None), model.cfg.d_vocab)
    data = feature_data(index, 5, vocab)
    json.dumps(data)
    assert data["heads"] == index.head_shares(5)
    browser = FeatureBrowser(index, model, sae=sae, prompt="any text")
    browser.select(5)
    assert "heads writing it" in browser.stats_panel.value and "head 3" in browser.stats_panel.value
    fired = next((f for f in range(sae.cfg.d_sae) if max(activation_of(browser.prompt, f)) > 0), None)
    assert fired is not None
    browser.select(fired)
    lines = browser.prompt_view.lines
    assert len(lines) == 2 and lines[1]["label"] == "reads from"
    sources = prompt_sources(model, sae, browser.prompt, fired)
    query = sources["query"]
    assert lines[1]["marked"] == query
    total = sum(t["value"] for t in sources["tokens"]) + sources["bias"]
    assert total == pytest.approx(sources["pre_activation"], abs=1e-4)
    assert all(t["value"] == 0.0 for t in sources["tokens"][query + 1:])  # causal: nothing from later tokens

    resid = create("topk", d_in=32, d_sae=8, k=1, hook_name="blocks.0.hook_resid_post")
    prompt = prompt_features(model, resid, "a b c", vocab=vocab)
    assert prompt_sources(model, resid, prompt, 0) is None  # other SAEs: no source line
