"""Transcoders (Dunefsky et al. 2024): any architecture trained to predict one hook from another.

Synthetic ground truth: x = c·D_in + noise and y = c·D_out + b, one sparse code c behind
both, so a transcoder must read c from x and write it through D_out. A tiny random model
checks the one-pass cache of both hooks, and that splicing replaces the MLP's output by the
prediction from the MLP's input, exactly as a hand-written hook does.
"""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench as wb
from tests.helpers.streams import Interrupt, interrupted
from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench import synthetic
from workbench.cache import ActivationCache, cache_activations
from workbench.evals import downstream_metrics, reconstruction_metrics, spliced_loss
from workbench.sae import ARCHITECTURES, load, transcoder_hooks
from workbench.sae.compare import compare_saes
from workbench.trainer import TrainConfig, geometric_median, train_sae, train_saes

SMALL = synthetic.superposition(d=32, n_features=128, avg_active=3, seed=0)
D_OUT = synthetic.superposition(d=32, n_features=128, avg_active=3, seed=1).features  # another unit dictionary
OUT_BIAS = torch.linspace(-1, 1, 32)
SOURCE, TARGET = transcoder_hooks(0)
TRANSCODING = [a for a in ARCHITECTURES if a != "gradient"]  # the g-SAE selects with ∂L/∂x of its own input


def _pairs(batch_size: int, n_tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_tokens // batch_size):
        x, c = SMALL.sample(batch_size, generator)
        yield x, c @ D_OUT + OUT_BIAS


def _config(**kw):
    base = dict(architecture="topk", d_sae=128, k=4, batch_size=256, total_tokens=256 * 120, warmup_steps=10,
                log_every=10, hook_name=SOURCE, target_hook=TARGET)
    return TrainConfig(**{**base, **kw})


def _fvu(prediction, y):
    return float((prediction - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", TRANSCODING)
def test_every_architecture_learns_the_synthetic_map(arch):
    """y is predicted from x alone (a predictor that ignores x has FVU 1), and the decoder points
    at D_out, not at D_in, which it never sees. Transcoders learn more slowly than SAEs on this
    data (their encoder starts unrelated to their decoder): after these 120 steps the measured
    FVU is 0.35–0.58 and the MMCS with D_out 0.64–0.84 across architectures, against ~0.5 for
    a random dictionary (chance level for 128 unit vectors in 32 dimensions, as D_in scores)."""
    sae = train_sae(_config(architecture=arch), _pairs(256, 256 * 120, seed=1), progress=False)
    assert sae.is_transcoder and sae.cfg.target_hook == TARGET
    x, y = next(_pairs(2048, 2048, seed=9))
    with torch.no_grad():
        assert _fvu(sae(x).x_hat, y) < 0.65
    assert synthetic.mmcs(sae.W_dec.detach(), D_OUT) > 0.6
    assert synthetic.mmcs(sae.W_dec.detach(), D_OUT) > synthetic.mmcs(sae.W_dec.detach(), SMALL.features)
    metrics = reconstruction_metrics(sae, [next(_pairs(2048, 2048, seed=9))])
    with torch.no_grad():
        assert metrics.fvu == pytest.approx(_fvu(sae(x).x_hat, y), rel=1e-4)


@pytest.mark.parametrize("arch", TRANSCODING)
def test_the_input_is_centred_apart_from_b_dec_and_the_training_forward_matches(arch):
    """z = select((x − c) W_enc + b_enc) with c the fixed input_centre: b_dec is the output's bias
    and never touches the input (as SAELens' Transcoder); the sparse training forward gives the
    inference forward's code and prediction."""
    torch.manual_seed(0)
    sae = wb.sae.create(arch, d_in=32, d_sae=128, k=4, hook_name=SOURCE, target_hook=TARGET)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(32) * 3)
        sae.input_centre.copy_(torch.randn(32) * 0.1)
        sae.b_enc.copy_(torch.randn(128) * 0.1)
    x, _ = next(_pairs(64, 64, seed=3))
    torch.testing.assert_close(sae.pre_acts(x), (x - sae.input_centre) @ sae.W_enc + sae.b_enc)
    sae.eval()
    expected = sae(x)
    sae.train()
    if arch in ("batchtopk", "matryoshka", "featurechoice"):
        sae.eval()  # their training rule keeps the batch's top entries: compare at inference
    trained = sae.forward_train(x, observe=False)
    torch.testing.assert_close(trained.x_hat, expected.x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained.code.dense(128), expected.code.dense(128), atol=1e-5, rtol=1e-5)


def test_a_transcoder_saves_loads_and_resumes_exactly(tmp_path):
    cfg = _config(checkpoint_every=40, total_tokens=256 * 100)
    straight = train_sae(cfg, _pairs(256, 256 * 100, seed=1), run_dir=tmp_path / "a", progress=False)

    with pytest.raises(Interrupt):
        train_sae(cfg, interrupted(_pairs(256, 256 * 100, seed=1), 57), run_dir=tmp_path / "b", progress=False)
    resumed = train_sae(cfg, _pairs(256, 256 * 100, seed=1), run_dir=tmp_path / "b", progress=False)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    saved = load(tmp_path / "b" / "0-topk-k4-128")
    assert saved.is_transcoder and saved.cfg.target_hook == TARGET and saved.cfg.hook_name == SOURCE
    # the trainer centred the input on the first batch's geometric median (it is saved, and never trained)
    first_x, first_y = next(_pairs(256, 256, seed=1))
    torch.testing.assert_close(saved.input_centre, geometric_median(first_x))
    torch.testing.assert_close(straight.b_dec.detach(), resumed.b_dec.detach())
    assert "input_centre" not in dict(saved.named_parameters())
    x, _ = next(_pairs(64, 64, seed=4))
    assert torch.equal(saved(x).x_hat, resumed(x).x_hat)


def test_bad_transcoder_input_is_explained():
    with pytest.raises(ValueError, match="cannot be a transcoder"):
        _config(architecture="gradient")
    with pytest.raises(ValueError, match="both are"):
        _config(target_hook=SOURCE)
    with pytest.raises(ValueError, match="both are"):
        wb.sae.create("topk", d_in=8, d_sae=16, k=2, hook_name="a", target_hook="a")
    with pytest.raises(ValueError, match="a tensor holds one activation per row"):
        train_sae(_config(), torch.randn(1024, 32), progress=False)
    with pytest.raises(ValueError, match="is a single tensor: give \\(x, y\\) pairs"):
        train_sae(_config(), (x for x, _ in _pairs(256, 1024, seed=0)), progress=False)
    with pytest.raises(ValueError, match="y has shape"):
        train_sae(_config(), ((x, y[:, :16]) for x, y in _pairs(256, 1024, seed=0)), progress=False)
    with pytest.raises(ValueError, match="must share"):
        train_saes([_config(), _config(target_hook="")], _pairs(256, 1024, seed=0), progress=False)
    sae = wb.sae.create("topk", d_in=32, d_sae=64, k=4, hook_name=SOURCE, target_hook=TARGET)
    with pytest.raises(ValueError, match="scored on \\(x, y\\) batches"):
        reconstruction_metrics(sae, [torch.randn(8, 32)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model's layer-0 MLP input and output, cached in one pass, and a transcoder trained on them."""
    model, tokens = tiny_model(), tiny_tokens()
    path = tmp_path_factory.mktemp("cache")
    cache_activations(model, tokens, [SOURCE, TARGET, "blocks.0.hook_resid_post"], path, batch_size=8, progress=False)
    cache = ActivationCache.open(path)
    cfg = TrainConfig(d_sae=64, k=4, batch_size=64, hook_name=SOURCE, target_hook=TARGET, total_tokens=cache.n_tokens,
                      warmup_steps=2, log_every=2, device="cpu")
    return model, tokens, cache, train_sae(cfg, cache, progress=False)


def test_a_cache_of_both_hooks_gives_aligned_pairs(tiny):
    _, _, cache, _ = tiny
    x, y = next(iter(cache.batches(SOURCE, 32, seed=5, target_hook=TARGET)))
    rows = [i for i in range(cache.n_tokens)]
    everything_x, everything_y = cache.activations(SOURCE, rows), cache.activations(TARGET, rows)
    for i in range(x.shape[0]):  # each y row is the target of the x row beside it
        where = (everything_x == x[i]).all(1).nonzero().flatten()
        assert len(where) >= 1 and any(torch.equal(everything_y[w], y[i]) for w in where)
    with pytest.raises(ValueError, match="not both"):
        next(iter(cache.batches(SOURCE, 32, with_grads=True, target_hook=TARGET)))
    with pytest.raises(ValueError, match="cache both hooks in one pass"):
        train_sae(TrainConfig(d_sae=64, k=4, batch_size=64, hook_name=SOURCE, target_hook="blocks.1.hook_mlp_out"),
                  cache, progress=False)


@torch.no_grad()
def test_splicing_replaces_the_mlp_output_by_the_prediction_from_its_input(tiny):
    model, tokens, cache, sae = tiny
    tokens = tokens[:8]
    captured = {}

    def by_hand(act, hook):
        x = captured["x"].reshape(-1, 32)
        return sae(x).x_hat.reshape(act.shape)

    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[
        (SOURCE, lambda act, hook: captured.__setitem__("x", act)), (TARGET, by_hand)])
    assert spliced_loss(model, sae, tokens) == pytest.approx(float(loss), rel=1e-5)
    metrics = downstream_metrics(model, sae, tokens)
    assert metrics.ce_spliced == pytest.approx(float(loss), rel=1e-5)
    zero = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(TARGET, lambda act, hook: torch.zeros_like(act))])
    assert metrics.ce_zero_ablation == pytest.approx(float(zero), rel=1e-5)  # the MLP zero-ablated
    with pytest.raises(ValueError, match="cannot be spliced at"):
        spliced_loss(model, sae, tokens, hook="blocks.0.hook_resid_post")
    rows = compare_saes([sae], cache, model, tokens, n_batches=2, batch_size=64, progress=False)
    assert rows[0]["hook"] == f"{SOURCE} → {TARGET}" and rows[0]["ce_spliced"] == pytest.approx(metrics.ce_spliced)
    # the same two batches compare_saes scores: FVU of the target, predicted from the input
    batches = list(itertools.islice(cache.batches(SOURCE, 64, seed=999, target_hook=TARGET), 2))
    assert rows[0]["fvu"] == pytest.approx(reconstruction_metrics(sae, batches).fvu)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "topk"])
def test_sae_lens_transcoder_export_predicts_what_ours_does(arch, tmp_path):
    """ReLU and threshold transcoders export to SAELens' Transcoder / JumpReLUTranscoder (input
    centre folded into b_enc) with equal predictions; SAELens has no TopK transcoder: refused."""
    from sae_lens import SAE

    from workbench.sae.interop import export_sae_lens

    torch.manual_seed(0)
    sae = wb.sae.create(arch, d_in=32, d_sae=64, k=4, hook_name=SOURCE, target_hook=TARGET)
    with torch.no_grad():
        sae.input_centre.copy_(torch.randn(32) * 0.3)
        sae.b_dec.copy_(torch.randn(32))
        sae.b_enc.copy_(torch.randn(64) * 0.1)
        if arch == "jumprelu":
            sae.theta.copy_(torch.rand(64) * 0.5)
    sae.eval()
    if arch == "topk":
        with pytest.raises(ValueError, match="no topk transcoder"):
            export_sae_lens(sae, tmp_path / "x")
        return
    export_sae_lens(sae, tmp_path / "x")
    theirs = SAE.load_from_disk(str(tmp_path / "x"), device="cpu")
    assert theirs.cfg.architecture() == ("transcoder" if arch == "relu" else "jumprelu_transcoder")
    x, _ = next(_pairs(128, 128, seed=6))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), sae(x).x_hat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_a_sae_lens_transcoder_opens_as_the_same_transcoder(arch, tmp_path):
    """A SAELens transcoder folder (here: ours exported) opens as a transcoder with its output
    hook, predicting what SAELens' own object predicts; a skip transcoder and one without an
    output hook are refused with what to do."""
    from sae_lens import SAE

    from workbench.sae.interop import export_sae_lens

    torch.manual_seed(1)
    sae = wb.sae.create(arch, d_in=32, d_sae=64, k=4, hook_name=SOURCE, target_hook=TARGET)
    with torch.no_grad():
        sae.input_centre.copy_(torch.randn(32) * 0.3)
        sae.b_dec.copy_(torch.randn(32))
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # rows not unit-norm: opening folds the norms where it must
        if arch == "jumprelu":
            sae.theta.copy_(torch.rand(64) * 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.05)
    folder = export_sae_lens(sae.eval(), tmp_path / "tc")
    theirs = SAE.load_from_disk(str(folder), device="cpu")
    opened = load(folder)
    assert opened.is_transcoder and opened.cfg.target_hook == TARGET and opened.cfg.hook_name == SOURCE
    assert opened.architecture == arch
    x, _ = next(_pairs(128, 128, seed=7))
    with torch.no_grad():
        assert (sae.encode(x) > 0).float().mean(-1).mean() > 0.05  # some latents fire: the comparison means something
        torch.testing.assert_close(opened(x).x_hat, theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(opened(x).x_hat, sae(x).x_hat, atol=1e-5, rtol=1e-5)

    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["hook_name_out"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hook_name_out"):
        load(folder)
    cfg["architecture"] = "skip_transcoder" if arch == "relu" else "jumprelu_skip_transcoder"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({**load_file(str(folder / "sae_weights.safetensors")), "W_skip": torch.zeros(32, 32)},
              str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="W_skip"):
        load(folder)
