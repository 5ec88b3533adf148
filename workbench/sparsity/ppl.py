"""PPL-p% sparsity (Luo et al. 2024, "Sparsing Law", §3.1; CETT from Zhang et al. 2024).

Fitted on one token set, reported on another. The thresholds and the search for c use the
*calibration* tokens; the perplexity ratio and activation ratio reported are measured once,
at the c found, on disjoint *evaluation* tokens (with a bootstrap interval over sequences),
next to the ratio on the search set (≈ 1 + p by construction).

One global CETT c sets every layer's threshold: ε_ℓ(c) is the layer threshold whose CETT
on dense activations is c (read off each layer's CETT curve, computed once on a grid of
thresholds with ``cett_curve`` and interpolated, rather than a bisection per c), and the entries with ‖n_i‖ < ε_ℓ are zeroed
in all layers at once. c is searched so that the perplexity ratio of the sparsified model
to the dense one is 1 + p; the activation ratio (the fraction of x1 entries left nonzero)
at that c is the model's PPL-p% activation ratio.

Cost. The thresholds come from cached dense activations (no forward pass). Only the
perplexity needs the model, and one pass over the search tokens scores several
settings at once: the batch is repeated once per setting, each copy masked with its own
thresholds, so the dense reference and three candidates share one pass. The candidates
are placed by interpolating the loss gap inside the bracket found so far (regula falsi on
log-perplexity), which converges in a few passes; ``PPLSearch`` keeps every evaluated c,
so solving for p = 1%, 5% and 10% reuses the passes made for each other.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from ..data import check_disjoint
from ..evals import bootstrap_ratio_ci
from .cett import cett_curve, neuron_magnitudes
from .mlp import describe_mlps
from .sources import ModelSource

DEFAULT_THRESHOLD_TOKENS = 4096  # calibration tokens whose dense activations give the CETT curves
GRID_POINTS = 64  # thresholds per layer at which CETT is computed once; ε(c) interpolates between them
DEFAULT_TOLERANCE = 5e-4  # |ratio − (1 + p)| accepted: a quarter of the ±0.2 pp the method is held to


@dataclass
class Evaluation:
    """One setting scored on a token set."""

    cett: float
    loss: float  # mean next-token loss (nats)
    layer_activation_ratio: list[float]
    sequence_losses: Tensor | None = None  # [n_seq] summed losses, for bootstrap intervals


@dataclass
class PPLSparsity:
    """The result for one p: the CETT found on the calibration tokens, and what it does.

    From ``ppl_p_sparsity`` (or ``PPLSearch.score``) every ratio is measured on the held-out
    evaluation tokens (``held_out`` True); from ``PPLSearch.solve`` alone, on the search set."""

    p: float
    cett: float
    ppl_ratio: float
    activation_ratio: float
    """Overall fraction of x1 entries left nonzero (all layers, all scored tokens)."""
    layer_activation_ratio: list[float]
    layer_thresholds: list[float]
    """ε_ℓ: the magnitude threshold ‖n_i‖ < ε_ℓ drops neuron i (ε_ℓ/‖W_out[:, i]‖ on |x1_i|)."""
    dense_loss: float
    sparse_loss: float
    passes: int
    """Forward passes over the search tokens so far (shared by every p solved by one search)."""
    settings_evaluated: int
    seconds: float
    dense_activation_ratio: list[float] = field(default_factory=list)
    """Per layer, the fraction of x1 entries nonzero in the dense model (ReLU zeros)."""
    search_ppl_ratio: float = math.nan
    """The perplexity ratio on the calibration tokens the search ran on (≈ 1 + p by construction)."""
    ppl_ratio_ci: tuple[float, float] = (math.nan, math.nan)
    """95% bootstrap interval of ``ppl_ratio`` over evaluation sequences (NaN on the search set)."""
    held_out: bool = False
    n_calibration_tokens: int = 0
    n_eval_tokens: int = 0

    def table(self) -> list[dict]:
        return [{"layer": layer, "threshold": eps, "activation_ratio": ratio, "dense_activation_ratio": dense}
                for layer, (eps, ratio, dense) in enumerate(zip(self.layer_thresholds, self.layer_activation_ratio,
                                                                  self.dense_activation_ratio or [math.nan] * len(self.layer_thresholds)))]


class PPLSearch:
    """Finds the global CETT for PPL-p% on the ``calibration`` tokens [n_seq, seq_len] (its
    thresholds come from their first ``threshold_tokens``); several p share its passes.
    ``score`` then measures a result on held-out evaluation tokens."""

    def __init__(self, model, calibration: Tensor, threshold_tokens: int = DEFAULT_THRESHOLD_TOKENS,
                 settings_per_pass: int = 4, batch_size: int = 8):
        tokens = calibration
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"calibration tokens must be [n_seq, seq_len ≥ 2], got shape {tuple(tokens.shape)}")
        if settings_per_pass < 2:
            raise ValueError("settings_per_pass must be at least 2 (the dense reference and one candidate)")
        self.model, self.tokens = model, tokens
        self.sites = describe_mlps(model)
        if not self.sites:
            raise ValueError("the model has no MLPs to sparsify")
        self.settings_per_pass, self.batch_size = settings_per_pass, batch_size
        self.norms = [site.w_out_norms.to(model.cfg.device) for site in self.sites]
        started = time.perf_counter()
        names = [site.hook_post for site in self.sites]
        # Calibrate from the first sequences (dense activations, no hooks).
        self.x1 = ModelSource(model, tokens, batch_size=16).collect(names, threshold_tokens)
        self._thresholds: dict[float, list[float]] = {}
        self.evaluations: dict[float, Evaluation] = {}
        self.passes = 0
        self.seconds = time.perf_counter() - started

    # --- thresholds --------------------------------------------------------------------
    def thresholds(self, c: float) -> list[float]:
        """ε_ℓ(c) for every layer: the threshold whose CETT on the calibration activations is c,
        interpolated on each layer's CETT curve (``layer_curves``)."""
        if c not in self._thresholds:
            self._thresholds[c] = [0.0 if c == 0 else float(_interpolate(c, cetts, grid))
                                   for grid, cetts in self.layer_curves]
        return self._thresholds[c]

    @cached_property
    def layer_curves(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer, (ε grid, CETT at each ε) on the calibration activations. The grid is
        the magnitude quantiles ‖n_i‖ at GRID_POINTS levels, so it is dense where the
        neurons are; CETT is made non-decreasing along it (it rises with ε in practice,
        cancellations aside) so that c ↦ ε_ℓ(c) is monotone."""
        curves = []
        levels = torch.linspace(0, 1, GRID_POINTS, dtype=torch.float64)
        for site in self.sites:
            x1 = self.x1[site.hook_post]
            magnitudes = neuron_magnitudes(x1, site.w_out.to(x1.device)).flatten()
            sample = magnitudes[torch.randperm(magnitudes.numel(), generator=torch.Generator().manual_seed(0))[:1 << 20]]
            grid = torch.quantile(sample.double(), levels).float()
            grid[-1] = torch.nextafter(magnitudes.max(), torch.tensor(math.inf))  # everything dropped: CETT 1
            cetts = torch.cummax(cett_curve(x1, site.w_out, grid), 0).values
            curves.append((grid, cetts))
        return curves

    # --- one pass, several settings ------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, cetts: list[float]) -> list[Evaluation]:
        """Mean loss and per-layer activation ratio of each global CETT (0 = dense) on the
        search tokens, in one pass (results are kept: a setting is scored once)."""
        started = time.perf_counter()
        todo = [c for c in dict.fromkeys(cetts) if c not in self.evaluations]
        if todo:
            for c, evaluation in zip(todo, self._score(todo, self.tokens)):
                self.evaluations[c] = evaluation
            self.passes += 1
        self.seconds += time.perf_counter() - started
        return [self.evaluations[c] for c in cetts]

    @torch.no_grad()
    def _score(self, todo: list[float], tokens: Tensor) -> list[Evaluation]:
        """Each setting of ``todo`` on ``tokens``, all in one pass: the batch is repeated once
        per setting and each copy masked with its own thresholds."""
        device = self.model.cfg.device
        copies = len(todo)
        # [copies, d_mlp] activation-space thresholds ε_ℓ / ‖W_out[:, i]‖ per layer.
        per_layer = [torch.stack([self.thresholds(c)[site.layer] / self.norms[site.layer] for c in todo])
                     for site in self.sites]
        kept = torch.zeros(copies, len(self.sites), dtype=torch.float64)
        per_sequence = []
        entries = 0

        def mask(layer: int):
            site = self.sites[layer]

            def hook(post, hook):
                shaped = site.x1_from_post(post).view(copies, -1, *post.shape[1:])
                keep = (shaped.abs() >= per_layer[layer].view(copies, 1, 1, -1)) & (shaped != 0)
                kept[:, layer] += keep.flatten(1).sum(1).double().cpu()
                return site.post_from_x1((shaped * keep).view_as(post))
            return hook

        hooks = [(site.hook_post, mask(site.layer)) for site in self.sites]
        for start in range(0, tokens.shape[0], self.batch_size):
            batch = tokens[start:start + self.batch_size].to(device)
            per_token = self.model.run_with_hooks(batch.repeat(copies, 1), return_type="loss", loss_per_token=True, fwd_hooks=hooks)
            per_sequence.append(per_token.view(copies, batch.shape[0], -1).double().sum(-1).cpu())
            entries += batch.numel()
        per_sequence = torch.cat(per_sequence, dim=1)  # [copies, n_seq]
        n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
        widths = torch.tensor([s.d_mlp for s in self.sites])
        return [Evaluation(c, float(per_sequence[i].sum()) / n_tokens, (kept[i] / (entries * widths)).tolist(), per_sequence[i])
                for i, c in enumerate(todo)]

    def score(self, result: PPLSparsity, tokens: Tensor) -> PPLSparsity:
        """``result`` (from ``solve``) measured on held-out evaluation ``tokens``: the
        perplexity and activation ratios there, with a 95% bootstrap interval over sequences
        for the perplexity ratio. ``tokens`` must share no sequence with the calibration set."""
        check_disjoint(self.tokens, tokens)
        started = time.perf_counter()
        dense, sparse = self._score([0.0, result.cett], tokens)
        counts = [s.d_mlp for s in self.sites]
        return dataclasses.replace(
            result, ppl_ratio=math.exp(sparse.loss - dense.loss),
            ppl_ratio_ci=bootstrap_ratio_ci(dense.sequence_losses, sparse.sequence_losses, tokens.shape[1] - 1),
            activation_ratio=sum(r * n for r, n in zip(sparse.layer_activation_ratio, counts)) / sum(counts),
            layer_activation_ratio=sparse.layer_activation_ratio, dense_activation_ratio=dense.layer_activation_ratio,
            dense_loss=dense.loss, sparse_loss=sparse.loss, held_out=True, n_eval_tokens=tokens.numel(),
            seconds=result.seconds + time.perf_counter() - started)

    # --- the search ----------------------------------------------------------------------
    def solve(self, p: float = 0.01, tolerance: float = DEFAULT_TOLERANCE, max_passes: int = 12) -> PPLSparsity:
        """The global CETT whose perplexity ratio is 1 + p (within ``tolerance``)."""
        if not 0 < p < 10:
            raise ValueError(f"p is a relative perplexity increase such as 0.01 (1%), got {p}")
        target = math.log1p(p)
        if 0.0 not in self.evaluations:  # the dense reference, with first guesses in the same pass
            self.evaluate([0.0] + [0.04 * 3 ** i for i in range(self.settings_per_pass - 1)])
        dense = self.evaluations[0.0]
        gap = lambda c: self.evaluations[c].loss - dense.loss - target  # noqa: E731  (log ppl ratio − log(1+p))
        for _ in range(max_passes):
            best = min(self.evaluations, key=lambda c: abs(math.expm1(self.evaluations[c].loss - dense.loss) - p))
            if abs(math.expm1(self.evaluations[best].loss - dense.loss) - p) <= tolerance:
                break
            below = [c for c in self.evaluations if gap(c) < 0]
            above = [c for c in self.evaluations if gap(c) > 0]
            lo = max(below)
            hi = min((c for c in above if c > lo), default=None)
            self.evaluate(self._candidates(lo, gap(lo), hi, gap(hi) if hi is not None else None))
        best = min(self.evaluations, key=lambda c: abs(math.expm1(self.evaluations[c].loss - dense.loss) - p))
        found = self.evaluations[best]
        counts = [s.d_mlp for s in self.sites]
        return PPLSparsity(
            p=p, cett=best, ppl_ratio=math.exp(found.loss - dense.loss), search_ppl_ratio=math.exp(found.loss - dense.loss),
            n_calibration_tokens=self.tokens.numel(),
            activation_ratio=sum(r * n for r, n in zip(found.layer_activation_ratio, counts)) / sum(counts),
            layer_activation_ratio=found.layer_activation_ratio, layer_thresholds=self.thresholds(best),
            dense_loss=dense.loss, sparse_loss=found.loss, passes=self.passes,
            settings_evaluated=len(self.evaluations), seconds=self.seconds,
            dense_activation_ratio=dense.layer_activation_ratio)

    def _candidates(self, lo: float, gap_lo: float, hi: float | None, gap_hi: float | None) -> list[float]:
        """Settings for the next pass, inside (lo, hi): the interpolated root and points around it."""
        n = self.settings_per_pass
        if hi is None:  # no upper bracket yet: spread geometrically up to CETT 1
            return [min(1.0, max(lo, 0.02) * 2.5 ** (i + 1)) for i in range(n)]
        root = lo + (hi - lo) * (-gap_lo) / (gap_hi - gap_lo)
        width = (hi - lo) / (2 * n)
        return sorted({min(hi - 1e-6, max(lo + 1e-6, root + width * (i - (n - 1) / 2))) for i in range(n)})


def _interpolate(c: float, cetts: Tensor, grid: Tensor) -> Tensor:
    """ε at CETT c by linear interpolation on a non-decreasing curve (its first crossing)."""
    upper = int(torch.searchsorted(cetts, torch.tensor(c, dtype=cetts.dtype)).clamp(1, len(cetts) - 1))
    c0, c1, e0, e1 = cetts[upper - 1], cetts[upper], grid[upper - 1], grid[upper]
    return e0 if c1 <= c0 else e0 + (e1 - e0) * ((c - c0) / (c1 - c0)).clamp(0, 1)


def ppl_p_sparsity(model, tokens: Tensor, calibration: Tensor, p: float = 0.01, **kwargs) -> PPLSparsity:
    """PPL-p% sparsity of ``model`` (Luo et al. 2024): the global CETT whose perplexity ratio
    to the dense model is 1 + p on the ``calibration`` tokens (thresholds and search), and its
    ``ppl_ratio`` (with ``ppl_ratio_ci``) and ``activation_ratio`` overall and per layer on the
    held-out evaluation ``tokens``. Both [n_seq, seq_len]; they must share no sequence."""
    check_disjoint(calibration, tokens)
    solve_keys = {"tolerance", "max_passes"}
    search = PPLSearch(model, calibration, **{k: v for k, v in kwargs.items() if k not in solve_keys})
    return search.score(search.solve(p, **{k: v for k, v in kwargs.items() if k in solve_keys}), tokens)
