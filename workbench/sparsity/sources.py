"""Where MLP activations come from: a model run over tokens, or an activation cache.

Both sources answer the same two questions: ``batches(names)`` streams aligned rows
(one dict ``name → [rows, d]`` per batch, the same tokens in every entry) and
``collect(names, max_tokens)`` gathers the first ``max_tokens`` rows into memory. Names
are TransformerLens hook names, plus ``MLPSite.input_name`` for the MLP input (captured
from the MLP module on a model; rebuilt from ``ln2.hook_normalized`` in a cache).

``hook_post`` of a gated MLP comes back as x1 = ``hook_post`` − b_in, the x1 every metric
speaks of (see the bias convention in mlp.py).

``as_source`` turns what users pass into a source: ``(model, tokens)``, an
``ActivationCache``, or ``(cache, model)`` when the cache's model is not an offline zoo
model or the metric needs weights the cache does not hold.
"""

from __future__ import annotations

import logging
import re
from contextlib import ExitStack
from functools import cached_property
from typing import Iterator

import torch
from torch import Tensor

from ..cache import ActivationCache
from ..cache.format import model_fingerprint
from ..cache.writer import stop_layer
from .mlp import MLPSite, describe_mlps

log = logging.getLogger(__name__)

_INPUT_NAME = re.compile(r"^blocks\.(\d+)\.mlp:input$")


def _input_layer(name: str) -> int | None:
    match = _INPUT_NAME.match(name)
    return int(match.group(1)) if match else None


_POST_NAME = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


def _as_x1(sites: list[MLPSite], name: str, rows: Tensor) -> Tensor:
    """``rows`` of ``name``, with a gated MLP's b_in taken out of its ``hook_post``."""
    match = _POST_NAME.match(name)
    return sites[int(match.group(1))].x1_from_post(rows) if match else rows


def _gather(stream: Iterator[dict[str, Tensor]], max_tokens: int | None) -> dict[str, Tensor]:
    parts: dict[str, list[Tensor]] = {}
    n = 0
    for batch in stream:
        for name, rows in batch.items():
            parts.setdefault(name, []).append(rows)
        n += next(iter(batch.values())).shape[0]
        if max_tokens is not None and n >= max_tokens:
            break
    if not parts:
        raise ValueError("the source yielded no rows")
    return {name: torch.cat(rows)[:max_tokens] for name, rows in parts.items()}


class ModelSource:
    """Activations of ``model`` on ``tokens`` [n_seq, seq_len], computed batch by batch."""

    def __init__(self, model, tokens: Tensor, batch_size: int = 16):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [n_seq, seq_len], got shape {tuple(tokens.shape)}")
        self.model, self.tokens, self.batch_size = model, tokens, batch_size

    @cached_property
    def sites(self) -> list[MLPSite]:
        return describe_mlps(self.model)

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()

    def batches(self, names: list[str], max_tokens: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Float32 CPU rows [batch·seq_len, d] of every name, one dict per batch of sequences."""
        unknown = [n for n in names if _input_layer(n) is None and n not in self.model.hook_dict]
        if unknown:
            raise ValueError(f"{unknown} are not hooks of this model; list them with sorted(model.hook_dict)")
        seq_len = self.tokens.shape[1]
        n_seq = self.tokens.shape[0] if max_tokens is None else min(self.tokens.shape[0], -(-max_tokens // seq_len))
        for start in range(0, n_seq, self.batch_size):
            yield self._run(self.tokens[start:min(start + self.batch_size, n_seq)], names)

    @torch.no_grad()
    def _run(self, batch: Tensor, names: list[str]) -> dict[str, Tensor]:
        acts: dict[str, Tensor] = {}

        def keep(act, hook):
            acts[hook.name] = act

        hooks = [(n, keep) for n in names if _input_layer(n) is None]
        with ExitStack() as stack:
            for name in names:
                layer = _input_layer(name)
                if layer is not None:  # the MLP input: what the module is called with
                    hook = self.sites[layer].module.register_forward_pre_hook(lambda module, args, name=name: acts.__setitem__(name, args[0]))
                    stack.callback(hook.remove)
            stack.enter_context(self.model.hooks(fwd_hooks=hooks))
            self.model(batch.to(self.model.cfg.device), stop_at_layer=stop_layer(names))
        return {n: _as_x1(self.sites, n, acts[n].reshape(-1, acts[n].shape[-1]).float()).cpu() for n in names}

    def collect(self, names: list[str], max_tokens: int | None = None) -> dict[str, Tensor]:
        return _gather(self.batches(names, max_tokens), max_tokens)


class CacheSource:
    """Activations read back from an ``ActivationCache`` (first rows first, no shuffling).

    ``model`` is only needed for weights and for the MLP input (ln2's affine weights); left
    out, it is loaded from the offline zoo by the name in the cache's manifest and checked
    against the cache's weights fingerprint.
    """

    def __init__(self, cache: ActivationCache, model=None, batch_size: int = 4096):
        self.cache, self.batch_size = cache, batch_size
        self._model = model
        if model is not None:
            self._check(model, strict=False)

    def _check(self, model, strict: bool) -> None:
        recorded, actual = self.cache.manifest["model"], model_fingerprint(model)
        if recorded.get("config_sha256") != actual["config_sha256"]:
            raise ValueError(f"the model's config differs from the one {self.cache.path} was cached with "
                             f"({recorded.get('name')!r}); pass the model the cache was written from")
        if recorded.get("weights_sha256") != actual["weights_sha256"]:
            message = (f"the model's weights differ from those {self.cache.path} was cached with "
                       f"({recorded.get('name')!r}); weights-based metrics would mix two models")
            if strict:
                raise ValueError(message + ": pass the right one as (cache, model)")
            log.warning(message)

    @property
    def model(self):
        if self._model is None:
            from ..models import list_models, load_model

            name = self.cache.manifest["model"]["name"]
            if name not in list_models():
                raise ValueError(f"{self.cache.path} was cached from {name!r}, not an offline zoo model: pass the model "
                                 "as (cache, model)")
            model = load_model(name, device="cpu")
            self._check(model, strict=True)
            self._model = model
        return self._model

    @cached_property
    def sites(self) -> list[MLPSite]:
        return describe_mlps(self.model)

    @property
    def n_tokens(self) -> int:
        return self.cache.n_tokens

    def _x1(self, name: str, rows: Tensor) -> Tensor:
        """``rows`` of ``name``, a gated ``hook_post`` as x1 (b_in out). Without the model (a
        cache of a non-zoo model read alone) that is unknowable: the cached values are used
        as they are, with a warning, which is right for plain MLPs and bias-free gated ones."""
        if not _POST_NAME.match(name):
            return rows
        try:
            sites = self.sites
        except ValueError as error:
            if not getattr(self, "_warned", False):
                log.warning("%s; reading hook_post as x1 unchanged (wrong only for a gated MLP with a b_in)", error)
                self._warned = True
            return rows
        return _as_x1(sites, name, rows)

    def _stored(self, name: str) -> str:
        layer = _input_layer(name)
        stored = self.sites[layer].hook_normalized if layer is not None else name
        if stored not in self.cache.hooks:
            wanted = f"{stored} (the MLP input is rebuilt from it)" if layer is not None else stored
            raise KeyError(f"{self.cache.path} does not hold {wanted}; it has {self.cache.hooks}. Cache that hook, "
                           "or pass (model, tokens)")
        return stored

    def batches(self, names: list[str], max_tokens: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Rows of every name in cache order; batches of the cache's reader, aligned across names."""
        stored = [self._stored(n) for n in names]
        streams = [self.cache.batches(h, self.batch_size, shuffle=False) for h in stored]
        n = 0
        for rows in zip(*streams):
            batch = {}
            for name, x in zip(names, rows):
                layer = _input_layer(name)
                batch[name] = self.sites[layer].input_from_normalized(x) if layer is not None else self._x1(name, x)
            yield batch
            n += rows[0].shape[0]
            if max_tokens is not None and n >= max_tokens:
                return

    def collect(self, names: list[str], max_tokens: int | None = None) -> dict[str, Tensor]:
        return _gather(self.batches(names, max_tokens), max_tokens)


Source = ModelSource | CacheSource


def as_source(source) -> Source:
    """``(model, tokens)`` → ModelSource; ``ActivationCache`` or ``(cache, model)`` → CacheSource."""
    if isinstance(source, (ModelSource, CacheSource)):
        return source
    if isinstance(source, ActivationCache):
        return CacheSource(source)
    if isinstance(source, tuple) and len(source) == 2:
        first, second = source
        if isinstance(first, ActivationCache):
            return CacheSource(first, model=second)
        if isinstance(second, Tensor):
            return ModelSource(first, second)
    raise TypeError("a source is (model, tokens), an ActivationCache, or (ActivationCache, model); "
                    f"got {type(source).__name__}")
