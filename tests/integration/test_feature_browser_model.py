"""The feature browser on the default model and a shipped SAE: what fires on typed text is
the SAE's code of the model's activations; steering adds exactly α·W_dec[f] and moves the
model's prediction; hostile prompt text reaches the view as data."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.steering import steering_hook
from workbench.widgets import FeatureBrowser, prompt_features

NAME = "stdlib-gelu/blocks.2.hook_resid_post/topk-2048"


@pytest.fixture(scope="module")
def setup(default_model, tmp_path_factory):
    sae = wb.load_sae(NAME, device="cpu")
    tokens = wb.load_tokens("stdlib", "val", n_tokens=8_192)
    folder = tmp_path_factory.mktemp("cache")
    cache = wb.ActivationCache.open(wb.cache_activations(default_model, tokens, [sae.cfg.hook_name], folder, progress=False))
    index = wb.features.build_index(sae, cache, out_dir=folder / "index", model=default_model, progress=False)
    return default_model, sae, index


def test_what_fires_on_text_is_the_sae_code_of_the_model_activations(setup):
    model, sae, _ = setup
    text = "def add(a, b):\n    return a + b\n"
    data = prompt_features(model, sae, text, n=5)
    _, cache = model.run_with_cache(text, names_filter=[sae.cfg.hook_name])
    z = sae.encode(cache[sae.cfg.hook_name][0])
    assert data["tokens"] == model.to_str_tokens(text)
    for position, features in enumerate(data["features"]):
        expected = z[position].topk(5)
        assert [f for f, _ in features] == [int(i) for v, i in zip(*expected) if v > 0]


def test_steering_adds_alpha_times_the_decoder_row_and_moves_the_prediction(setup):
    model, sae, index = setup
    x = torch.randn(2, 5, sae.cfg.d_in)
    f = 11
    shifted = steering_hook(sae, f, alpha=3.0)(x)
    assert torch.allclose(shifted - x, 3.0 * sae.W_dec[f].expand_as(x), atol=1e-6)
    clamped = steering_hook(sae, f, clamp=0.0)(x).reshape(-1, sae.cfg.d_in)
    z = sae.encode(x.reshape(-1, sae.cfg.d_in))[:, f]
    assert torch.allclose(clamped - x.reshape(-1, sae.cfg.d_in), -z[:, None] * sae.W_dec[f], atol=1e-6)
    same = wb.steer(model, sae, f, "def main():\n    ", alpha=0.0, max_new_tokens=6)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.baseline == same.steered
    strong = wb.steer(model, sae, f, "def main():\n    ", alpha=8 * index.stats(f)["max"] + 8, max_new_tokens=6)
    assert strong.kl > 0.01
    with pytest.raises(ValueError, match="exactly one"):
        wb.steer(model, sae, f, "x", alpha=1.0, clamp=0.0)


def test_the_browser_prompt_view_and_steer_button(setup):
    model, sae, index = setup
    browser = FeatureBrowser(index, model, sae=sae)
    hostile = "s = '<script>alert(1)</script>'"
    browser.prompt_input.value = hostile  # as typing does
    texts = [t["text"] for t in browser.prompt_view.lines[0]["tokens"]]
    assert "".join(texts[1:]) == hostile  # every token present, as text (tokens.js sets textContent)
    feature = browser.prompt["features"][3][0][0]
    browser._on_msg(None, {"select_neuron": feature}, None)  # clicking a feature link of a token
    assert browser.data["feature"] == feature
    browser.steer_button.click()
    assert "KL(next token)" in browser.steering.value and "<script>" not in browser.steering.value
