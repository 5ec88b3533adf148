"""Build a feature index: one streaming pass of the SAE over a cache, then per-feature tables.

What a feature dashboard shows (SAE-Vis, Neuronpedia; DESIGN.md "Feature dashboards"),
computed once and stored so that reading one feature touches only that feature's bytes:

1. The pass: every cached row of the hook is encoded once (eval mode, so each row's code
   is its own), and its sparse code (k indices and values) is appended to a temporary
   file. Counts, sums and maxima accumulate on the way.
2. One stable sort of all nonzero (feature, value, row) entries by feature, then by value
   descending (ties: earlier row first) gives every feature's activations in order: the
   top-N rows, exact quantiles, quantile-bin samples and an exact histogram on (0, max].
3. Contexts: a token window around each chosen row, with the feature's activation at every
   token of the window, read back from the temporary codes (no second encode).
4. From the weights alone: the tokens each decoder direction promotes and suppresses, and
   the nearest features by decoder cosine.
5. Correlations between features' activations (Pearson) and co-occurrence (Jaccard of the
   rows they fire on), on ``correlation_rows`` evenly spaced rows (all rows when fewer):
   d_sae × d_sae Gram matrices as sparse products of the rows' codes, scored one block of
   features at a time.

Memory: the sort holds 12 bytes per nonzero entry (≈ 0.4 GB for 1M rows at k = 32).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..evals import evaluating
from ..paths import atomic_write_text
from .attention import attention_layer, decoder_in_residual, head_attribution
from .store import FILES, INDEX_FILE, QUANTILES, FeatureIndex, write_array

FORMAT = 1


def build_index(sae, cache, hook: str | None = None, out_dir: str | Path | None = None, top_n: int = 20,
                model=None, window: tuple[int, int] = (12, 4), n_bins: int = 10, samples_per_bin: int = 3,
                histogram_bins: int = 32, n_related: int = 10, correlation_rows: int = 16_384, batch_size: int = 4096,
                progress: bool = True) -> FeatureIndex:
    """Index every feature of ``sae`` over the rows of ``hook`` (default: the SAE's
    hook_name) in ``cache`` (an ActivationCache; or token ids with ``model``, which are
    cached first under data/cache/features/), writing to ``out_dir`` (default: beside
    the cache, ``<cache>/features/<sae hash>``). ``model`` (optional) adds each feature's
    promoted and suppressed tokens (W_dec[f]·W_U, through ln_final's scale). A finished
    index of the same SAE and cache is reopened instead of rebuilt."""
    from ..cache import ActivationCache

    hook = hook or sae.cfg.hook_name
    if isinstance(cache, torch.Tensor) and model is not None and not cache.is_floating_point():
        cache = _cache_tokens(model, cache, hook, progress)
    if not isinstance(cache, ActivationCache):
        raise TypeError(f"build_index needs an ActivationCache (or token ids [n_seq, seq_len] with model=), got "
                        f"{type(cache).__name__}: cache the hook first with wb.cache_activations(model, tokens, [hook], "
                        "folder) and open it with wb.ActivationCache.open")
    if hook not in cache.hooks:
        raise ValueError(f"hook {hook!r} is not in the cache {cache.path}, which has {cache.hooks}")
    if cache.d(hook) != sae.cfg.d_in:
        raise ValueError(f"the SAE reads {sae.cfg.d_in} values per row, but the cache holds {cache.d(hook)} for {hook!r}")
    if top_n < 1 or n_bins < 1 or samples_per_bin < 0 or window[0] < 0 or window[1] < 0:
        raise ValueError(f"need top_n >= 1, n_bins >= 1, samples_per_bin >= 0 and a window of (before, after) >= 0, got "
                         f"top_n={top_n}, n_bins={n_bins}, samples_per_bin={samples_per_bin}, window={window}")
    identity = {"format": FORMAT, "sae_sha256": _sae_sha256(sae), "cache_sha256": _cache_sha256(cache), "hook": hook,
                "top_n": top_n, "window": list(window), "n_bins": n_bins, "samples_per_bin": samples_per_bin,
                "histogram_bins": histogram_bins, "n_related": n_related, "correlation_rows": correlation_rows,
                "with_logits": model is not None}
    out_dir = Path(out_dir) if out_dir is not None else Path(cache.path) / "features" / identity["sae_sha256"][:16]
    existing = out_dir / INDEX_FILE
    if existing.exists() and {k: v for k, v in json.loads(existing.read_text()).items() if k in identity} == identity:
        return FeatureIndex.open(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing.unlink(missing_ok=True)  # written last: without it the folder is not an index

    started = time.perf_counter()
    n, d_sae = cache.n_tokens, sae.cfg.d_sae
    count = torch.zeros(d_sae, dtype=torch.float64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    peak = torch.zeros(d_sae)
    values_parts, indices_parts = [], []
    with evaluating(sae), torch.no_grad():
        # Rows in cache order, so row r of the codes is cache row r. A gradient SAE selects by
        # z alone here: the cached label gradient would leak the next token into the index.
        batches = cache.batches(hook, batch_size, shuffle=False, device=sae.W_dec.device)
        for x in tqdm(batches, total=math.ceil(n / batch_size), desc="index: encode", disable=not progress, unit="batch"):
            code = sae.encode_sparse(x)
            values, indices = code.values.float().cpu(), code.indices.cpu().to(torch.int32)
            active = values > 0
            count.index_add_(0, indices[active].long(), torch.ones(int(active.sum()), dtype=torch.float64))
            total.index_add_(0, indices[active].long(), values[active].double())
            peak.scatter_reduce_(0, indices.reshape(-1).long(), values.reshape(-1), "amax")
            values_parts.append(values)
            indices_parts.append(indices)
    width = max(v.shape[1] for v in values_parts)  # BatchTopK-style codes may vary in width: pad with zeros
    values = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values_parts])
    indices = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[1])) for i in indices_parts])
    del values_parts, indices_parts
    arrays = _per_feature_tables(values, indices, d_sae, top_n, n_bins, samples_per_bin, histogram_bins, count, total,
                                 peak, n)
    arrays.update(_contexts(cache, values, indices, arrays.pop("chosen_rows"), arrays.pop("chosen_values"), window,
                            progress))
    arrays.update(_decoder_tables(sae, model, n_related))
    arrays.update(_correlations(values, indices, d_sae, n_related, correlation_rows, progress))
    for name, array in arrays.items():
        write_array(out_dir, name, array)
    meta = {**identity, "d_sae": d_sae, "n_rows": n, "cache_path": str(cache.path), "sae_hook_name": sae.cfg.hook_name,
            "sae_architecture": sae.architecture, "k": sae.cfg.k, "quantiles": list(QUANTILES),
            "context_kinds": ["top"] * top_n + [f"bin {b}" for b in range(n_bins) for _ in range(samples_per_bin)],
            "logits": ("W_dec[f] · (ln_final.w ⊙ W_U): the direct effect on the logits, the final LayerNorm's scale "
                       "applied and its per-token normalisation left out (it rescales every logit alike)")
            if model is not None else None,
            "build_seconds": round(time.perf_counter() - started, 2), "files": sorted(arrays)}
    atomic_write_text(out_dir / INDEX_FILE, json.dumps(meta, indent=1) + "\n")
    return FeatureIndex.open(out_dir)


def _cache_tokens(model, tokens: torch.Tensor, hook: str, progress: bool):
    """Cache ``hook`` of ``model`` on ``tokens`` under data/cache/features/ (reused when the same)."""
    from ..cache import ActivationCache, cache_activations
    from ..cache.format import model_fingerprint
    from ..paths import cache_dir

    key = hashlib.sha256(json.dumps([model_fingerprint(model), hook, list(tokens.shape)]).encode())
    key.update(tokens.cpu().numpy().tobytes())
    folder = cache_dir() / "features" / f"{hook}-{tokens.numel()}-{key.hexdigest()[:12]}"
    return ActivationCache.open(cache_activations(model, tokens, [hook], folder, progress=progress))


def _per_feature_tables(values, indices, d_sae, top_n, n_bins, samples_per_bin, histogram_bins, count, total, peak, n):
    """Top-N rows, quantiles, quantile-bin samples and histogram of every feature, from one sort."""
    width = values.shape[1]
    flat_values, flat_indices = values.reshape(-1), indices.reshape(-1)
    active = flat_values > 0
    # A TopK code is all nonzero: then an entry's row is its flat position // k, no mask needed.
    position = None if bool(active.all()) else active.nonzero().squeeze(1)
    feat = flat_indices.long() if position is None else flat_indices[position].long()
    val = flat_values if position is None else flat_values[position]
    # Key: feature (high bits), then value descending; a stable sort keeps row order among ties.
    # A positive float32's bit pattern orders like its value, so 2^31 - 1 - bits orders descending.
    # The sorted keys give back feature and value; only the row is gathered.
    low = (1 << 31) - 1
    keys, order = torch.sort(feat * (1 << 31) + (low - val.view(torch.int32).long()), stable=True)
    feat_sorted = keys >> 31
    val = (low - (keys & low)).to(torch.int32).view(torch.float32)
    row = (order if position is None else position[order]).div_(width, rounding_mode="floor")
    del keys, order
    counts = count.long()
    starts = torch.cumsum(counts, 0) - counts

    def at(rank_desc: torch.Tensor) -> torch.Tensor:
        """Gather by (feature, descending rank) → entry position; rank beyond count → -1."""
        valid = (rank_desc >= 0) & (rank_desc < counts.unsqueeze(1))
        return torch.where(valid, starts.unsqueeze(1) + rank_desc.clamp_min(0), torch.full_like(rank_desc, -1))

    def take(source, positions, fill):
        out = source[positions.clamp_min(0)]
        return torch.where(positions >= 0, out, torch.full_like(out, fill))

    top_pos = at(torch.arange(top_n).expand(d_sae, top_n))
    # Quantile bins by ascending rank: bin b holds ranks [b·c/B, (b+1)·c/B); its samples sit evenly inside it.
    c = counts.double().unsqueeze(1)
    j = torch.arange(n_bins * samples_per_bin, dtype=torch.float64)
    b, s = j // max(samples_per_bin, 1), j % max(samples_per_bin, 1)
    lo_rank, hi_rank = torch.floor(c * b / n_bins), torch.floor(c * (b + 1) / n_bins)  # bin b: ranks [lo, hi)
    rank_asc = (lo_rank + torch.floor((s + 0.5) * (hi_rank - lo_rank) / max(samples_per_bin, 1))).long()
    rank_desc = torch.where(hi_rank > lo_rank, counts.unsqueeze(1) - 1 - rank_asc, torch.full_like(rank_asc, -1))
    bin_pos = at(rank_desc)
    chosen = torch.cat([top_pos, bin_pos], 1)
    # Quantiles with linear interpolation between order statistics (as torch.quantile).
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    position = q * (c - 1).clamp_min(0)
    lo, hi = position.floor().long(), position.ceil().long()
    lo_val = take(val, at(counts.unsqueeze(1) - 1 - lo), 0.0).double()
    hi_val = take(val, at(counts.unsqueeze(1) - 1 - hi), 0.0).double()
    quantiles = (lo_val + (hi_val - lo_val) * (position - lo)).float()
    # Exact histogram of the nonzero activations on histogram_bins equal bins of (0, max].
    scale = peak[feat_sorted].clamp_min(1e-30)
    bucket = torch.clamp((val / scale * histogram_bins).long(), max=histogram_bins - 1)
    histogram = torch.bincount(feat_sorted * histogram_bins + bucket, minlength=d_sae * histogram_bins)
    stats = torch.stack([count.float(), (count / n).float(), peak, (total / count.clamp_min(1)).float()], 1)
    return {"stats": torch.cat([stats, quantiles], 1).numpy(),
            "histogram": histogram.reshape(d_sae, histogram_bins).to(torch.int32).numpy(),
            "chosen_rows": take(row, chosen, -1), "chosen_values": take(val, chosen, 0.0)}


def _contexts(cache, values, indices, chosen_rows, chosen_values, window, progress, features_per_block: int = 512):
    """Token windows around each chosen row (clipped to its sequence; -1 pads) and the
    feature's activation at every token of the window, from the stored codes."""
    before, after = window
    width = before + 1 + after
    d_sae, n_ctx = chosen_rows.shape
    tokens = cache.tokens.reshape(-1).long()
    seq_len, n = cache.seq_len, values.shape[0]
    offsets = torch.arange(-before, after + 1)
    # Every nonzero (row, feature) of the codes under one sorted key: a window token's
    # activation of feature f is a binary search away (k× less work than scanning its code).
    # Rows are already in order, so sorting each row's k latents orders the keys globally.
    in_row, order = torch.sort(indices.long(), dim=1)
    # int32 keys when they fit: the binary search is cache-bound, and runs ~30% faster on them.
    key_dtype = torch.int32 if n * d_sae < 2**31 else torch.int64
    keys = (torch.arange(n, dtype=torch.int64).unsqueeze(1) * d_sae + in_row).to(key_dtype).reshape(-1)
    found_values = values.gather(1, order).reshape(-1)
    if not bool((found_values > 0).all()):  # a TopK code has no zeros to drop
        keys, found_values = keys[found_values > 0], found_values[found_values > 0]
    # Token ids in 2 bytes when the vocabulary allows (-1 pads): the largest table of the index.
    id_dtype = torch.int16 if int(tokens.max()) < 2**15 else torch.int32
    ctx_tokens = torch.full((d_sae, n_ctx, width), -1, dtype=id_dtype)
    ctx_acts = torch.zeros((d_sae, n_ctx, width), dtype=torch.float16)
    for f0 in tqdm(range(0, d_sae, features_per_block), desc="index: contexts", disable=not progress, unit="block"):
        f1 = min(f0 + features_per_block, d_sae)
        centre = chosen_rows[f0:f1]  # [F, C]
        at = centre.unsqueeze(-1) + offsets  # [F, C, W]
        same_seq = (centre.unsqueeze(-1) >= 0) & (at >= 0) & (at < n) & (at.div(seq_len, rounding_mode="floor")
                                                                          == centre.unsqueeze(-1).div(seq_len, rounding_mode="floor"))
        safe = torch.where(same_seq, at, torch.zeros_like(at))
        ctx_tokens[f0:f1] = torch.where(same_seq, tokens[safe], torch.full_like(safe, -1)).to(id_dtype)
        query = (safe * d_sae + torch.arange(f0, f1).view(-1, 1, 1)).to(key_dtype)
        slot = torch.searchsorted(keys, query).clamp_max(max(keys.numel() - 1, 0))
        hit = same_seq & (keys[slot] == query) if keys.numel() else torch.zeros_like(same_seq)
        ctx_acts[f0:f1] = torch.where(hit, found_values[slot] if keys.numel() else 0.0, 0.0).to(torch.float16)
    return {"context_rows": chosen_rows.numpy(), "context_values": chosen_values.numpy(),
            "context_tokens": ctx_tokens.numpy(), "context_acts": ctx_acts.numpy()}


@torch.no_grad()
def _decoder_tables(sae, model, n_related: int, block: int = 1024) -> dict:
    """Nearest features by decoder cosine; promoted/suppressed tokens when a model is given
    (for an attention-output SAE, through W_O, with each head's share of the decoder norm)."""
    W = sae.W_dec.detach().float().cpu()
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_sae, m = W.shape[0], min(n_related, W.shape[0] - 1)
    near_ids, near_cos = np.zeros((d_sae, m), np.int32), np.zeros((d_sae, m), np.float32)
    out = {}
    for f0 in range(0, d_sae, block):
        cos = unit[f0:f0 + block] @ unit.T
        cos[torch.arange(cos.shape[0]), torch.arange(f0, f0 + cos.shape[0])] = -math.inf  # not itself
        top = cos.topk(m, dim=1)
        near_ids[f0:f0 + block], near_cos[f0:f0 + block] = top.indices.numpy(), top.values.numpy()
    out.update(neighbour_ids=near_ids, neighbour_cos=near_cos)
    if model is not None and attention_layer(sae) is not None:
        out["head_share"] = head_attribution(sae, model.cfg.n_heads).cpu().numpy().astype(np.float32)
        W = decoder_in_residual(sae, model)  # the direction the layer writes into the residual stream
    if model is not None:
        W_U = model.W_U.detach().float().cpu()
        ln = getattr(model, "ln_final", None)
        scale = getattr(ln, "w", None)
        effective = W_U * scale.detach().float().cpu().unsqueeze(1) if scale is not None else W_U
        t = 10
        top_ids, top_val = np.zeros((d_sae, t), np.int32), np.zeros((d_sae, t), np.float32)
        bot_ids, bot_val = np.zeros((d_sae, t), np.int32), np.zeros((d_sae, t), np.float32)
        hist, edges = np.zeros((d_sae, 32), np.int32), np.zeros((d_sae, 2), np.float32)
        for f0 in range(0, d_sae, block):
            logits = W[f0:f0 + block] @ effective
            top, bottom = logits.topk(t, dim=1), logits.topk(t, dim=1, largest=False)
            top_ids[f0:f0 + block], top_val[f0:f0 + block] = top.indices.numpy(), top.values.numpy()
            bot_ids[f0:f0 + block], bot_val[f0:f0 + block] = bottom.indices.numpy(), bottom.values.numpy()
            lo, hi = logits.aminmax(dim=1)
            # Bin of each token's logit on 32 equal bins of [lo, hi], in place (the block is the big array).
            bucket = logits.sub_(lo[:, None]).mul_((32 / (hi - lo).clamp_min(1e-12))[:, None]).long().clamp_(max=31)
            rows = bucket.shape[0]
            bucket += 32 * torch.arange(rows).unsqueeze(1)  # one bincount for the whole block
            hist[f0:f0 + block] = torch.bincount(bucket.reshape(-1), minlength=rows * 32).reshape(rows, 32).numpy()
            edges[f0:f0 + block] = torch.stack([lo, hi], 1).numpy()
        out.update(logit_top_ids=top_ids, logit_top_values=top_val, logit_bottom_ids=bot_ids,
                   logit_bottom_values=bot_val, logit_histogram=hist, logit_range=edges)
    return out


def _correlations(values, indices, d_sae, n_related, correlation_rows, progress, block_bytes: int = 1 << 28) -> dict:
    """Top features by Pearson correlation of activations and by Jaccard co-occurrence, over
    evenly spaced rows. The Gram matrices Σ z_i z_j and Σ 1[z_i > 0]·1[z_j > 0] are sparse
    products Zᵀ Z of the rows' sparse codes (k² work per row instead of a d_sae² product);
    scores are then taken one block of features at a time, densely, so that a pair of
    features that never fire together still gets its (negative) correlation."""
    import scipy.sparse

    n = values.shape[0]
    rows = torch.linspace(0, n - 1, min(n, correlation_rows)).round().long().unique()
    v, i = values[rows].double(), indices[rows].long()
    r = rows.numel()
    keep = v > 0
    row_of = torch.arange(r).unsqueeze(1).expand_as(i)[keep].numpy()
    z = scipy.sparse.csr_matrix((v[keep].numpy(), (row_of, i[keep].numpy())), shape=(r, d_sae))
    # Both Grams share one sparsity pattern; the transpose is made once, in CSR (what the
    # product wants), and the co-occurrence counts are exact int32.
    zt = z.T.tocsr()
    fired_rows = scipy.sparse.csr_matrix((np.ones(z.nnz, np.int32), z.indices, z.indptr), shape=z.shape)
    fired_t = scipy.sparse.csr_matrix((np.ones(zt.nnz, np.int32), zt.indices, zt.indptr), shape=zt.shape)
    gram_all, both_all = zt @ z, fired_t @ fired_rows
    mean = torch.from_numpy(np.asarray(z.sum(0)).ravel()) / r
    sq = torch.from_numpy(np.asarray(z.multiply(z).sum(0)).ravel()) / r
    fired = torch.from_numpy(np.diff(zt.indptr)).double()
    std = (sq - mean * mean).clamp_min(0).sqrt()
    m = min(n_related, d_sae - 1)
    out = {name: np.zeros((d_sae, m), dtype) for name, dtype in (("correlated_ids", np.int32), ("correlated_r", np.float32),
                                                                 ("cooccurring_ids", np.int32), ("cooccurring_jaccard", np.float32))}
    block = max(1, min(d_sae, block_bytes // (16 * d_sae)))  # two dense float64 blocks [block, d_sae]
    for f0 in tqdm(range(0, d_sae, block), desc="index: correlations", disable=not progress, unit="block"):
        f1 = min(f0 + block, d_sae)
        own = torch.arange(f1 - f0)
        # In place: these blocks are the largest arrays of the build.
        pearson = torch.from_numpy(gram_all[f0:f1].toarray()).div_(r)
        pearson.sub_(torch.outer(mean[f0:f1], mean)).div_(torch.outer(std[f0:f1], std))
        both = torch.from_numpy(both_all[f0:f1].toarray()).double()
        jaccard = both.div_(fired[f0:f1, None] + fired[None, :] - both)
        for name, value_key, score in (("correlated", "correlated_r", pearson), ("cooccurring", "cooccurring_jaccard", jaccard)):
            score = torch.nan_to_num_(score, nan=-math.inf)
            score[own, own + f0] = -math.inf  # not itself
            top = score.topk(m, dim=1)
            out[f"{name}_ids"][f0:f1] = top.indices.numpy()
            out[value_key][f0:f1] = top.values.float().numpy()
    return out


def _sae_sha256(sae) -> str:
    digest = hashlib.sha256(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cache_sha256(cache) -> str:
    from ..trainer.run_folder import data_fingerprint  # the manifest's hash: changes with any byte of the cache

    return data_fingerprint(cache)["sha256"]


__all__ = ["FILES", "build_index"]
