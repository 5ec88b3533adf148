"""Sparse feature circuits: attribution (AtP, IG) against the exact activation patching it
approximates, on the default model with its 12 shipped SAEs, in one run.

    .venv/bin/python benchmarks/bench_circuits.py [--pairs 64]

For the built-in task ``brackets`` (pairs found on; aggregated over positions):
- ours: ``find_circuit`` node effects of every feature and error node of the 12 modules
  (AtP: one forward/backward per batch; IG: 10 steps per module), and the direct edges into
  the nodes above the threshold;
- exact: activation patching of the nodes whose value changes between clean and patch
  prompts (one forward per node and batch; a node that never changes has effect 0, so this
  baseline already skips the nodes it could not know to skip: it favours exact patching):
  a random sample of them per module (``--exact-per-module``, all when fewer) is patched and
  timed, and the time of patching all of them is that per-node time × their count (said so
  in the table); exact edges (path patching, two forwards per edge) likewise from the
  measured cost of a forward;
- agreement: Pearson r of AtP and IG with the exact effects over the sampled nodes, per
  module type;
- faithfulness of the IG circuit on held-out pairs, over node thresholds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import machine, table, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--task", default="brackets")
    parser.add_argument("--exact-per-module", type=int, default=100)
    args = parser.parse_args()
    import workbench as wb
    from workbench.circuits import (changed_nodes, circuit_hooks, circuit_modules, exact_node_effects, faithfulness_curve, find_circuit,
                                    task_pairs, task_performance)

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = wb.load_model(device="cpu")
    hooks = circuit_hooks(model.cfg.n_layers)
    saes = {hook: wb.load_sae(f"{wb.DEFAULT_MODEL}/{hook}/topk-2048", device="cpu").eval() for hook in hooks}
    pairs = task_pairs(args.task, model, n=2 * args.pairs)
    found_on, held_out = pairs.subset(range(args.pairs)), pairs.subset(range(args.pairs, 2 * args.pairs))
    performance = task_performance(model, pairs)

    timings, circuits = {}, {}
    for method, steps in (("atp", 1), ("ig", 10)):
        started = time.perf_counter()
        nodes_only = find_circuit(model, saes, found_on, method=method, steps=steps, edges=False, progress=False)
        timings[f"{method} nodes"] = time.perf_counter() - started
        started = time.perf_counter()
        circuits[method] = find_circuit(model, saes, found_on, method=method, steps=steps, node_threshold=0.1,
                                        progress=False)
        timings[f"{method} nodes + edges"] = time.perf_counter() - started
        assert torch.allclose(nodes_only.feature_effects[hooks[0]], circuits[method].feature_effects[hooks[0]])
        print(method, timings, circuits[method].summary(), flush=True)

    import random

    changed = changed_nodes(model, saes, found_on)
    n_changed = sum(len(nodes) + 1 for nodes in changed.values())  # + each error node
    rng = random.Random(0)
    started = time.perf_counter()
    rows = []
    for module in circuit_modules(saes):
        candidates = changed[module.hook]
        nodes = rng.sample(candidates, min(len(candidates), args.exact_per_module)) + [
            wb.circuits.Node(module.hook, None, None)]
        for node, exact in zip(nodes, exact_node_effects(model, saes[module.hook], module.hook, found_on, nodes)):
            rows.append((module.kind, exact, circuits["atp"].node_effect(node), circuits["ig"].node_effect(node)))
    n_exact = len(rows)
    exact_s = (time.perf_counter() - started) / n_exact * n_changed  # all changed nodes, at the measured rate
    print("exact", n_exact, exact_s, flush=True)
    started = time.perf_counter()
    with torch.no_grad():
        for batch in found_on.batches(64):
            model(batch.clean)
    forward_s = time.perf_counter() - started

    def pearson(kind: str | None, method: int) -> float:
        mine = [r for r in rows if kind is None or r[0] == kind]
        values = torch.tensor([[r[1], r[method]] for r in mine], dtype=torch.float64).T
        return float(torch.corrcoef(values)[0, 1])

    curve = faithfulness_curve(model, saes, held_out, circuits["ig"], [0.01, 0.02, 0.05, 0.1, 0.2, 0.5], progress=False)
    n_edges = len(circuits["ig"].edges)
    total_nodes = sum(sae.cfg.d_sae + 1 for sae in saes.values())

    head = (f"`.venv/bin/python benchmarks/bench_circuits.py --pairs {args.pairs}` on {machine()}. Default model "
            f"({wb.DEFAULT_MODEL}), its 12 shipped TopK SAEs (attn_out, mlp_out, resid_post of each block; "
            f"{total_nodes:,} nodes with the error nodes), task `{args.task}` ({performance['accuracy']:.1%} accuracy, "
            f"logit difference {performance['logit_diff_clean']:+.2f} / {performance['logit_diff_patch']:+.2f} on "
            f"{len(pairs)} pairs): the circuit is found on {len(found_on)} pairs, faithfulness measured on the other "
            f"{len(held_out)}. Node effects aggregated over positions; edges into the nodes with |effect| > 0.1. "
            f"Exact patching: {n_changed:,} nodes change between clean and patch prompts (the rest have effect 0 by "
            "construction: skipping them favours exact patching); a random sample of "
            f"{n_exact:,} of them (up to {args.exact_per_module} per module, plus each error node) was patched and "
            f"timed, and the time for all {n_changed:,} is that rate × their count; exact edges are estimated at 2 "
            f"forwards each ({forward_s * 1000:.0f} ms per forward over the pairs).\n\n")
    speed = table(["what", "time", "vs exact patching of the same"], [
        ["AtP, all node effects", f"{timings['atp nodes']:.1f} s", f"**{exact_s / timings['atp nodes']:.0f}×** faster "
         f"than {n_changed:,} exact node patches ({exact_s:.0f} s at the rate measured on {n_exact:,})"],
        ["IG (10 steps), all node effects", f"{timings['ig nodes']:.1f} s",
         f"**{exact_s / timings['ig nodes']:.0f}×** faster"],
        ["IG nodes + direct edges", f"{timings['ig nodes + edges']:.1f} s ({n_edges:,} edges)",
         f"~{(exact_s + 2 * n_edges * forward_s) / timings['ig nodes + edges']:.0f}× (edges estimated: "
         f"{2 * n_edges * forward_s:.0f} s)"],
        ["AtP nodes + direct edges", f"{timings['atp nodes + edges']:.1f} s ({len(circuits['atp'].edges):,} edges)", ""],
    ])
    agreement = table(["module type", "nodes", "r (AtP vs exact)", "r (IG vs exact)"],
                      [[kind, sum(r[0] == kind for r in rows), f"{pearson(kind, 2):.4f}", f"{pearson(kind, 3):.4f}"]
                       for kind in ("attn", "mlp", "resid")]
                      + [["all", n_exact, f"{pearson(None, 2):.4f}", f"{pearson(None, 3):.4f}"]])
    faithful = table(["node threshold", "nodes", "faithfulness F(C)", "completeness F(M \\ C)"],
                     [[f"{r['threshold']:g}", r["nodes"], f"{r['faithfulness']:.3f}", f"{r['completeness']:.3f}"]
                      for r in curve])
    write_section("bench_circuits", "## bench_circuits: attribution vs exact activation patching\n\n" + head + speed
                  + "\n\nAgreement with exact patching (the sampled nodes):\n\n" + agreement
                  + f"\n\nFaithfulness of the IG circuit on the {len(held_out)} held-out pairs (everything outside the "
                    "circuit mean-ablated to its mean over the held-out clean prompts, per position; m(M) "
                    f"{curve[0]['metric_full']:.2f}, m(∅) {curve[0]['metric_empty']:.2f}):\n\n" + faithful + "\n")


if __name__ == "__main__":
    main()
