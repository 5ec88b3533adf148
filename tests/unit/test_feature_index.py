"""The feature index equals brute force on a small cache: densities, maxima, quantiles,
histograms, top-N contexts (rows, values, windows, per-token activations), quantile-bin
samples, decoder neighbours, correlations, co-occurrence and logit tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.tiny import tiny_model, tiny_tokens
from workbench.cache import ActivationCache, cache_activations
from workbench.features import FeatureIndex, build_index
from workbench.features.store import QUANTILES
from workbench.sae import create

HOOK = "blocks.0.hook_resid_post"
D_SAE, K, TOP_N = 48, 4, 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("cache")
    cache_activations(model, tiny_tokens(), [HOOK], folder, dtype="float32", batch_size=8, progress=False)
    cache = ActivationCache.open(folder)
    torch.manual_seed(0)
    sae = create("topk", d_in=32, d_sae=D_SAE, k=K, hook_name=HOOK)
    index = build_index(sae, cache, out_dir=tmp_path_factory.mktemp("index"), top_n=TOP_N, model=model, window=(3, 2),
                        n_bins=4, samples_per_bin=2, batch_size=100, progress=False)
    x = cache.activations(HOOK, range(cache.n_tokens))
    with torch.no_grad():
        z = sae.eval().encode(x)  # [n, d_sae], dense brute force
    return model, cache, sae, index, z


def test_density_max_mean_and_quantiles_equal_brute_force(setup):
    _, _, _, index, z = setup
    for f in range(D_SAE):
        nonzero = z[:, f][z[:, f] > 0]
        stats = index.stats(f)
        assert stats["count"] == nonzero.numel()
        assert index.density(f) == pytest.approx(nonzero.numel() / z.shape[0])
        if nonzero.numel() == 0:
            assert stats["max"] == 0
            continue
        assert stats["max"] == pytest.approx(float(nonzero.max()))
        assert stats["mean"] == pytest.approx(float(nonzero.mean()), rel=1e-5)
        expected = torch.quantile(nonzero.double(), torch.tensor(QUANTILES, dtype=torch.float64))
        got = [stats[f"q{q:g}"] for q in QUANTILES]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)


def test_histogram_counts_every_nonzero_activation_in_its_bin(setup):
    _, _, _, index, z = setup
    for f in range(D_SAE):
        nonzero = z[:, f][z[:, f] > 0]
        counts, edges = index.histogram(f)
        assert counts.sum() == nonzero.numel()
        if nonzero.numel():
            expected = np.clip((nonzero / nonzero.max() * counts.size).long().numpy(), 0, counts.size - 1)
            np.testing.assert_array_equal(counts, np.bincount(expected, minlength=counts.size))
            assert edges[-1] == pytest.approx(float(nonzero.max()))


def test_top_contexts_are_the_top_rows_with_their_windows_and_activations(setup):
    _, cache, _, index, z = setup
    tokens = cache.tokens.reshape(-1)
    checked = 0
    for f in range(D_SAE):
        column = z[:, f]
        fired = int((column > 0).sum())
        # Brute force order: activation descending, earlier row first among ties.
        order = sorted(range(z.shape[0]), key=lambda r: (-float(column[r]), r))[:min(TOP_N, fired)]
        top = index.top_contexts(f)
        assert [row for row, _, _ in top] == order
        for (row, value, ids), context in zip(top, index.contexts(f)):
            assert value == pytest.approx(float(column[row]))
            seq, pos = cache.position(row)
            lo, hi = max(0, pos - 3), min(cache.seq_len, pos + 3)
            start = seq * cache.seq_len
            assert ids == tokens[start + lo:start + hi].tolist()
            assert context.centre == pos - lo and context.tokens[context.centre] == int(tokens[row])
            np.testing.assert_allclose(context.acts, column[start + lo:start + hi].numpy(), rtol=1e-3, atol=1e-3)  # fp16
            checked += 1
    assert checked > D_SAE  # most features fire on several rows: the comparison is not vacuous


def test_quantile_bin_samples_come_from_their_bins(setup):
    _, _, _, index, z = setup
    sampled = 0
    for f in range(D_SAE):
        values = torch.sort(z[:, f][z[:, f] > 0]).values
        for context in index.contexts(f):
            if context.kind == "top":
                continue
            b = int(context.kind.split()[1])
            lo, hi = values[b * values.numel() // 4], values[(b + 1) * values.numel() // 4 - 1]  # bin b: ranks [bc/4, (b+1)c/4)
            assert float(lo) - 1e-6 <= context.activation <= float(hi) + 1e-6
            assert context.activation == pytest.approx(float(z[context.row, f]))
            sampled += 1
    assert sampled > D_SAE


def test_neighbours_are_the_nearest_decoder_directions(setup):
    _, _, sae, index, _ = setup
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cos = unit @ unit.T
    cos.fill_diagonal_(-2)
    for f in range(D_SAE):
        got = index.neighbours(f)
        expected = cos[f].topk(len(got)).values
        np.testing.assert_allclose([c for _, c in got], expected.numpy(), rtol=1e-5, atol=1e-6)
        assert f not in [j for j, _ in got]


def test_correlations_and_cooccurrence_equal_brute_force(setup):
    _, _, _, index, z = setup
    zd = z.double()
    pearson = torch.corrcoef(zd.T)
    fired = (z > 0).double()
    both = fired.T @ fired
    jaccard = both / (fired.sum(0)[:, None] + fired.sum(0)[None, :] - both)
    for f in range(D_SAE):
        if not (z[:, f] > 0).any():
            continue
        for j, r in index.correlated(f):
            assert r == pytest.approx(float(pearson[f, j]), abs=1e-5)
        got = [r for _, r in index.correlated(f)]
        others = torch.nan_to_num(pearson[f].clone(), nan=-np.inf)
        others[f] = -np.inf
        np.testing.assert_allclose(got, others.topk(len(got)).values.numpy(), atol=1e-5)
        for j, s in index.cooccurring(f):
            assert s == pytest.approx(float(jaccard[f, j]), abs=1e-6)


def test_logit_tokens_are_the_decoder_direction_through_the_unembedding(setup):
    model, _, sae, index, _ = setup
    effect = sae.W_dec.detach() @ (model.W_U.detach() * model.ln_final.w.detach()[:, None])
    for f in (0, 7, D_SAE - 1):
        logits = index.logit_tokens(f)
        assert [t for t, _ in logits["top"]] == effect[f].topk(10).indices.tolist()
        assert [t for t, _ in logits["bottom"]] == effect[f].topk(10, largest=False).indices.tolist()
        assert logits["histogram"].sum() == model.cfg.d_vocab


def test_reopening_is_the_same_index_and_a_rebuild_is_skipped(setup):
    _, cache, sae, index, _ = setup
    again = FeatureIndex.open(index.path)
    assert again.top_contexts(3) == index.top_contexts(3)
    mtime = (index.path / "index.json").stat().st_mtime_ns
    rebuilt = build_index(sae, cache, out_dir=index.path, top_n=TOP_N, model=setup[0], window=(3, 2), n_bins=4,
                          samples_per_bin=2, batch_size=100, progress=False)
    assert (rebuilt.path / "index.json").stat().st_mtime_ns == mtime


def test_bad_inputs_say_what_to_do(setup, tmp_path):
    _, cache, sae, index, _ = setup
    with pytest.raises(ValueError, match="integer in"):
        index.density(D_SAE)
    with pytest.raises(FileNotFoundError, match="build_index"):
        FeatureIndex.open(tmp_path)
    with pytest.raises(ValueError, match="not in the cache"):
        build_index(sae, cache, hook="blocks.9.hook_resid_post", out_dir=tmp_path, progress=False)
    with pytest.raises(TypeError, match="ActivationCache"):
        build_index(sae, torch.zeros(4, 32), out_dir=tmp_path, progress=False)


def test_token_ids_with_a_model_are_cached_first_and_give_the_same_index(setup, tmp_path, monkeypatch):
    model, cache, sae, index, _ = setup
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))
    again = build_index(sae, cache.tokens, out_dir=tmp_path / "index", top_n=TOP_N, model=model, window=(3, 2), n_bins=4,
                        samples_per_bin=2, batch_size=100, progress=False)
    # float16 cache (the default) against the float32 one: rankings agree up to near-ties.
    same = sum([r for r, _, _ in again.top_contexts(f)[:2]] == [r for r, _, _ in index.top_contexts(f)[:2]]
               for f in range(D_SAE))
    assert same >= 0.9 * D_SAE and any((tmp_path / "data" / "cache" / "features").iterdir())


def test_a_sae_lens_folder_indexes_like_ours(setup, tmp_path):
    from workbench.sae import load
    from workbench.sae.interop import export_sae_lens

    _, cache, sae, index, _ = setup
    theirs = load(export_sae_lens(sae, tmp_path / "sae-lens"))
    other = build_index(theirs, cache, out_dir=tmp_path / "index", top_n=TOP_N, window=(3, 2), n_bins=4, samples_per_bin=2,
                        batch_size=100, progress=False)
    for f in range(D_SAE):
        assert other.top_contexts(f) == index.top_contexts(f)
        assert other.density(f) == index.density(f)
