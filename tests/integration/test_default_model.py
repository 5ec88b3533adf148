"""The shipped zoo really learned, loads offline, and works through TransformerLens."""

import pytest
import torch

import workbench
from workbench.evals import model_loss

MIN_GAP_NATS = 2.0  # acceptance: validation loss at least 2 nats/token below unigram entropy


@pytest.mark.parametrize("name", ["stdlib-relu", "stdlib-gelu", "stdlib-swiglu"])
def test_model_card_records_a_real_gap(name):
    card = workbench.model_card(name)
    assert card.loss_below_unigram >= MIN_GAP_NATS
    assert card.tokens_seen >= 1_000_000 and card.train_time_s > 0
    assert len(card.corpus_train_sha256) == 64 and card.config["name"] == name


def test_default_model_card_reproduces_and_beats_unigram(default_model):
    card = workbench.model_card(workbench.DEFAULT_MODEL)
    # The card's own evaluation set: the plug-in unigram entropy is biased low on small
    # samples (4k tokens over a 4k vocabulary read ~0.7 nats low), so use all of it.
    val = workbench.load_tokens("stdlib", "val", n_tokens=card.config["eval_tokens"], seq_len=card.config["seq_len"])
    loss = model_loss(default_model, val)
    entropy = workbench.unigram_entropy(val[:, 1:], default_model.cfg.d_vocab)
    assert entropy - loss >= MIN_GAP_NATS, (loss, entropy)
    assert loss == pytest.approx(card.val_loss_nats, abs=1e-4)
    assert entropy == pytest.approx(card.val_unigram_entropy_nats, abs=1e-9)


def test_each_flavour_has_the_mlp_it_claims():
    relu, swiglu = workbench.load_model("stdlib-relu", "cpu"), workbench.load_model("stdlib-swiglu", "cpu")
    _, cache = relu.run_with_cache("x = 1\n", names_filter="blocks.0.mlp.hook_post")
    assert (cache["blocks.0.mlp.hook_post"] == 0).float().mean() > 0.3  # ReLU makes exact zeros
    assert swiglu.cfg.gated_mlp and swiglu.cfg.act_fn == "silu"
    assert hasattr(swiglu.blocks[0].mlp, "W_gate")


def test_transformer_lens_tokenization_round_trip(default_model):
    text = "for i in range(10):\n    print(i)\n"
    tokens = default_model.to_tokens(text)
    assert tokens[0, 0].item() == default_model.tokenizer.bos_token_id
    assert default_model.to_string(tokens[0, 1:]) == text
    assert default_model.to_str_tokens(text, prepend_bos=False)[0] == "for"


def test_model_predicts_python_syntax(default_model):
    report = workbench.prompt_report(default_model, "def add(a, b):\n    return a +")
    top_next = [tok for tok, _ in report.top_predictions[-1]]
    assert " b" in top_next
    assert report.tokens[0] == "<|endoftext|>" and len(report.losses) == len(report.tokens)


def test_prompt_report_html_escapes_token_text():
    report = workbench.PromptReport(
        text="<script>", tokens=["<bos>", "<script>"], losses=[float("nan"), 1.5],
        top_predictions=[[("<img src=x>", 0.9)], [("&", 0.5)]],
    )
    html = report._repr_html_()
    assert "<script>" not in html and "<img" not in html and "<bos>" not in html
    assert "&lt;script&gt;" in html and "&amp;" in html


def test_model_loads_on_requested_device_and_is_in_eval_mode(default_model):
    assert default_model.cfg.device in ("cpu", torch.device("cpu"))
    assert not default_model.training


def test_a_prompt_longer_than_the_context_is_refused_not_truncated(default_model):
    with pytest.raises(ValueError, match=f"reads at most {default_model.cfg.n_ctx}"):
        workbench.prompt_report(default_model, "x = 1\n" * 400)
