"""Training-free activation-sparsity methods behind one interface.

Every method is (site, score, threshold scope, calibration objective) (DESIGN.md,
"Relatives, one abstraction"):

    method = CATS()                                  # or TopK, FAT, CETT, TEAL, CHESS, WINA
    thresholds = method.fit((model, tokens), 0.5)    # or fit(cache, 0.5), fit((cache, model), 0.5)
    with method.apply(model, thresholds) as meter:   # hooks in; removed on exit
        loss = model(tokens, return_type="loss")
    meter.sparsity()                                 # realised sparsity per site, these tokens

``fit`` calibrates on the first ``max_tokens`` rows of the source (as many layers per pass
as ``memory_bytes`` allows) and records the realised sparsity on those rows.
``target`` is the fraction of entries to drop, except for ``CETT``, whose target is the CETT
value. ``apply`` composes: nest several, or filter layers with ``Thresholds.select``.

| method | site(s)            | score                     | scope                 | paper |
|--------|--------------------|---------------------------|-----------------------|-------|
| cats   | gate (gated) / x1  | |act(gate)| / |h|         | per-layer quantile    | Lee et al. 2024 |
| topk   | gate (gated) / x1  | |act(gate)| / |h|         | k·tokens per batch    | Zhang et al. 2024 (Top-k) |
| fat    | gate (gated) / x1  | |act(gate)| / |h|         | one global ε          | Zhang et al. 2024 (FAT-ε) |
| cett   | x1                 | |x1|·‖W_out[:, i]‖        | per-layer ε by CETT   | Zhang et al. 2024; Luo et al. 2024 |
| teal   | input, x1          | |x|                       | per-layer quantile    | Liu et al. 2024 |
| chess  | gate (gated) / x1  | |s_i|·E[|u_i|]            | per-channel threshold | He et al. 2024 |
| wina   | input, x1          | |x_i|·‖W[:, i]‖           | k per token           | Chen et al. 2025 |
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor

from .cett import DEFAULT_MAX_ELEMENTS, cats_threshold, cett_threshold, neuron_thresholds
from .masking import Mask, SparsityMeter, batch_topk_keep, install, site_key, source_name, threshold_keep, topk_keep
from .mlp import MLPSite, describe_mlps
from .sources import ModelSource, as_source

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_TOKENS = 16_384
DEFAULT_MEMORY_BYTES = 1 << 30  # activations held at once while calibrating
FORWARD_ORDER = ("input", "gate", "x1")  # where a layer's sites sit in its forward pass


@dataclass
class Thresholds:
    """What ``fit`` found, in a form ``apply`` reads back."""

    method: str
    target: float
    values: dict[str, Tensor] = field(default_factory=dict)
    """Site key ``"blocks.{layer}.mlp.{where}"`` (where: x1, gate or input) → a 0-d threshold
    (one per layer), a [d] threshold (one per channel), or a 0-d integer k (top-k methods)."""
    realised: dict[str, float] = field(default_factory=dict)
    """Site key → fraction of entries inactive (dropped, or exactly zero) on the calibration rows."""
    extras: dict[str, float] = field(default_factory=dict)
    """Method-specific per-layer numbers, e.g. CETT's ε (``"blocks.{l}.mlp.epsilon"``)."""
    n_tokens: int = 0
    """Calibration rows used."""

    @property
    def layers(self) -> list[int]:
        return sorted({int(key.split(".")[1]) for key in self.values})

    @property
    def realised_mean(self) -> float:
        """Mean realised sparsity over sites (NaN without sites)."""
        return sum(self.realised.values()) / len(self.realised) if self.realised else math.nan

    def select(self, layers) -> "Thresholds":
        """The same thresholds restricted to ``layers`` (apply then leaves other layers dense)."""
        prefixes = tuple(f"blocks.{int(layer)}." for layer in layers)

        def pick(entries: dict) -> dict:
            return {key: value for key, value in entries.items() if key.startswith(prefixes)}

        return Thresholds(self.method, self.target, pick(self.values), pick(self.realised), pick(self.extras), self.n_tokens)

    def table(self) -> list[dict]:
        """One row per site: key, layer, where, threshold (or k; the mean for per-channel), realised."""
        rows = []
        for key, value in self.values.items():
            _, layer, _, where = key.split(".")
            rows.append({"site": key, "layer": int(layer), "where": where,
                         "threshold": float(value.float().mean()), "per_channel": value.ndim > 0,
                         "realised_sparsity": self.realised.get(key, math.nan)})
        return rows


def _check_fraction(value: float, what: str = "target sparsity") -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must lie in [0, 1], got {value}")


def _kept_count(width: int, sparsity: float) -> int:
    """Entries kept per token for a top-k method: d − round(s · d)."""
    return width - round(sparsity * width)


class SparsityMethod:
    """Base class: subclasses say where they sparsify, how they score, and how they calibrate."""

    name: ClassVar[str]
    topk: ClassVar[bool] = False
    """True when ``values`` hold k per token rather than thresholds."""

    def __init__(self, max_tokens: int | None = DEFAULT_CALIBRATION_TOKENS, memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.max_tokens = max_tokens
        self.memory_bytes = memory_bytes

    # --- what a method defines -----------------------------------------------------------
    def wheres(self, site: MLPSite) -> tuple[str, ...]:
        return ("x1",)

    def score(self, site: MLPSite, where: str) -> Callable[[Tensor], Tensor]:
        return torch.abs

    def keep_rule(self, k: int) -> Callable[[Tensor], Tensor]:
        """For top-k methods: the rule keeping k entries per token."""
        return topk_keep(k)

    def needs(self, site: MLPSite) -> list[str]:
        """Source names ``fit_site`` reads."""
        return sorted({source_name(site, w) for w in self.wheres(site)})

    def fit_site(self, site: MLPSite, acts: dict[str, Tensor], target: float, extras: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    # --- the interface -------------------------------------------------------------------
    def fit(self, source, target: float, sequential: bool | None = None) -> Thresholds:
        """Calibrate on ``source`` ((model, tokens), a cache, or (cache, model)) for ``target``.

        Sparsifying every layer at once shifts the later layers' inputs: thresholds taken
        from dense activations then miss their target once all layers are applied (on the
        zoo's ReLU model, CATS at s = 0.8 realises ≈ 0.77 in layer 1). So with a model source
        and several layers the default (``sequential=None``) calibrates each layer with the
        layers before it already sparsified, one pass per layer, and the target holds with
        all layers applied together. ``sequential=False`` calibrates every layer on dense
        activations (in as few passes as ``memory_bytes`` allows): right for one layer alone,
        and all a cache allows (it holds dense activations only; a warning says so).
        Top-k methods keep k per token whatever their input, so they need no ordering.
        """
        _check_fraction(target)
        src = as_source(source)
        several = len(src.sites) > 1 and not self.topk
        if sequential is None:
            sequential = several and isinstance(src, ModelSource)
            if several and not sequential:
                log.warning("%s: calibrating from a cache, on dense activations; with several layers applied at once "
                            "the realised sparsity drifts from the target (fit (model, tokens) for a sequential fit)",
                            self.name)
        if sequential and not isinstance(src, ModelSource):
            raise ValueError("sequential calibration runs the sparsified model: pass (model, tokens)")
        thresholds = Thresholds(self.name, float(target))
        if sequential:
            self._fit_sequential(src, target, thresholds)
            return thresholds
        for group in self._groups(src):
            acts = src.collect(sorted({n for site in group for n in self.needs(site)}), self.max_tokens)
            for site in group:
                values = self.fit_site(site, acts, target, thresholds.extras)
                thresholds.values.update(values)
                thresholds.realised.update(_realised(self.masks(site, values), acts))
            thresholds.n_tokens = next(iter(acts.values())).shape[0]
            del acts
        return thresholds

    def _fit_sequential(self, src, target: float, thresholds: Thresholds) -> None:
        """Calibrate site by site in forward order (layers, and within a layer the MLP input
        before x1), each on the model with every site before it already sparsified."""
        for site in src.sites:
            wheres = sorted(self.wheres(site), key=FORWARD_ORDER.index)
            for where in wheres:
                with self.apply(src.model, thresholds):
                    acts = src.collect(self.needs(site), self.max_tokens)
                values = {key: value for key, value in self.fit_site(site, acts, target, thresholds.extras).items()
                          if key == site_key(site.layer, where)}
                thresholds.values.update(values)
                thresholds.realised.update(_realised(self.masks(site, values), acts))
                thresholds.n_tokens = next(iter(acts.values())).shape[0]

    def _groups(self, src) -> list[list[MLPSite]]:
        """Layers packed into passes whose collected activations fit ``memory_bytes``."""
        rows = min(self.max_tokens or src.n_tokens, src.n_tokens)
        groups: list[list[MLPSite]] = [[]]
        used = 0
        for site in src.sites:
            cost = 4 * rows * sum(site.d_model if n == site.input_name else site.d_mlp for n in self.needs(site))
            if groups[-1] and used + cost > self.memory_bytes:
                groups.append([])
                used = 0
            groups[-1].append(site)
            used += cost
        return groups

    def masks(self, site: MLPSite, values: dict[str, Tensor]) -> list[Mask]:
        masks = []
        device = site.module.W_out.device
        for where in self.wheres(site):
            value = values.get(site_key(site.layer, where))
            if value is not None:
                keep = self.keep_rule(int(value)) if self.topk else threshold_keep(value.to(device))
                masks.append(Mask(site, where, self.score(site, where), keep))
        return masks

    def apply(self, model, thresholds: Thresholds) -> AbstractContextManager[SparsityMeter]:
        """A context manager that zeroes the dropped activations in ``model`` and yields a
        ``SparsityMeter``; on exit exactly its hooks are removed."""
        if thresholds.method != self.name:
            raise ValueError(f"these thresholds were fitted by {thresholds.method!r}, not {self.name!r}")
        sites = describe_mlps(model)
        if thresholds.layers and thresholds.layers[-1] >= len(sites):
            raise ValueError(f"thresholds name layers {thresholds.layers} but the model has {len(sites)} MLPs")
        return install(model, [mask for site in sites for mask in self.masks(site, thresholds.values)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_tokens={self.max_tokens})"


def _realised(masks: list[Mask], acts: dict[str, Tensor]) -> dict[str, float]:
    return {m.key: 1.0 - float(m.kept(acts[m.source_name]).float().mean()) for m in masks}


def _quantiles(method: SparsityMethod, site: MLPSite, acts: dict[str, Tensor], target: float) -> dict[str, Tensor]:
    """One threshold per layer and site: the target quantile of the score (CATS' rule)."""
    return {site_key(site.layer, w): torch.tensor(cats_threshold(method.score(site, w)(acts[source_name(site, w)]), target))
            for w in method.wheres(site)}


METHODS: dict[str, type[SparsityMethod]] = {}


def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **kwargs) -> SparsityMethod:
    """A method by its registered name (``sorted(METHODS)``)."""
    if name not in METHODS:
        raise ValueError(f"unknown sparsity method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name](**kwargs)


class _GateOrH(SparsityMethod):
    """Sparsify act(W_gate x) of gated MLPs (x1 follows) and h = x1 of plain ones, by magnitude.

    ``on="x1"`` scores x1 = act(gate) ⊙ up of gated MLPs instead (plain MLPs: the same h)."""

    def __init__(self, on: str = "gate", **kwargs):
        super().__init__(**kwargs)
        if on not in ("gate", "x1"):
            raise ValueError(f"on must be 'gate' (act(W_gate x) of gated MLPs, the reference) or 'x1', got {on!r}")
        self.on = on

    def wheres(self, site):
        return ("gate",) if site.gated and self.on == "gate" else ("x1",)

    def score(self, site, where):
        return (lambda pre: site.act(pre).abs()) if where == "gate" else torch.abs


class _LinearInputs(SparsityMethod):
    """Sparsify the inputs of the MLP's linear layers: ``"input"`` (read by W_in and W_gate)
    and/or ``"x1"`` (read by W_out)."""

    def __init__(self, sites: tuple[str, ...] = ("input", "x1"), **kwargs):
        super().__init__(**kwargs)
        if not sites or not set(sites) <= {"input", "x1"}:
            raise ValueError(f"{type(self).__name__} sparsifies 'input' and/or 'x1', got {sites}")
        self.sites = tuple(sites)

    def wheres(self, site):
        return self.sites


@register
class CATS(_GateOrH):
    """CATS (Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity"):
    CATS_t(v) = v·1[|v| ≥ t] on act(W_gate x) of gated MLPs (x1 follows), on h = x1 of plain
    ones; t per layer = the target quantile of |v| over the calibration rows."""

    name = "cats"

    def fit_site(self, site, acts, target, extras):
        return _quantiles(self, site, acts, target)


@register
class TEAL(_LinearInputs):
    """TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"):
    magnitude-threshold the input of each linear layer, with a per-layer threshold at the
    target quantile of |input|: the MLP input (read by W_in and W_gate) and x1 (read by W_out).
    Thresholds come from dense activations and every site gets the same target (TEAL's
    uniform variant; its greedy per-layer allocation and attention projections are not here)."""

    name = "teal"

    def fit_site(self, site, acts, target, extras):
        return _quantiles(self, site, acts, target)


@register
class TopK(_GateOrH):
    """Top-k (Zhang et al. 2024, "ReLU² Wins", the Top-k baseline): keep the largest
    magnitudes, k = d_mlp − round(s·d_mlp) per token on average. Needs no calibration; ``fit``
    records k and the realised sparsity (higher where fewer than k are nonzero).

    As the reference code does, by default gated MLPs are scored on |act(W_gate x)| (plain
    ones on |h|) and the ranking is over the flattened batch (``scope="batch"``: the k·tokens
    largest entries of each forward pass, so a token may keep more or fewer than k). Named
    options: ``on="x1"`` scores x1 = act(gate) ⊙ up of gated MLPs; ``scope="token"`` keeps
    exactly k per token, independent of the batch."""

    name = "topk"
    topk = True

    def __init__(self, scope: str = "batch", **kwargs):
        super().__init__(**kwargs)
        if scope not in ("batch", "token"):
            raise ValueError(f"scope must be 'batch' (the reference) or 'token', got {scope!r}")
        self.scope = scope

    def keep_rule(self, k: int):
        return batch_topk_keep(k) if self.scope == "batch" else topk_keep(k)

    def fit_site(self, site, acts, target, extras):
        return {site_key(site.layer, w): torch.tensor(_kept_count(site.d_mlp, target)) for w in self.wheres(site)}


@register
class FAT(_GateOrH):
    """FAT-ε, one flat absolute threshold for every layer (Zhang et al. 2024, "ReLU² Wins"),
    on |act(W_gate x)| of gated MLPs as the reference code does (``on="x1"``: on |x1|) and on
    |h| of plain ones. ``fit`` picks ε as the target quantile of the scores pooled over all
    layers (each layer weighted equally), so the *mean* sparsity meets the target while
    layers differ."""

    name = "fat"

    def fit(self, source, target, sequential=None):
        _check_fraction(target)
        if sequential:
            raise ValueError("FAT-ε has one ε for all layers: there is no layer-by-layer calibration")
        src = as_source(source)
        per_layer = max(1, DEFAULT_MAX_ELEMENTS // max(1, len(src.sites)))
        pooled = []
        for group in self._groups(src):  # pass 1: a seeded sample of scores from each layer
            acts = src.collect(sorted({n for site in group for n in self.needs(site)}), self.max_tokens)
            for site in group:
                (where,) = self.wheres(site)
                scores = self.score(site, where)(acts[source_name(site, where)]).reshape(-1)
                index = torch.randint(scores.numel(), (min(per_layer, scores.numel()),), generator=torch.Generator().manual_seed(site.layer))
                pooled.append(scores[index])
        epsilon = torch.tensor(cats_threshold(torch.cat(pooled), target))
        thresholds = Thresholds(self.name, float(target), extras={"epsilon": float(epsilon)})
        for group in self._groups(src):  # pass 2: the realised sparsity of that one ε in each layer
            acts = src.collect(sorted({n for site in group for n in self.needs(site)}), self.max_tokens)
            for site in group:
                values = {site_key(site.layer, w): epsilon.clone() for w in self.wheres(site)}
                thresholds.values.update(values)
                thresholds.realised.update(_realised(self.masks(site, values), acts))
            thresholds.n_tokens = next(iter(acts.values())).shape[0]
        return thresholds


@register
class CETT(SparsityMethod):
    """Per-neuron thresholds from one CETT target c (Zhang et al. 2024 "ReLU² Wins"; Luo et al.
    2024 "Sparsing Law"): each layer's ε_ℓ is bisected on dense x1 so its CETT is c, then
    neuron i keeps |x1_i| ≥ ε_ℓ / ‖W_out[:, i]‖. ``target`` is c, not a sparsity; the realised
    sparsity is 1 − the activation ratio. Bisecting c for PPL-p% is left to the caller."""

    name = "cett"

    def __init__(self, rtol: float = 1e-4, **kwargs):
        super().__init__(**kwargs)
        self.rtol = rtol

    def fit_site(self, site, acts, target, extras):
        epsilon = cett_threshold(acts[site.hook_post], site.w_out, target, rtol=self.rtol)
        extras[f"blocks.{site.layer}.mlp.epsilon"] = epsilon
        return {site_key(site.layer, "x1"): neuron_thresholds(epsilon, site.w_out).cpu()}


@register
class CHESS(_GateOrH):
    """CHESS channel-wise thresholding (He et al. 2024, "CHESS: Optimizing LLM Inference via
    Channel-Wise Thresholding and Selective Sparsification", EMNLP 2024), FFN part only.

    Gated MLPs: gate entry s_i = act(W_gate x)_i, up projection u. CHESS' objective is the
    error ‖u ⊙ s − u ⊙ ŝ‖² of dropping gate entries (He et al. 2024, §3); its channel-wise
    threshold replaces u_i by a calibration statistic. The default, ``statistic="abs"``,
    is the released code's threshold script: importance |s_i|·E[|u_i|], τ_ℓ = the target
    quantile of the importance over the layer, and channel i keeps |s_i| ≥ τ_ℓ / E[|u_i|].
    ``statistic="square"`` is the squared objective taken literally: s_i²·E[u_i²] with
    t_i = √(τ_ℓ / E[u_i²]). (We could not check the paper's printed equation for which
    moment it uses, so the released code decides the default.)
    Plain MLPs have no up projection (u ≡ 1), and CHESS reduces to CATS on |h|.
    """

    name = "chess"

    def __init__(self, statistic: str = "abs", **kwargs):
        super().__init__(**kwargs)
        if statistic not in {"square", "abs"}:
            raise ValueError(f"statistic must be 'abs' (the released code) or 'square' (the squared objective), got {statistic!r}")
        self.statistic = statistic

    def needs(self, site):
        return [site.hook_pre, site.hook_pre_linear] if site.gated else [site.hook_post]

    def fit_site(self, site, acts, target, extras):
        if site.gated:
            s, u = site.act(acts[site.hook_pre]).abs(), acts[site.hook_pre_linear]
        else:
            s, u = acts[site.hook_post].abs(), torch.ones_like(acts[site.hook_post])
        tau, thresholds = chess_thresholds(s, u, target, self.statistic)
        extras[f"blocks.{site.layer}.mlp.tau"] = tau
        return {site_key(site.layer, self.wheres(site)[0]): thresholds}


def chess_thresholds(gate: Tensor, up: Tensor, sparsity: float, statistic: str = "abs") -> tuple[float, Tensor]:
    """CHESS' layer importance threshold τ and per-channel thresholds on |gate| (see ``CHESS``).

    gate, up: [tokens, d_mlp] (gate = act(W_gate x)). A channel with E[u²] = 0 has zero
    importance everywhere and an infinite threshold.
    """
    if statistic == "square":
        moment = up.double().pow(2).mean(0)
        importance = gate.double().pow(2) * moment
    else:
        moment = up.double().abs().mean(0)
        importance = gate.double().abs() * moment
    tau = cats_threshold(importance, sparsity)
    per_channel = torch.where(moment > 0, tau / moment, math.inf)
    if statistic == "square":
        per_channel = per_channel.sqrt()
    return tau, per_channel.float()


@register
class WINA(_LinearInputs):
    """WINA (Chen et al. 2025, "WINA: Weight Informed Neuron Activation for Accelerating Large
    Language Model Inference"): keep the top-k of |x_i|·‖W[:, i]‖ per token, W the weight that
    reads x: the MLP input with W_in (W_gate and W_in stacked, for gated MLPs: both read it),
    and x1 with W_out. k = d − round(s·d) per site. WINA's column-orthogonalising transform of
    the weights is not applied: this is the selection rule on the model as it is."""

    name = "wina"
    topk = True

    def score(self, site, where):
        norms = site.input_norms if where == "input" else site.w_out_norms
        return lambda x: x.abs() * norms.to(x.device, x.dtype)

    def fit_site(self, site, acts, target, extras):
        width = {"input": site.d_model, "x1": site.d_mlp}
        return {site_key(site.layer, w): torch.tensor(_kept_count(width[w], target)) for w in self.sites}
