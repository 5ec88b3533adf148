"""Matryoshka SAEs absorb parent features less than TopK (Bussmann et al. 2025), on
synthetic hierarchical data with known parents and children."""

from workbench import synthetic
from workbench.trainer import TrainConfig, train_saes


def test_matryoshka_absorbs_less_than_topk():
    data = synthetic.hierarchical(seed=0)
    width = len(data.probabilities)
    configs = [TrainConfig(architecture=a, d_sae=width, k=4, total_tokens=800_000, batch_size=2048,
                           sae_kwargs={"prefixes": [16, 64, width]} if a == "matryoshka" else {})
               for a in ("topk", "matryoshka")]
    topk, matryoshka = train_saes(configs, data.batches(2048, 800_000, seed=1), progress=False)
    # Measured with these seeds: TopK 0.64, Matryoshka 0.16. Requiring half of TopK's
    # score leaves room for platform float differences while still failing if the
    # nested-prefix loss stopped working (then both sit near 0.5-0.65).
    assert synthetic.absorption_score(matryoshka, data) < 0.5 * synthetic.absorption_score(topk, data)
