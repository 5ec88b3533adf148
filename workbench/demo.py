"""The main job (``make demo``): an end-to-end tour of the workbench on the offline default model.

Each step prints what it did and what it measured; figures go to ``figures/``.
``WORKBENCH_QUICK=1`` shrinks the token counts (used by the test suite).
"""

from __future__ import annotations

import time
from pathlib import Path

from .settings import quick_mode

DEMO_PROMPT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
'''


def _say(step: str, message: str) -> None:
    print(f"[{step}] {message}", flush=True)


def _cache_stage(model, model_name: str) -> dict:
    """Cache two hooks (with loss gradients) of the default model, then stream them back."""
    import torch

    import workbench as wb
    from workbench.cache import ActivationCache, cache_activations
    from workbench.paths import cache_dir

    n_tokens = 8_192 if quick_mode() else 131_072
    hooks = ["blocks.1.mlp.hook_post", "blocks.2.hook_resid_post"]
    tokens = wb.load_tokens("stdlib", "train", n_tokens=n_tokens)
    folder = cache_dir() / "demo" / f"{model_name}-{tokens.numel()}"
    existed = (folder / "manifest.json").exists()
    started = time.perf_counter()
    cache_activations(model, tokens, hooks, folder, with_grads=True, progress=not quick_mode())
    cache = ActivationCache.open(folder)
    verb = "was already complete (re-running is a no-op)" if existed else f"written in {time.perf_counter() - started:.1f} s"
    _say("cache", f"{cache.n_tokens:,} tokens × {len(hooks)} hooks (+ loss gradients) at {folder}: {verb}")
    started = time.perf_counter()
    rows = sum(x.shape[0] for x, _ in cache.batches(hooks[1], 4096, with_grads=True))
    rate = rows / (time.perf_counter() - started)
    _say("cache", f"streamed one shuffled epoch of (x, grad) pairs: {rows:,} rows at {rate:,.0f} rows/s")
    x = cache.activations(hooks[0], [1234])
    ids, at = cache.context(1234, before=12, after=0)
    text = model.to_string(torch.tensor(ids))
    _say("cache", f"row 1234 ({hooks[0]}: {int((x > 0).sum())} of {x.shape[1]} neurons positive) is the last token of {text!r}")
    return {"cache_rows": cache.n_tokens, "cache_read_rows_per_s": rate, "cache_path": str(folder), "hook": hooks[1]}


def _sae_stage(model, cache_path: str, hook: str, out_dir) -> dict:
    """Train five SAEs on the cached hook in one pass; compare reconstruction and spliced-in CE."""
    import workbench as wb
    from workbench.sae.compare import compare_saes, comparison_table, plot_comparison

    cache = wb.ActivationCache.open(cache_path)
    d_sae, k = (256, 8) if quick_mode() else (1024, 16)
    configs = [wb.TrainConfig(architecture=arch, d_sae=d_sae, k=k, hook_name=hook, model_name=wb.DEFAULT_MODEL,
                              batch_size=1024, total_tokens=cache.n_tokens)
               for arch in ("topk", "batchtopk", "matryoshka", "gradient", "hierarchical")]
    started = time.perf_counter()
    saes = wb.train_saes(configs, cache, run_dir=wb.paths.cache_dir() / "demo" / "saes", progress=not quick_mode())
    _say("sae", f"trained {len(saes)} SAEs (d_sae={d_sae}, k={k}) on {cache.n_tokens:,} cached rows of {hook} "
         f"in one pass, {time.perf_counter() - started:.1f} s")
    val = wb.load_tokens("stdlib", "val", n_tokens=2_048 if quick_mode() else 16_384)
    rows = compare_saes(saes, cache, model=model, tokens=val, n_batches=2)
    for line in comparison_table(rows).splitlines():
        _say("sae", line)
    paths = wb.figures.save_figure(plot_comparison(rows), "demo_sae_comparison", out_dir=out_dir)
    _say("figure", f"wrote {', '.join(map(str, paths))}")
    return {"saes": rows}


def _feature_stage(model, out_dir) -> dict:
    """Index a shipped SAE's features on held-out text; print one feature's top contexts; a figure."""
    import matplotlib.pyplot as plt

    import workbench as wb
    from workbench.widgets.feature_browser import feature_data, plot_feature, search_features, vocabulary

    name = f"{wb.DEFAULT_MODEL}/blocks.2.hook_resid_post/topk-2048"
    sae, card = wb.load_sae(name), wb.sae_card(name)
    _say("features", f"{len(wb.list_saes())} shipped SAEs; {name}: held-out FVU {card.fvu:.3f}, L0 {card.l0:.1f}, "
         f"CE recovered {card.ce_recovered_vs_zero:.1%}")
    tokens = wb.load_tokens("stdlib", "val", n_tokens=8_192 if quick_mode() else 65_536)
    folder = wb.paths.cache_dir() / "demo" / f"features-{tokens.numel()}"
    started = time.perf_counter()
    cache = wb.ActivationCache.open(wb.cache_activations(model, tokens, [card.hook], folder, progress=False))
    index = wb.features.build_index(sae, cache, out_dir=folder / "index", model=model, progress=False)
    _say("features", f"indexed {index.d_sae:,} features over {index.n_rows:,} held-out rows in "
         f"{time.perf_counter() - started:.1f} s (cache and index)")
    vocab = vocabulary(model.tokenizer, model.cfg.d_vocab)
    found = search_features(index, " return", vocab, limit=1)
    feature = found[0][0] if found else int(max(range(index.d_sae), key=index.density))
    data = feature_data(index, feature, vocab)
    _say("features", f"feature {feature} (density {data['stats']['density']:.2%}, max {data['stats']['max']:.2f}); "
         "top contexts, [activating token]:")
    for context in data["contexts"][:3]:
        text = "".join(f"[{t}]" if i == context["centre"] else t for i, t in enumerate(context["tokens"]))
        _say("features", f"  {context['activation']:.2f}: {text!r}")
    if data["logits"]:
        _say("features", "promotes " + ", ".join(repr(t) for t, _ in data["logits"]["top"][:5]))
    fig = plot_feature(data)
    paths = wb.figures.save_figure(fig, "demo_feature", out_dir=out_dir)
    plt.close(fig)
    _say("figure", f"wrote {', '.join(map(str, paths))}")
    return {"feature": feature, "feature_density": data["stats"]["density"]}


def _circuit_stage(model, out_dir) -> dict:
    """One built-in task, its sparse feature circuit through the 12 shipped SAEs of the default
    model, faithfulness on held-out pairs, and a figure of the graph (notebook 06 does more)."""
    import matplotlib.pyplot as plt

    import workbench as wb
    from workbench.widgets import circuit_graph, plot_circuit

    started = time.perf_counter()
    saes = {hook: wb.load_sae(f"{wb.DEFAULT_MODEL}/{hook}/topk-2048")
            for hook in wb.circuits.circuit_hooks(model.cfg.n_layers)}
    n = 16 if quick_mode() else 64
    pairs = wb.circuits.task_pairs("brackets", model, n=2 * n)
    found_on, held_out = pairs.subset(range(n)), pairs.subset(range(n, 2 * n))
    performance = wb.circuits.task_performance(model, pairs)
    _say("circuit", f"task 'brackets' ({pairs.description}): {len(pairs)} pairs, accuracy {performance['accuracy']:.1%}, "
         f"logit difference {performance['logit_diff_clean']:+.2f} clean / {performance['logit_diff_patch']:+.2f} patch")
    circuit = wb.circuits.find_circuit(model, saes, found_on, method="ig", steps=4 if quick_mode() else 10,
                                       node_threshold=0.1, progress=False)
    _say("circuit", circuit.summary())
    curve = wb.circuits.faithfulness_curve(model, saes, held_out, circuit, [0.02, 0.05, 0.1], progress=False)
    for row in curve:
        _say("circuit", f"|effect| > {row['threshold']:g}: {row['nodes']} nodes keep {row['faithfulness']:.1%} of the "
             f"metric on {len(held_out)} held-out pairs (everything else mean-ablated); ablating them leaves "
             f"{row['completeness']:.1%}")
    fig = plot_circuit(circuit_graph(circuit, 0.4, 0.02))
    paths = wb.figures.save_figure(fig, "demo_circuit", out_dir=out_dir)
    plt.close(fig)
    _say("figure", f"wrote {', '.join(map(str, paths))}; circuit stage {time.perf_counter() - started:.1f} s")
    return {"circuit_faithfulness": curve}


def _sparsity_stage(out_dir) -> dict:
    """Activation sparsity of the three zoo models: lazy neurons, PPL-1%, two methods' curves,
    and ProSparse on the default model (the full study: ``python -m workbench sparsity``)."""
    import workbench as wb
    from workbench.sparsity.report import run_study

    started = time.perf_counter()
    small = quick_mode()
    tables = run_study(["stdlib-relu", "stdlib-gelu", "stdlib-swiglu"], parts=("lazy", "ppl", "curves"),
                       eval_tokens=2_048 if small else 16_384, calibration_tokens=2_048 if small else 8_192,
                       ps=(0.01,), methods=("cats", "wina"), targets=(0.5, 0.8), out_dir=out_dir,
                       say=lambda title, text: [_say("sparsity", line) for line in f"{title}\n{text}".splitlines()])
    tables.update(run_study([wb.DEFAULT_MODEL], parts=("prosparse",), out_dir=out_dir,
                            say=lambda title, text: [_say("prosparse", line) for line in f"{title}\n{text}".splitlines()]))
    ratios = {row["model"]: row["activation_ratio"] for row in tables["ppl"]}
    _say("sparsity", f"activation ratio at PPL-1% (searched on calibration tokens, measured on held-out ones): "
         f"ReLU {ratios['stdlib-relu']:.3f} vs SiLU (SwiGLU) "
         f"{ratios['stdlib-swiglu']:.3f} (the Sparsing Law direction: ReLU is sparser); "
         f"{time.perf_counter() - started:.1f} s")
    prosparse = {row["model"]: row for row in tables["prosparse"]}
    _say("prosparse", f"{wb.DEFAULT_MODEL}: activation ratio {prosparse['original']['activation_ratio']:.3f} → "
         f"{prosparse['prosparse']['activation_ratio']:.3f} at perplexity ×{prosparse['prosparse']['ppl_ratio']:.3f}")
    return {"sparsity_ppl": tables["ppl"], "prosparse": tables["prosparse"]}


def run_demo(out_dir: str | Path | None = None) -> dict:
    """Run every stage of the tour; returns the measured numbers (also printed)."""
    import workbench as wb
    from workbench.evals import model_loss

    started = time.perf_counter()
    results: dict = {}

    _say("zoo", f"offline models: {', '.join(wb.list_models())} (default {wb.DEFAULT_MODEL})")
    for name in wb.list_models():
        card = wb.model_card(name)
        _say(
            "zoo",
            f"{name}: val loss {card.val_loss_nats:.3f} nats/token, unigram entropy "
            f"{card.val_unigram_entropy_nats:.3f} ({card.loss_below_unigram:.2f} below), "
            f"{card.tokens_seen:,} tokens seen",
        )

    model = wb.load_model(wb.DEFAULT_MODEL)
    _say("model", f"loaded {wb.DEFAULT_MODEL} on {model.cfg.device}: {model.cfg.n_layers} layers, d_model={model.cfg.d_model}")

    card = wb.model_card(wb.DEFAULT_MODEL)
    # The card's evaluation set (the first eval_tokens of the split) so the numbers agree.
    n_tokens = 16_384 if quick_mode() else card.config["eval_tokens"]
    val = wb.load_tokens("stdlib", "val", n_tokens=n_tokens, seq_len=card.config["seq_len"])
    loss = model_loss(model, val)
    entropy = wb.unigram_entropy(val[:, 1:], model.cfg.d_vocab)
    results.update(val_loss=loss, unigram_entropy=entropy)
    _say("eval", f"validation loss on {val.numel():,} held-out tokens: {loss:.3f} nats/token "
         f"(unigram entropy {entropy:.3f}: the model uses context worth {entropy - loss:.2f} nats/token)")

    report = wb.prompt_report(model, DEMO_PROMPT)
    results["prompt_mean_loss"] = report.mean_loss
    guesses = ", ".join(f"{tok!r} ({p:.2f})" for tok, p in report.top_predictions[-1][:3])
    _say("prompt", f"{len(report.tokens)} tokens, mean loss {report.mean_loss:.3f} nats; next-token guesses: {guesses}")

    fig = wb.plot_token_losses(report)
    paths = wb.figures.save_figure(fig, "demo_loss_per_token", out_dir=out_dir)
    results["figures"] = [str(p) for p in paths]
    _say("figure", f"wrote {', '.join(map(str, paths))}")

    results.update(_cache_stage(model, wb.DEFAULT_MODEL))
    results.update(_sae_stage(model, results["cache_path"], results["hook"], out_dir))
    results.update(_feature_stage(model, out_dir))
    results.update(_circuit_stage(model, out_dir))
    results.update(_sparsity_stage(out_dir))

    results["seconds"] = time.perf_counter() - started
    _say("done", f"demo finished in {results['seconds']:.1f} s")
    return results
