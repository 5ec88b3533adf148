"""Inputs the workbench must refuse with a sentence (not a raw error deep inside), stale
token caches, and SAELens config fields that change the encoding.

The bad-input table at the end lists every malformed input with the exception type and a
fragment of the message that says what was wrong.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench import data
from workbench import sae as saes
from workbench.evals import downstream_metrics, hook_gradients, spliced_loss
from workbench.sae.compare import compare_saes
from workbench.sparsity.cett import activation_ratio, cett, cett_curve, cett_threshold

D_IN, D_SAE, K = 16, 64, 4
RESID = "blocks.0.hook_resid_post"  # width 32 in the tiny model
HOOK_Z = "blocks.0.attn.hook_z"  # [.., 4 heads, 8]


# --- 12. token caches follow the corpus' content ----------------------------------------------


@pytest.fixture()
def token_cache(tmp_path, monkeypatch):
    """load_tokens with its cache in a temporary folder (not the shared data/cache)."""
    monkeypatch.setattr(data, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path / "cache" / "tokens"


def _corpus(tmp_path, word: str):
    path = tmp_path / "corpus.txt"
    path.write_text(f"{word} = 1\n" * 600)
    return path


def test_editing_a_local_corpus_gives_its_new_tokens(tmp_path, token_cache):
    path = _corpus(tmp_path, "alpha")
    before = data.load_tokens(str(path), "train", n_tokens=64, seq_len=32)
    _corpus(tmp_path, "gamma")
    after = data.load_tokens(str(path), "train", n_tokens=64, seq_len=32)
    assert not torch.equal(before, after)
    fresh = data._encode_stream(str(path), "train", None)[0]
    assert torch.equal(after[:, 1:].reshape(-1), torch.from_numpy(fresh[:62].astype("int64")))
    assert len(list(token_cache.glob("*.npy"))) == 1  # the stale stream was removed


def test_an_edit_that_keeps_size_and_mtime_still_counts(tmp_path, token_cache):
    """The key hashes content: an edit of the same length with the mtime put back (cp -p, a
    restored backup) is still seen."""
    path = _corpus(tmp_path, "alpha")
    stat = path.stat()
    before = data.load_tokens(str(path), "train", n_tokens=64, seq_len=32)
    _corpus(tmp_path, "gamma")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert not torch.equal(before, data.load_tokens(str(path), "train", n_tokens=64, seq_len=32))


def test_an_unchanged_corpus_reuses_its_cache(tmp_path, token_cache):
    path = _corpus(tmp_path, "alpha")
    first, _ = data.token_stream(str(path), "train")
    again, _ = data.token_stream(str(path), "train")
    assert again.filename == first.filename


# --- 14. SAELens config fields that change the encoding ---------------------------------------


def _sae_lens(arch: str, hook: str = RESID, d_in: int = D_IN, **fields):
    """A SAELens SAE (sae_lens' own classes) with random weights: decoder rows of unequal
    norm (so rescaling by them matters), nonzero biases, one shared JumpReLU threshold."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    common = dict(d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=hook), **fields)
    theirs = TopKSAE(TopKSAEConfig(k=K, **common)) if arch == "topk" else JumpReLUSAE(JumpReLUSAEConfig(**common))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.3 if name != "W_dec" else 1.0))
        theirs.W_dec.mul_(torch.rand(D_SAE, 1, generator=generator) + 0.5)
        if arch == "jumprelu":
            theirs.threshold.fill_(0.2)
    return theirs


def _inputs(shape=(64, D_IN)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """float32, relative to the tensor's scale: 1e-5 is ~100 ulp, room for the reordered sums
    and folded products of a few dozen terms; a field that is ignored differs at O(1)."""
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


def _compare(theirs, ours, x, scale_in=lambda x: x, scale_out=lambda x: x) -> None:
    """Encodings, decodings and reconstructions of ours equal SAELens' on ``x`` (SAELens' SAE
    fed scale_in(x), its output mapped back by scale_out, as its trainer's ActivationScaler)."""
    with torch.no_grad():
        z = theirs.encode(scale_in(x))
        x_hat = scale_out(theirs.decode(z))  # decode right after encode: SAELens keeps the norm stats
        mine = ours.encode(x)
        assert torch.equal(mine != 0, z != 0)  # the same latents fire
        assert 0 < int((z != 0).sum()) < z.numel()
        _close(mine, z)
        _close(ours(x).x_hat, x_hat)
        _close(ours.decode(mine, x=x), x_hat)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
@pytest.mark.parametrize("field", [
    dict(normalize_activations="layer_norm"),
    dict(normalize_activations="constant_norm_rescale"),
    dict(apply_b_dec_to_input=False),
    dict(apply_b_dec_to_input=False, normalize_activations="layer_norm"),
], ids=lambda f: "+".join(f"{k}={v}" for k, v in f.items()))
def test_sae_lens_fields_encode_as_in_sae_lens(arch, field, tmp_path):
    theirs = _sae_lens(arch, **field)
    theirs.save_model(tmp_path)
    ours = saes.load(tmp_path)
    assert ours.cfg.normalize_activations == field.get("normalize_activations", "none")
    _compare(theirs, ours, _inputs())


def test_rescale_acts_by_decoder_norm_encodes_as_in_sae_lens(tmp_path):
    theirs = _sae_lens("topk", rescale_acts_by_decoder_norm=True)
    theirs.save_model(tmp_path)
    _compare(theirs, saes.load(tmp_path), _inputs())


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_hook_z_inputs_are_flattened_heads_as_in_sae_lens(arch, tmp_path):
    theirs = _sae_lens(arch, hook=HOOK_Z, reshape_activations="hook_z")
    theirs.save_model(tmp_path)
    ours = saes.load(tmp_path)
    heads = _inputs((64, 4, D_IN // 4))  # [batch, n_heads, d_head]
    _compare(theirs, ours, heads)
    assert ours(heads).x_hat.shape == heads.shape
    torch.testing.assert_close(ours.encode(heads.flatten(1)), ours.encode(heads))  # flat rows too


@pytest.mark.parametrize("rescale", [False, True])
def test_expected_average_only_in_folds_the_saved_scaling_factor(rescale, tmp_path):
    from sae_lens.training.activation_scaler import ActivationScaler

    theirs = _sae_lens("topk", normalize_activations="expected_average_only_in", rescale_acts_by_decoder_norm=rescale)
    theirs.save_model(tmp_path)
    scaler = ActivationScaler(scaling_factor=0.37)  # as a SAELens checkpoint leaves it beside the weights
    scaler.save(str(tmp_path / "activation_scaler.json"))
    _compare(theirs, saes.load(tmp_path), _inputs(), scaler.scale, scaler.unscale)


def test_covariance_whitening_folds_the_saved_statistics(tmp_path):
    from sae_lens.training.activation_scaler import ActivationScaler

    theirs = _sae_lens("topk", normalize_activations="covariance_whitening", rescale_acts_by_decoder_norm=True)
    theirs.save_model(tmp_path)
    mixing = torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(3))
    batches = iter([_inputs((256, D_IN)) @ mixing for _ in range(4)])
    scaler = ActivationScaler()
    scaler.estimate_whitening(D_IN, batches, n_batches_for_norm_estimate=4)  # SAELens' own estimate
    scaler.save(str(tmp_path / "activation_scaler.json"))
    scaler.whitening.mean, scaler.whitening.matrix, scaler.whitening.inverse_matrix = (
        t.float() for t in (scaler.whitening.mean, scaler.whitening.matrix, scaler.whitening.inverse_matrix))
    _compare(theirs, saes.load(tmp_path), _inputs() @ mixing, scaler.scale, scaler.unscale)


@pytest.mark.parametrize("field", ["layer_norm", "hook_z"])
def test_normalized_saes_export_back_to_sae_lens(field, tmp_path):
    from sae_lens import SAE

    from workbench.sae.interop import export_sae_lens

    theirs = _sae_lens("topk", hook=HOOK_Z, **({"normalize_activations": field} if field != "hook_z" else
                                                  {"reshape_activations": "hook_z"}))
    theirs.save_model(tmp_path / "a")
    ours = saes.load(tmp_path / "a")
    export_sae_lens(ours, tmp_path / "b")
    x = _inputs((64, 4, D_IN // 4)) if field == "hook_z" else _inputs()
    _compare(SAE.load_from_disk(str(tmp_path / "b")), ours, x)


# --- the bad-input table (items 13, 15 and what was found around them) ------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One tiny model, tokens, SAEs and SAE folders shared by the table's rows (each row only
    reads them)."""
    root = tmp_path_factory.mktemp("bad")
    model, tokens = tiny_model(), tiny_tokens(n_seq=4, seq_len=8)
    wide = saes.create("topk", 64, 128, 4, hook_name=RESID)  # d_in 64 ≠ 32
    typo = saes.create("topk", 32, 64, 4, hook_name="blocks.0.hook_resid_pots")
    good = saes.create("topk", 32, 64, 4, hook_name=RESID)

    def folder(name, make):
        path = root / name
        path.mkdir()
        make(path)
        return path

    def ours(edit=None, drop_weights=False):
        def make(path):
            good.save(path)
            if edit:
                cfg = json.loads((path / "cfg.json").read_text())
                edit(cfg)
                (path / "cfg.json").write_text(json.dumps(cfg))
            if drop_weights:
                (path / "sae.safetensors").unlink()
        return make

    def sae_lens(edit=None, **fields):
        def make(path):
            _sae_lens("topk", **fields).save_model(path)
            if edit:
                cfg = json.loads((path / "cfg.json").read_text())
                edit(cfg)
                (path / "cfg.json").write_text(json.dumps(cfg))
        return make

    def gated(path):
        from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

        GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)).save_model(path)

    folders = dict(
        no_weights=folder("no_weights", ours(drop_weights=True)),
        arch_typo=folder("arch_typo", ours(lambda c: c.update(architecture="topkk"))),
        field_typo=folder("field_typo", ours(lambda c: c.update(hook=c.pop("hook_name")))),
        bad_json=folder("bad_json", lambda p: (ours()(p), (p / "cfg.json").write_text("{d_in: 32"))),
        wrong_shape=folder("wrong_shape", ours(lambda c: c.update(d_in=16))),
        no_cfg=folder("no_cfg", lambda p: None),
        sae_lens_arch_typo=folder("sae_lens_arch_typo", sae_lens(lambda c: c.update(architecture="jumprelux"))),
        unscaled=folder("unscaled", sae_lens(normalize_activations="expected_average_only_in")),
        gated=folder("gated", gated),
        head_index=folder("head_index", sae_lens(lambda c: c["metadata"].update(hook_head_index=2), hook=HOOK_Z)),
    )
    cache = SimpleNamespace(hooks=[RESID], d=lambda hook: 32, batches=None)  # compare_saes checks before reading
    return SimpleNamespace(model=model, tokens=tokens, wide=wide, typo=typo, good=good, folders=folders, cache=cache)


def _normalizing():
    return saes.create("topk", D_IN, D_SAE, K, normalize_activations="layer_norm")


BAD_INPUTS = [
    # 15. SAE shapes: positive integers, k ≤ d_sae, known names
    ("create k=2.5", lambda e: saes.create("topk", 8, 16, 2.5), ValueError, "k must be a positive integer, got 2.5"),
    ("create k=0", lambda e: saes.create("topk", 8, 16, 0), ValueError, "k must be a positive integer"),
    ("create k=True", lambda e: saes.create("topk", 8, 16, True), ValueError, "k must be a positive integer"),
    ("create d_sae=16.0", lambda e: saes.create("topk", 8, 16.0, 2), ValueError, "d_sae must be a positive integer"),
    ("create d_in='8'", lambda e: saes.create("topk", "8", 16, 2), ValueError, "d_in must be a positive integer"),
    ("create d_in=-8", lambda e: saes.create("topk", -8, 16, 2), ValueError, "d_in must be a positive integer"),
    ("create k > d_sae", lambda e: saes.create("topk", 8, 4, 5), ValueError, "exceeds d_sae"),
    ("create architecture typo", lambda e: saes.create("topkk", 8, 16, 2), ValueError, "Did you mean 'topk'"),
    ("create field typo", lambda e: saes.create("topk", 8, 16, 2, hook="x"), ValueError, "Did you mean 'hook_name'"),
    ("create hook_name=None", lambda e: saes.create("topk", 8, 16, 2, hook_name=None), ValueError, "hook_name must be a string"),
    ("create normalize typo", lambda e: saes.create("topk", 8, 16, 2, normalize_activations="layernorm"), ValueError,
     "normalize_activations must be one of"),
    ("create hook_z reshape elsewhere", lambda e: saes.create("topk", 8, 16, 2, hook_name=RESID, reshape_activations="hook_z"),
     ValueError, "for an attention layer's hook_z"),
    # 15. activations of the wrong width reach an SAE
    ("encode wrong width", lambda e: e.good.encode(torch.randn(4, 7)), ValueError, "d_in=32 activations (blocks.0"),
    ("forward one vector", lambda e: e.good(torch.randn(32)), ValueError, "v[None]"),
    ("encode k=0", lambda e: e.good.encode(torch.randn(2, 32), k=0), ValueError, "k must be a positive integer"),
    ("encode k=2.5", lambda e: e.good.encode(torch.randn(2, 32), k=2.5), ValueError, "k must be a positive integer"),
    ("encode k > d_sae", lambda e: e.good.encode(torch.randn(2, 32), k=65), ValueError, "at most d_sae=64"),
    ("gradient SAE g of another shape", lambda e: saes.create("gradient", 32, 64, 4)(torch.randn(2, 32), g=torch.randn(2, 31)),
     ValueError, "must have the shape of x (2, 32)"),
    ("encode a list", lambda e: e.good.encode([[0.0] * 32]), TypeError, "must be a torch.Tensor"),
    ("decode needs x", lambda e: _normalizing().decode(torch.zeros(2, D_SAE)), ValueError, "decode(z, x=x)"),
    ("train a normalizing SAE", lambda e: _normalizing().forward_train(torch.randn(2, D_IN)), NotImplementedError,
     "not supported"),
    # 13. folders that are not (complete) SAEs
    ("load no weights", lambda e: saes.load(e.folders["no_weights"]), FileNotFoundError,
     "expected sae.safetensors (a workbench SAE) or sae_weights.safetensors"),
    ("load architecture typo", lambda e: saes.load(e.folders["arch_typo"]), ValueError, "Did you mean 'topk'"),
    ("load cfg field typo", lambda e: saes.load(e.folders["field_typo"]), ValueError, "Did you mean 'hook_name'"),
    ("load bad json", lambda e: saes.load(e.folders["bad_json"]), ValueError, "is not valid JSON"),
    ("load weights of another shape", lambda e: saes.load(e.folders["wrong_shape"]), ValueError,
     "does not match"),
    ("load no cfg.json", lambda e: saes.load(e.folders["no_cfg"]), FileNotFoundError, "has no cfg.json"),
    ("load not a folder", lambda e: saes.load(e.folders["no_cfg"] / "nothing"), FileNotFoundError, "is not a folder"),
    ("load SAELens architecture typo", lambda e: saes.load(e.folders["sae_lens_arch_typo"]), ValueError,
     "Did you mean 'jumprelu'"),
    # 14. SAELens fields that cannot be honoured are refused, not ignored
    ("load SAELens unscaled expected_average_only_in", lambda e: saes.load(e.folders["unscaled"]), ValueError,
     "holds no activation_scaler.json with the scaling factor"),
    ("load SAELens gated", lambda e: saes.load(e.folders["gated"]), ValueError,
     "architecture 'gated' has no workbench equivalent"),
    ("load SAELens hook_head_index", lambda e: saes.load(e.folders["head_index"]), ValueError, "hook_head_index=2"),
    # 15. an SAE hooked into a model at a hook that does not fit it
    ("downstream d_in mismatch", lambda e: downstream_metrics(e.model, e.wide, e.tokens), ValueError,
     "carries 32 per position"),
    ("spliced_loss d_in mismatch", lambda e: spliced_loss(e.model, e.wide, e.tokens), ValueError,
     "reads d_in=64 activations"),
    ("downstream hook typo", lambda e: downstream_metrics(e.model, e.typo, e.tokens), ValueError,
     "Did you mean 'blocks.0.hook_resid_post'"),
    ("spliced_loss hook typo", lambda e: spliced_loss(e.model, e.typo, e.tokens), ValueError,
     "Did you mean 'blocks.0.hook_resid_post'"),
    ("hook_gradients hook typo", lambda e: hook_gradients(e.model, e.tokens, "blocks.0.hook_resid_pots"), ValueError,
     "Did you mean 'blocks.0.hook_resid_post'"),
    ("downstream no hook", lambda e: downstream_metrics(e.model, saes.create("topk", 32, 64, 4), e.tokens),
     ValueError, "no hook_name recorded"),
    ("downstream tokens out of vocab", lambda e: downstream_metrics(e.model, e.good, e.tokens + 64), ValueError,
     "d_vocab=64"),
    ("downstream float tokens", lambda e: downstream_metrics(e.model, e.good, e.tokens.float()), ValueError,
     "integer tensor"),
    ("downstream empty tokens", lambda e: downstream_metrics(e.model, e.good, e.tokens[:0]), ValueError,
     "n_seq >= 1"),
    ("spliced_loss batch_size=0", lambda e: spliced_loss(e.model, e.good, e.tokens, batch_size=0), ValueError,
     "batch_size must be a positive integer"),
    ("compare_saes hook not cached", lambda e: compare_saes([e.typo], e.cache, progress=False), ValueError,
     "Did you mean 'blocks.0.hook_resid_post'"),
    ("compare_saes width", lambda e: compare_saes([e.wide], e.cache, progress=False), ValueError,
     "the cache holds 32"),
    ("compare_saes model without tokens", lambda e: compare_saes([e.good], e.cache, model=e.model, progress=False),
     ValueError, "pass both model and tokens"),
    ("compare_saes checks the splice", lambda e: compare_saes([e.good], e.cache, e.model, e.tokens + 64, progress=False),
     ValueError, "d_vocab"),
    # 15. CETT on nothing
    ("cett empty", lambda e: cett(torch.zeros(0, 8), torch.randn(8, 4), 0.1), ValueError, "is empty"),
    ("cett_threshold empty", lambda e: cett_threshold(torch.zeros(0, 8), torch.randn(8, 4), 0.1), ValueError,
     "is empty"),
    ("cett_curve empty", lambda e: cett_curve(torch.zeros(0, 8), torch.randn(8, 4), torch.tensor([0.1])), ValueError,
     "is empty"),
    ("cett_curve shapes", lambda e: cett_curve(torch.zeros(3, 8), torch.randn(7, 4), torch.tensor([0.1])), ValueError,
     "need x1 [tokens, d_mlp]"),
    ("cett no neurons", lambda e: cett(torch.zeros(3, 0), torch.randn(0, 4), 0.1), ValueError, "is empty"),
    ("cett NaN threshold", lambda e: cett(torch.ones(3, 8), torch.randn(8, 4), float("nan")), ValueError,
     "threshold is NaN"),
    ("cett chunk_tokens=0", lambda e: cett(torch.ones(3, 8), torch.randn(8, 4), 0.1, chunk_tokens=0), ValueError,
     "chunk_tokens must be a positive integer"),
    ("cett_threshold rtol=0", lambda e: cett_threshold(torch.ones(3, 8), torch.randn(8, 4), 0.1, rtol=0), ValueError,
     "rtol > 0"),
    ("activation_ratio empty", lambda e: activation_ratio(torch.zeros(0, 8), torch.randn(8, 4), 0.1), ValueError,
     "is empty"),
    # 12's neighbours: token counts that are not integers
    ("load_tokens seq_len=32.0", lambda e: data.load_tokens("stdlib", "val", n_tokens=64, seq_len=32.0), ValueError,
     "seq_len must be an integer"),
    ("load_tokens n_tokens=64.5", lambda e: data.load_tokens("stdlib", "val", n_tokens=64.5), ValueError,
     "n_tokens must be an integer"),
]


@pytest.mark.parametrize("call, error, fragment", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_refused_with_a_sentence(env, call, error, fragment):
    with pytest.raises(error) as caught:
        call(env)
    assert fragment in str(caught.value), str(caught.value)


def test_a_fitting_sae_still_splices(env):
    """The checks let the right SAE through (and the tiny model's hook_z SAE, read as heads)."""
    loss = spliced_loss(env.model, env.good, env.tokens)
    assert loss > 0
    heads = saes.create("topk", 32, 64, 4, hook_name=HOOK_Z, reshape_activations="hook_z")
    assert spliced_loss(env.model, heads, env.tokens) > 0
