"""Properties every SAE architecture must keep, on tiny random tensors."""

import pytest
import torch

from workbench import sae as saes

ARCHS = saes.ARCHITECTURES
D_IN, D_SAE, K, BATCH = 16, 64, 4, 32


def _make(arch, **cfg):
    torch.manual_seed(0)
    model = saes.create(arch, D_IN, D_SAE, K, **cfg)
    with torch.no_grad():  # a non-zero encoder bias so most pre-activations are positive
        model.b_enc.fill_(0.5)
    return model


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, D_IN, generator=generator), torch.randn(BATCH, D_IN, generator=generator)


def test_all_are_registered():
    assert set(ARCHS) == {"topk", "batchtopk", "matryoshka", "gradient", "hierarchical", "relu", "jumprelu",
                          "featurechoice"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("training", [True, False])
def test_decode_of_encode_is_forward(arch, training):
    sae = _make(arch)
    sae.train(training)
    x, g = _inputs()
    result = sae(x, g=g)
    z = sae.encode(x, g=g)
    torch.testing.assert_close(sae.decode(z), result.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.code.dense(D_SAE), z)


@pytest.mark.parametrize("arch", ["topk", "gradient", "hierarchical"])
def test_exactly_k_nonzeros_per_row(arch):
    sae = _make(arch)
    x, g = _inputs()
    assert ((sae.encode(x, g=g) != 0).sum(-1) == K).all()


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_keeps_k_times_batch_in_training(arch):
    sae = _make(arch).train()
    x, _ = _inputs()
    z = sae.encode(x)
    assert int((z != 0).sum()) == K * BATCH
    assert (z != 0).sum(-1).float().std() > 0  # the count varies per row
    assert float(sae.threshold) == 0  # encode is pure: only a training forward records θ
    sae(x)
    assert float(sae.threshold) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_matches_forward_with_its_gradients(arch):
    """The sparse training forward (exact values at the chosen latents, sparse backward)
    gives the same x̂, code and parameter gradients as the dense reference forward."""
    x, g = _inputs()
    results, grads = [], []
    for sparse in (False, True):
        sae = _make(arch).train()
        result = sae.forward_train(x, torch.float32, g=g) if sparse else sae(x, g=g)
        sae.reconstruction_loss(x, result).backward()
        results.append(result)
        # (JumpReLU's θ learns only through its estimator, which the reference forward lacks:
        # test_jumprelu_gradients_equal_sae_lens_straight_through_estimators checks it.)
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    dense, sparse = results
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.code.dense(D_SAE), dense.code.dense(D_SAE), rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_selection_changes_only_near_ties():
    """Choosing latents from bf16 pre-activations keeps the exact float32 values; where a
    latent differs from the float32 choice, its value is within bf16 rounding of the k-th."""
    sae = _make("topk").train()
    x, _ = _inputs()
    exact = sae.forward_train(x, torch.float32).code.dense(D_SAE)
    low = sae.forward_train(x, torch.bfloat16).code.dense(D_SAE)
    kth = exact.topk(K, dim=-1).values[:, -1:]
    differs = (exact > 0) != (low > 0)
    assert differs.float().mean() < 0.05
    swapped = torch.where(differs, sae.pre_acts(x), kth)
    torch.testing.assert_close(swapped, kth.expand_as(swapped), rtol=2**-6, atol=2**-6)
    same = (exact > 0) & (low > 0)
    torch.testing.assert_close(low[same], exact[same])  # float32 values, not bf16


def test_batchtopk_inference_is_a_threshold():
    sae = _make("batchtopk").train()
    x, _ = _inputs()
    sae(x)
    sae.eval()
    pre = sae.pre_acts(x)
    expected = pre * (pre > sae.threshold)
    torch.testing.assert_close(sae.encode(x), expected)
    with pytest.raises(ValueError, match="threshold"):  # θ has no k to override
        sae.encode(x, k=K + 1)


def test_gradient_selection_follows_the_score_and_keeps_values():
    sae = _make("gradient", beta=5.0)
    x, g = _inputs()
    pre = sae.pre_acts(x).relu()
    score = pre * (1 + 5.0 * (g @ sae.W_dec.T).abs())
    z = sae.encode(x, g=g)
    chosen = z != 0
    expected = torch.zeros_like(chosen).scatter(1, score.topk(K, dim=-1).indices, True)
    assert torch.equal(chosen, expected)
    torch.testing.assert_close(z[chosen], pre[chosen])  # values are z, not the score
    assert not torch.equal(chosen, torch.zeros_like(chosen).scatter(1, pre.topk(K, dim=-1).indices, True))


def test_hierarchical_budgets_are_prefixes_of_the_sorted_code():
    sae = _make("hierarchical")
    x, _ = _inputs()
    full = sae.encode_sparse(x)
    assert (full.values[:, :-1] >= full.values[:, 1:]).all()
    for j in (1, 2, 3):
        small = sae.encode(x, k=j)
        assert ((small != 0).sum(-1) == j).all()
        assert torch.equal(small, full.values[:, :j].new_zeros(BATCH, D_SAE).scatter(1, full.indices[:, :j], full.values[:, :j]))
    with pytest.raises(ValueError, match="budgets up to"):
        sae.encode(x, k=K + 1)


def test_hierarchical_loss_matches_explicit_budget_reconstructions():
    sae = _make("hierarchical")
    x, _ = _inputs()
    result = sae(x)
    explicit = torch.stack([(sae.decode(sae.encode(x, k=j)) - x).pow(2).sum(-1).mean() for j in range(1, K + 1)]).mean()
    torch.testing.assert_close(sae.reconstruction_loss(x, result), explicit)


def test_matryoshka_loss_sums_prefix_reconstructions():
    sae = _make("matryoshka", prefixes=[8, 32, 64])
    x, _ = _inputs()
    result = sae(x)
    z = result.code.dense(D_SAE)
    explicit = sum(((z[:, :m] @ sae.W_dec[:m] + sae.b_dec) - x).pow(2).sum(-1).mean() for m in (8, 32, 64))
    torch.testing.assert_close(sae.reconstruction_loss(x, result), explicit)
    # Each row's slots in another order (a code need not list latents ascending): the same loss.
    shuffled = torch.randperm(result.code.values.shape[1], generator=torch.Generator().manual_seed(0))
    code = saes.SparseCode(result.code.values[:, shuffled], result.code.indices[:, shuffled])
    torch.testing.assert_close(sae.reconstruction_loss(x, result._replace(code=code)), explicit)
    with pytest.raises(ValueError, match="must increase strictly and end at d_sae"):
        saes.create("matryoshka", D_IN, D_SAE, K, prefixes=[8, 32])


@pytest.mark.parametrize("weighting", ["sum", "mean"])
def test_matryoshka_loss_gradients_equal_the_explicit_prefix_losses(weighting):
    """The nested losses' hand-written backward (``_NestedLosses``) against autograd through
    one explicit decode per prefix, for the trainer's forward and for the plain one."""
    x, _ = _inputs()
    grads = []
    for form in ("explicit", "trainer", "forward"):
        sae = _make("matryoshka", prefixes=[8, 32, 64], level_weighting=weighting).train()
        if form == "explicit":
            z = sae(x).code.dense(D_SAE)
            losses = torch.stack([((z[:, :m] @ sae.W_dec[:m] + sae.b_dec) - x).pow(2).sum(-1).mean()
                                  for m in (8, 32, 64)])
            loss = losses.sum() if weighting == "sum" else losses.mean()
        else:
            result = sae.forward_train(x, torch.float32) if form == "trainer" else sae(x)
            assert (result.levels is not None) == (form == "trainer")
            loss = sae.reconstruction_loss(x, result)
        (3 * loss).backward()  # an upstream gradient other than 1
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    for other in grads[1:]:
        for name in ("W_dec", "b_dec", "W_enc", "b_enc"):
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_identical(arch, tmp_path):
    sae = _make(arch).train()
    x, g = _inputs()
    sae(x, g=g)  # sets the BatchTopK threshold, which must survive the round trip
    sae.eval()
    sae.save(tmp_path)
    loaded = saes.load(tmp_path).eval()
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded.encode(x, g=g), sae.encode(x, g=g))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("form", ["ours", "sae_lens"])
def test_a_loaded_sae_infers_per_row_and_evaluating_it_changes_nothing(arch, form, tmp_path):
    """``load`` gives the inference form: a row's code does not depend on the rows beside
    it (no batch top-k), and a forward pass leaves every parameter and buffer as it was
    (BatchTopK's θ is only recorded by training forwards)."""
    from workbench.sae.interop import export_sae_lens

    sae = _make(arch)
    if arch == "jumprelu":  # a trained θ, so the threshold rule keeps some latents but not all
        sae.set_threshold(torch.full((D_SAE,), 0.5))
    elif hasattr(sae, "threshold"):
        sae.threshold.fill_(0.5)
        sae.threshold_weight.fill_(1.0)
    sae.save(tmp_path) if form == "ours" else export_sae_lens(sae.eval(), tmp_path)
    loaded = saes.load(tmp_path)
    assert not loaded.training
    x, g = _inputs()
    context = {"g": g} if loaded.architecture == "gradient" else {}
    with torch.no_grad():
        together = loaded.encode(x, **context)
        alone = torch.cat([loaded.encode(x[i:i + 1], **{n: t[i:i + 1] for n, t in context.items()}) for i in range(BATCH)])
    assert 0 < int((together != 0).sum()) < together.numel()
    assert torch.equal(alone != 0, together != 0)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    before = {name: tensor.clone() for name, tensor in loaded.state_dict().items()}
    with torch.no_grad():
        loaded(x, **context)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_rows_start_unit_norm_and_folding_keeps_outputs(arch):
    sae = _make(arch).eval()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    x, g = _inputs()
    before = sae(x, g=g).x_hat
    sae.normalize_decoder()  # already unit norm: a no-op on outputs
    torch.testing.assert_close(sae(x, g=g).x_hat, before)


def test_bad_configs_are_explained():
    with pytest.raises(ValueError, match="exceeds d_sae"):
        saes.create("topk", 8, 4, 5)
    with pytest.raises(ValueError, match="unknown architecture 'rellu'.*Did you mean 'relu'"):
        saes.create("rellu", 8, 16, 2)
    with pytest.raises(ValueError, match="beta must be non-negative"):
        saes.create("gradient", 8, 16, 2, beta=-1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_round_trip_gives_identical_encodings(arch, tmp_path):
    from sae_lens import SAE

    from workbench.sae.interop import export_sae_lens

    sae = _make(arch).train()
    train_x, _ = _inputs()
    sae(train_x)  # threshold-based SAEs record their inference thresholds
    sae.eval()
    # Other rows than the training batch: a threshold equals one of its values exactly, and
    # SAELens sums the pre-activation in another order, so such ties could flip either way.
    x = torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(7))
    export_sae_lens(sae, tmp_path)
    theirs = SAE.load_from_disk(str(tmp_path), device="cpu")
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x).x_hat, rtol=1e-5, atol=1e-5)
    ours_again = saes.load(tmp_path)  # a SAELens folder opens through workbench.sae.load
    torch.testing.assert_close(ours_again.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,k", [(BATCH, K), (3, 40), (5, 1)])
def test_batch_top_k_equals_the_dense_batch_selection(rows, k):
    """The sparse batch top-k keeps exactly the k·B largest ReLU'd entries of the batch (the
    dense reference: flatten, top-k, scatter back), at their values, padding with zeros."""
    from workbench.sae.batchtopk import batch_top_k

    pre = torch.randn(rows, D_SAE, generator=torch.Generator().manual_seed(rows))
    flat = pre.relu().flatten()
    top = flat.topk(k * rows)
    expected = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
    code = batch_top_k(pre, k)
    assert torch.equal(code.dense(D_SAE), expected)
    assert code.values.shape[1] == int((expected > 0).sum(-1).max())
    real = code.values > 0
    for row in range(rows):  # each real latent once per row; padding only at value 0
        assert code.indices[row][real[row]].unique().numel() == int(real[row].sum())


def test_flat_top_k_is_exact_also_when_its_sampled_threshold_is_wrong():
    """The thresholded top-k equals torch's on random data, and on data built so the strided
    sample sees only large values (its threshold keeps too few: the full top-k runs)."""
    from workbench.sae.batchtopk import _flat_top_k

    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(1 << 20, generator=generator)
    sampled = torch.arange(0, 1 << 20, ((1 << 20) // 65_536) | 1)  # the positions its stride reads
    rigged = flat.clone().index_copy_(0, sampled, 100.0 + torch.arange(sampled.numel(), dtype=flat.dtype))
    # n/total 1/1000 and 1/64 (k·B of a BatchTopK at d_sae 2,048, k 32): margins 1.76 and 1.25.
    for data, n in ((flat, 1000), (rigged, 1000), (flat, 1 << 14), (rigged, 1 << 14)):
        values, indices = _flat_top_k(data, n)
        expected = data.topk(n)
        assert torch.equal(indices.sort().values, expected.indices.sort().values)
        assert torch.equal(data[indices], values)
        assert (indices.diff() > 0).all()  # positions ascending: a batch's entries come row-major


@pytest.mark.parametrize("target_l0", [None, 6.0])
def test_jumprelu_gradients_equal_sae_lens_straight_through_estimators(target_l0):
    """Our sparse JumpReLU step (estimator gradients from the kernel window only) gives the
    gradients of a dense reference built from SAELens' own JumpReLU and Step autograd
    functions (the paper's pseudo-derivatives), for every parameter, θ included."""
    from sae_lens.saes.jumprelu_sae import JumpReLU, Step

    bandwidth, lam = 0.4, 0.01  # a wide kernel, so many entries fall in its window
    x, _ = _inputs()
    sae = _make("jumprelu", bandwidth=bandwidth, l0_coefficient=lam, target_l0=target_l0, target_l0_coefficient=lam,
                sparsity_warmup=0.0).train()
    sae.set_threshold(torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) + 0.2)
    result = sae.forward_train(x, torch.float32)
    loss = sae.reconstruction_loss(x, result) + sae.sparsity_loss(x, result, torch.tensor(1.0), 1.0)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in sae.named_parameters()}
    assert int(sae._window[0].numel()) > 50  # the window is not empty: θ's gradient is really tested

    sae.zero_grad()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = JumpReLU.apply(pre, sae.threshold, bandwidth, False)
    l0 = Step.apply(pre, sae.threshold, bandwidth, False).sum(-1)
    penalty = 2 / target_l0 * (l0 - target_l0).pow(2) if target_l0 else l0
    reference = (z @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean() + lam * penalty.mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    reference.backward()
    for name, param in sae.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_relu_l1_penalty_is_weighted_by_decoder_norms_and_warms_up():
    sae = _make("relu", l1_coefficient=0.5, l1_warmup=0.1).train()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])  # the update leaves decoder norms free
    x, _ = _inputs()
    result = sae.forward_train(x, torch.float32)
    z = sae.encode(x)
    expected = (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
    scale = torch.tensor(2.0)
    torch.testing.assert_close(sae.sparsity_loss(x, result, scale, 1.0), 0.5 * expected / 2.0)
    torch.testing.assert_close(sae.sparsity_loss(x, result, scale, 0.05), 0.25 * expected / 2.0)  # half-way up


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_penalty_trained_saes_refuse_a_k(arch):
    sae = _make(arch).eval()
    x, _ = _inputs()
    with pytest.raises(ValueError, match="has no top-k"):
        sae.encode(x, k=2)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_sae_lens_standard_and_jumprelu_open_as_ours(arch, tmp_path):
    """A SAELens ``standard`` SAE opens as relu, a ``jumprelu`` one with per-latent thresholds
    and decoder rows of any norm as jumprelu (norms folded in), both encoding and
    reconstructing exactly as SAELens does."""
    from sae_lens import SAE

    from workbench.sae.interop import export_sae_lens

    sae = _make(arch).eval()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
    if arch == "jumprelu":
        sae.set_threshold(torch.rand(D_SAE, generator=torch.Generator().manual_seed(4)))
    export_sae_lens(sae, tmp_path)
    theirs = SAE.load_from_disk(str(tmp_path), device="cpu")
    ours = saes.load(tmp_path)
    assert ours.architecture == arch
    x, _ = _inputs()
    assert 0 < int((theirs.encode(x) != 0).sum()) < x.shape[0] * D_SAE
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.encode(x) != 0, theirs.encode(x) != 0)
    if arch == "jumprelu":
        torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(D_SAE))


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_dense_and_sparse_training_paths_agree(arch, monkeypatch):
    """A ragged training code goes through dense products when it is dense and through the
    sparse kernels otherwise: both give the same code, x̂ and gradients."""
    import workbench.sae.base as base

    x, _ = _inputs()
    results, grads = [], []
    for threshold in (0.0, 1.0):  # 0: always dense; 1: always sparse
        monkeypatch.setattr(base, "DENSE_TRAINING_ABOVE", threshold)
        sae = _make(arch).train()
        result = sae.forward_train(x, torch.float32)
        loss = sae.reconstruction_loss(x, result)
        penalty = sae.sparsity_loss(x, result, torch.tensor(1.0), 1.0)
        (loss + (penalty if penalty is not None else 0)).backward()
        results.append(result)
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    dense, sparse = results
    torch.testing.assert_close(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.code.dense(D_SAE), dense.code.dense(D_SAE), rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_encoder_is_scaled_to_the_best_fit_at_initialisation(arch):
    """prepare scales the encoder by the least-squares factor: the start reconstructs better
    than both the unscaled start and any other scale."""
    sae = _make(arch)
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(5)) * 3
    @torch.no_grad()
    def error(s):
        copy = _make(arch)
        copy.load_state_dict(sae.state_dict())
        copy.W_enc.mul_(s)
        return float((copy(x).x_hat - x).pow(2).sum())

    with torch.no_grad():
        sae.b_enc.zero_()
        before = error(1.0)
        sae.prepare(x, x)
        after = float((sae(x).x_hat - x).pow(2).sum())
    assert after < before
    if arch == "relu":  # (JumpReLU's θ makes the fit approximate: a rescaled row may cross it)
        assert after <= min(error(0.9), error(1.1))  # rescaling the prepared encoder only hurts


def test_feature_choice_gives_each_latent_its_top_m_rows_in_training():
    """In training every latent keeps exactly its m = ⌈k·B/d_sae⌉ largest positive entries
    over the batch (so no latent is dead), rows keep varying counts averaging k, and a
    training forward records per-latent thresholds that inference then applies."""
    sae = _make("featurechoice").train()
    x, _ = _inputs()
    pre = sae.pre_acts(x)
    z = sae.encode(x)
    m = -(-K * BATCH // D_SAE)
    expected = pre.relu().topk(m, dim=0).values.min(0).values  # each latent's m-th largest
    for latent in range(D_SAE):
        kept = z[:, latent][z[:, latent] != 0]
        assert kept.numel() == int((pre[:, latent].topk(m).values > 0).sum())
        if kept.numel() == m:
            torch.testing.assert_close(kept.min(), expected[latent])
    assert (z != 0).sum(-1).float().std() > 0
    assert float(sae.threshold.abs().sum()) == 0  # encode is pure
    sae(x)
    sae.eval()
    assert (sae.threshold > 0).any()
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))
