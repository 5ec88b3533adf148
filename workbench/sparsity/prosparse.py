"""ProSparse: ReLU-fy a model, then train its MLPs to be sparse (Song et al. 2024, "ProSparse:
Introducing and Enhancing Intrinsic Activation Sparsity within Large Language Models").

The paper's recipe has three steps (§3.2), all here:

1. **Activation function substitution.** The MLP activation becomes ReLU (for gated MLPs the
   gate's: x1 = ReLU(W_gate x) ⊙ (W_in x)), followed by continual training with the LM loss
   alone (``relu_tokens``).
2. **Progressive sparsity regularization.** Training continues on L = L_LM + λ(t)·L1, with L1
   the mean |x1| of the MLP hidden activation (``blocks.ℓ.mlp.hook_post``, the x1 of CETT in
   DESIGN.md), averaged over tokens, neurons and layers, so λ does not scale with the model's
   width or depth. (The paper regularises "the sparse intermediate outputs of FFNs"; on a
   gated MLP x1 = ReLU(gate) ⊙ up is zero exactly where the gate is.) λ is a small constant
   in a warmup stage, then rises in incremental stages: within stage i it climbs along a
   quarter sine from the previous factor λ_{i−1} to the stage's peak λ_i,
       λ(t) = λ_{i−1} + (λ_i − λ_{i−1}) · sin(π/2 · (t − T_{i−1}) / (T_i − T_{i−1})),
   reaching λ_i at the stage's end, and it stays at the last peak afterwards (``hold_tokens``).
   Rising smoothly, in steps, gives the activations time to adapt instead of shifting
   abruptly, which is what costs a fixed L1 factor its perplexity (the paper's "Fixed L1"
   baseline).
3. **Activation threshold shifting.** ReLU becomes FATReLU(x) = x·1[x > t] (Kurtz et al.
   2020) with a small threshold t (0.01 for ProSparse-LLaMA-2), pruning weak activations at
   inference without further training (``fatrelu_threshold``).

``prosparse(model_or_name, config)`` runs all three and measures, on validation tokens, the
activation ratio (mean fraction of x1 entries that are nonzero, ``lazy_neuron_stats``) and
the loss (``model_loss``) of the original model, right after the swap, after training and
after FATReLU. Training follows the zoo's recipe (``train.py``): AdamW, linear warmup then
cosine decay of the learning rate, gradient clipping, seeded token order and
``torch.use_deterministic_algorithms``.

TransformerLens detail. ``MLP`` and ``GatedMLP`` call ``self.act_fn`` (a plain attribute,
picked from ``cfg.act_fn`` at construction), so the swap sets that attribute on every MLP and
``cfg.act_fn = "relu"`` (the config is shared by the model and its blocks). A gated MLP adds
``b_in`` *inside* x1 (x1 = act(gate) ⊙ up + b_in): with it, x1 has no exact zeros and L1 would
pull x1 towards −b_in rather than to zero. LLaMA-style MLPs, ProSparse's subject, have no such
bias, so the swap folds it into ``b_out`` (out = W_out x1 + b_out is unchanged) and freezes it
at zero.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..data import load_tokens
from ..evals import model_loss
from ..settings import quick_mode
from ..zoo.specs import DEFAULT_MODEL, ZOO
from ..zoo.train import _lr_at
from .lazy import lazy_neuron_stats
from .mlp import describe_mlps

log = logging.getLogger(__name__)


def _sized(full, quick):
    """A dataclass default read when the config is made: ``quick`` under WORKBENCH_QUICK=1."""
    return field(default_factory=lambda: quick if quick_mode() else full)


@dataclass(frozen=True)
class ProSparseConfig:
    """The ProSparse recipe. Token counts include BOS; defaults take a few minutes on 2 CPU
    cores for a zoo model (WORKBENCH_QUICK=1: well under a minute)."""

    relu_tokens: int = _sized(65_536, 4_096)
    """Step 1: tokens of continual training right after the ReLU swap, λ = 0."""
    warmup_tokens: int = _sized(65_536, 4_096)
    """Step 2, warmup stage: tokens trained at the constant factor ``warmup_lambda``."""
    warmup_lambda: float = 0.5
    """λ_0, the warmup stage's constant L1 factor (the paper's "small constant")."""
    stages: tuple[tuple[int, float], ...] = _sized(((98_304, 2.0), (98_304, 4.0), (98_304, 8.0)),
                                                   ((8_192, 2.0), (8_192, 4.0), (8_192, 8.0)))
    """Step 2, incremental stages: (tokens, peak λ_i) each. λ rises along a quarter sine from
    the previous factor to λ_i over the stage's tokens; peaks must not decrease."""
    hold_tokens: int = _sized(65_536, 4_096)
    """Tokens trained after the last stage, λ held at the last peak."""
    fatrelu_threshold: float | None = None
    """Step 3: FATReLU threshold t applied after training (x1 kept where the pre-activation
    is > t); None skips the step. The paper uses 0.01 on LLaMA-2."""
    lr: float = 1e-3
    """Peak learning rate (AdamW); the zoo models were trained at 3e-3."""
    warmup_steps: int = _sized(10, 4)
    """Steps of linear learning-rate warmup; then cosine decay to 10% of ``lr``."""
    weight_decay: float = 0.1
    """AdamW decay of the weight matrices (not embeddings, biases or norms), as in the zoo.
    It also keeps the MLP from dodging L1 by shrinking x1 and growing W_out."""
    batch_size: int = _sized(32, 8)
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence (when the tokens are loaded here)."""
    seed: int = 0
    """Seeds the token order (and anything random in training)."""
    eval_tokens: int = _sized(65_536, 8_192)
    """Validation tokens for the loss and activation-ratio measurements (rows spread evenly
    over the stdlib val split when the tokens are loaded here)."""

    def __post_init__(self):
        for name in ("relu_tokens", "warmup_tokens", "hold_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        object.__setattr__(self, "stages", tuple((int(t), float(p)) for t, p in self.stages))
        previous = self.warmup_lambda
        if previous < 0:
            raise ValueError(f"warmup_lambda must be ≥ 0, got {previous}")
        for i, (tokens, peak) in enumerate(self.stages, start=1):
            if tokens <= 0:
                raise ValueError(f"stage {i} has {tokens} tokens: give every stage a positive token count")
            if peak < previous:
                raise ValueError(f"stage {i}'s peak λ={peak} is below the factor before it ({previous}): "
                                 "ProSparse's factor only rises, so list the peaks in non-decreasing order")
            previous = peak
        if self.total_tokens <= 0:
            raise ValueError("the schedule trains on no tokens: give relu_tokens, warmup_tokens, stages or hold_tokens")
        if self.fatrelu_threshold is not None and self.fatrelu_threshold < 0:
            raise ValueError(f"fatrelu_threshold must be ≥ 0 (or None to skip step 3), got {self.fatrelu_threshold}")
        if self.lr <= 0 or self.batch_size < 1 or self.seq_len < 2 or self.eval_tokens < self.seq_len:
            raise ValueError("need lr > 0, batch_size ≥ 1, seq_len ≥ 2 and eval_tokens ≥ seq_len")

    @property
    def total_tokens(self) -> int:
        """All training tokens: ReLU continual training, warmup, stages and hold."""
        return self.relu_tokens + self.warmup_tokens + sum(t for t, _ in self.stages) + self.hold_tokens

    def unregularized(self) -> ProSparseConfig:
        """The same training with λ = 0 throughout: the control that isolates what L1 adds."""
        return dataclasses.replace(self, warmup_lambda=0.0, stages=tuple((t, 0.0) for t, _ in self.stages))


# --- the λ schedule -----------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One piece of the schedule: λ goes from ``lambda_start`` to ``lambda_end`` along a quarter
    sine over tokens [start, end) (constant where the two are equal)."""

    name: str
    start: int
    end: int
    lambda_start: float
    lambda_end: float


def schedule_stages(config: ProSparseConfig) -> list[Stage]:
    """The schedule as stages: ``relu`` (λ = 0), ``warmup`` (λ_0), ``stage 1..n`` (rising),
    ``hold`` (last peak). Stages with no tokens are left out."""
    pieces = [("relu", config.relu_tokens, 0.0, 0.0),
              ("warmup", config.warmup_tokens, config.warmup_lambda, config.warmup_lambda)]
    previous = config.warmup_lambda
    for i, (tokens, peak) in enumerate(config.stages, start=1):
        pieces.append((f"stage {i}", tokens, previous, peak))
        previous = peak
    pieces.append(("hold", config.hold_tokens, previous, previous))
    stages, start = [], 0
    for name, tokens, lam_start, lam_end in pieces:
        if tokens > 0:
            stages.append(Stage(name, start, start + tokens, lam_start, lam_end))
            start += tokens
    return stages


def lambda_schedule(tokens_seen: float, config: ProSparseConfig) -> float:
    """λ(t) after ``tokens_seen`` training tokens: the ProSparse factor (Song et al. 2024, §3.2).

    Inside a stage [T_{i−1}, T_i): λ_{i−1} + (λ_i − λ_{i−1})·sin(π/2·(t − T_{i−1})/(T_i − T_{i−1}));
    at and after the end of training, the last peak.
    """
    if tokens_seen < 0:
        raise ValueError(f"tokens_seen must be ≥ 0, got {tokens_seen}")
    stages = schedule_stages(config)
    for stage in stages:
        if tokens_seen < stage.end:
            progress = (tokens_seen - stage.start) / (stage.end - stage.start)
            return stage.lambda_start + (stage.lambda_end - stage.lambda_start) * math.sin(math.pi / 2 * progress)
    return stages[-1].lambda_end


# --- activation substitution (steps 1 and 3) ----------------------------------------------


class FATReLU:
    """FATReLU_t(x) = x·1[x > t] (Kurtz et al. 2020): ReLU with its threshold shifted to t ≥ 0.

    A plain callable, not a module, so the model's ``state_dict`` is unchanged; t = 0 is ReLU.
    """

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"the FATReLU threshold must be ≥ 0, got {threshold}")
        self.threshold = float(threshold)

    def __call__(self, x: Tensor) -> Tensor:
        return x.masked_fill(x <= self.threshold, 0.0)

    def __repr__(self) -> str:
        return f"FATReLU(threshold={self.threshold:g})"


def substitute_relu(model, threshold: float = 0.0):
    """Swap every MLP's activation for ReLU (``threshold`` > 0: FATReLU), in place; returns it.

    Weights are untouched, except that a gated MLP's ``b_in`` (added inside x1 by
    TransformerLens) is folded into ``b_out`` and frozen at zero, so that x1 = ReLU(gate) ⊙ up
    has exact zeros and the function is unchanged (see the module docstring).
    """
    if getattr(model.cfg, "is_layer_norm_activation", lambda: False)():
        raise NotImplementedError(f"act_fn={model.cfg.act_fn!r} normalises x1 after the activation; "
                                  "ReLU-fying it is not supported")
    act = F.relu if threshold == 0 else FATReLU(threshold)
    for site in describe_mlps(model):
        mlp = site.module
        if site.gated and bool((mlp.b_in != 0).any()):
            with torch.no_grad():
                mlp.b_out += mlp.b_in @ mlp.W_out
                mlp.b_in.zero_()
        if site.gated:
            mlp.b_in.requires_grad_(False)
        mlp.act_fn = act
    # The config is shared with every block; "relu" also describes FATReLU's family (the
    # threshold lives on the modules' act_fn), and keeps the config valid for TransformerLens.
    model.cfg.act_fn = "relu"
    return model


# --- measurements and results -------------------------------------------------------------


@dataclass
class Measurement:
    """Loss and activation sparsity of one version of the model on the validation tokens."""

    label: str
    val_loss: float
    """Mean next-token loss, nats/token (``model_loss``)."""
    activation_ratio: float
    """Mean over layers and tokens of the fraction of x1 entries that are nonzero (1 − sparsity)."""
    layer_activation_ratio: list[float]
    positive_pre_fraction: float
    """Fraction of (gate) pre-activations > 0: the firing proxy for never-zero GELU/SiLU."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.val_loss)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.activation_ratio


@torch.no_grad()
def measure(model, val_tokens: Float[Tensor, "n_seq seq_len"], label: str = "") -> Measurement:
    """Validation loss and activation ratio of ``model`` on ``val_tokens``."""
    was_training = model.training
    model.eval()
    try:
        stats = lazy_neuron_stats((model, val_tokens))
        loss = model_loss(model, val_tokens)
    finally:
        model.train(was_training)
    ratios = [s.nonzero_fraction for s in stats]
    return Measurement(label=label, val_loss=loss, activation_ratio=sum(ratios) / len(ratios), layer_activation_ratio=ratios,
                       positive_pre_fraction=sum(s.positive_pre_fraction for s in stats) / len(stats))


@dataclass
class TrainingRecord:
    """One training step: the schedule's values and the two loss terms on that batch."""

    step: int
    tokens_seen: int
    """Training tokens after this step."""
    lam: float
    lr: float
    lm_loss: float
    l1: float
    """Mean |x1| over the batch's tokens, neurons and layers (the regularised quantity)."""
    activation_ratio: float
    """Fraction of the batch's x1 entries that are nonzero."""


@dataclass
class ProSparseResult:
    """The ProSparse-trained model and what it cost and gained."""

    model: object = field(repr=False)
    """The trained ``HookedTransformer`` (with FATReLU when a threshold was given)."""
    config: ProSparseConfig
    measurements: dict[str, Measurement]
    """``original``, ``relu`` (swapped, untrained), ``prosparse`` (trained) and, with a
    threshold, ``fatrelu``, in that order."""
    schedule: list[Stage]
    history: list[TrainingRecord] = field(repr=False)
    train_seconds: float
    seconds: float
    """Wall time of the whole call, measurements included."""

    @property
    def final(self) -> Measurement:
        """The last measurement: FATReLU's if applied, else the trained model's."""
        return list(self.measurements.values())[-1]

    @property
    def ppl_ratio(self) -> float:
        """Perplexity of the final model over the original's: exp(loss_final − loss_original)."""
        return math.exp(self.final.val_loss - self.measurements["original"].val_loss)

    def summary(self) -> str:
        """What the numbers mean, in two sentences (for a notebook or a log)."""
        original, relu, final = self.measurements["original"], self.measurements.get("relu"), self.final
        fewer = original.activation_ratio / max(final.activation_ratio, 1e-12)
        text = (f"ProSparse left {final.activation_ratio:.1%} of the MLP activations nonzero (from "
                f"{original.activation_ratio:.1%}: {fewer:.1f}× fewer active neurons, so a sparse kernel reads that "
                f"much less of W_out) at {self.ppl_ratio - 1:+.1%} perplexity on held-out validation tokens "
                f"(loss {original.val_loss:.3f} → {final.val_loss:.3f} nats).")
        if relu is not None:
            text += (f" The ReLU swap alone, before training, gives {relu.activation_ratio:.1%} at "
                     f"{math.exp(relu.val_loss - original.val_loss) - 1:+.1%}: the fine-tuning with the rising L1 "
                     "penalty is what buys sparsity back at a bearable cost. This fine-tuning is far shorter than the paper's, on "
                     "a 4-layer model, so read the trade-off, not the exact numbers.")
        return text

    def table(self) -> list[dict]:
        """One row per measurement (e.g. ``pandas.DataFrame(result.table())``)."""
        original = self.measurements["original"].val_loss
        return [{"model": m.label, "activation_ratio": m.activation_ratio, "sparsity": m.sparsity, "val_loss": m.val_loss,
                 "ppl_ratio": math.exp(m.val_loss - original)} for m in self.measurements.values()]


# --- training -----------------------------------------------------------------------------


def _optimizer(model, config: ProSparseConfig) -> torch.optim.Optimizer:
    """AdamW as the zoo trains: decay on weight matrices only; frozen parameters left out."""
    groups: dict[bool, list] = {True: [], False: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[param.ndim >= 2 and not name.startswith(("embed", "pos_embed"))].append(param)
    return torch.optim.AdamW([{"params": groups[True], "weight_decay": config.weight_decay},
                              {"params": groups[False], "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


def _row_order(n_rows: int, n_needed: int, seed: int) -> Tensor:
    """Row indices for training: seeded permutations, one per pass over the rows."""
    generator = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(n_rows, generator=generator) for _ in range(-(-n_needed // n_rows))]
    return torch.cat(passes)[:n_needed]


def _train(model, tokens: Tensor, config: ProSparseConfig, progress: bool) -> list[TrainingRecord]:
    batch_tokens = config.batch_size * tokens.shape[1]
    n_steps = -(-config.total_tokens // batch_tokens)
    order = _row_order(tokens.shape[0], n_steps * config.batch_size, config.seed)
    optimizer = _optimizer(model, config)
    captured: list[Tensor] = []
    hooks = [(site.hook_post, lambda act, hook: captured.append(act)) for site in describe_mlps(model)]
    history = []
    model.train()
    with model.hooks(fwd_hooks=hooks):
        bar = tqdm(range(n_steps), desc="prosparse", unit="step", disable=not progress)
        for step in bar:
            lam = lambda_schedule(step * batch_tokens, config)  # λ at the tokens seen before this step
            lr = _lr_at(step, n_steps, config)  # the zoo's warmup + cosine; reads config.lr and .warmup_steps
            for group in optimizer.param_groups:
                group["lr"] = lr
            captured.clear()
            batch = tokens[order[step * config.batch_size:(step + 1) * config.batch_size]].to(model.cfg.device)
            lm_loss = model(batch, return_type="loss")
            # L1 on x1, averaged over tokens and neurons of each layer, then over layers.
            l1 = torch.stack([x1.abs().mean() for x1 in captured]).mean()
            loss = lm_loss + lam * l1 if lam > 0 else lm_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                ratio = float(torch.stack([(x1 != 0).float().mean() for x1 in captured]).mean())
            history.append(TrainingRecord(step=step, tokens_seen=(step + 1) * batch_tokens, lam=lam, lr=lr,
                                          lm_loss=lm_loss.item(), l1=l1.item(), activation_ratio=ratio))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{history[-1].lm_loss:.3f}", lam=f"{lam:.3g}", active=f"{ratio:.3f}")
    model.eval()
    return history


def _spread_rows(rows: Tensor, n: int) -> Tensor:
    """``n`` rows spread evenly over ``rows``: the whole split in miniature (its first rows
    are a few files only, easier than the rest)."""
    return rows[torch.linspace(0, rows.shape[0] - 1, min(n, rows.shape[0])).round().long()]


def prosparse(model_or_name=DEFAULT_MODEL, config: ProSparseConfig | None = None, tokens: Tensor | None = None,
              val_tokens: Tensor | None = None, progress: bool = True) -> ProSparseResult:
    """ProSparse a model: ReLU swap, progressive L1 training, optional FATReLU; measured.

    ``model_or_name``: a zoo name (loaded on CPU) or a ``HookedTransformer``, which is copied,
    never changed. ``tokens`` [n_seq, seq_len] are the training rows (default: the stdlib train
    split, enough for ``config.total_tokens``; cycled in seeded passes when too few) and
    ``val_tokens`` the measurement rows (default: ``config.eval_tokens`` of the val split); a
    model outside the zoo has another tokenizer, so it needs both.
    """
    from ..models import load_model

    config = config or ProSparseConfig()
    started = time.perf_counter()
    model = load_model(model_or_name, device="cpu") if isinstance(model_or_name, str) else copy.deepcopy(model_or_name)
    if (tokens is None or val_tokens is None) and model.cfg.model_name not in ZOO:
        raise ValueError(f"{model.cfg.model_name!r} is not a zoo model: pass tokens= and val_tokens= in its own tokenization")
    if tokens is None:
        tokens = load_tokens("stdlib", "train", n_tokens=config.total_tokens, seq_len=config.seq_len)
    if val_tokens is None:
        val_tokens = _spread_rows(load_tokens("stdlib", "val", seq_len=config.seq_len), config.eval_tokens // config.seq_len)

    measurements = {"original": measure(model, val_tokens, "original")}
    substitute_relu(model)
    measurements["relu"] = measure(model, val_tokens, "relu")

    torch.manual_seed(config.seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # Bit-identical reruns, as zoo/train.py; CUDA needs CUBLAS_WORKSPACE_CONFIG for that, so warn only there.
    torch.use_deterministic_algorithms(True, warn_only=str(model.cfg.device) != "cpu")
    train_started = time.perf_counter()
    try:
        history = _train(model, tokens, config, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    train_seconds = time.perf_counter() - train_started
    measurements["prosparse"] = measure(model, val_tokens, "prosparse")

    if config.fatrelu_threshold is not None:
        substitute_relu(model, config.fatrelu_threshold)
        measurements["fatrelu"] = measure(model, val_tokens, f"fatrelu(t={config.fatrelu_threshold:g})")
    result = ProSparseResult(model=model, config=config, measurements=measurements, schedule=schedule_stages(config),
                             history=history, train_seconds=train_seconds, seconds=time.perf_counter() - started)
    log.info("prosparse: activation ratio %.3f → %.3f, val loss %.3f → %.3f (ppl ×%.3f) in %.0f s",
             measurements["original"].activation_ratio, result.final.activation_ratio,
             measurements["original"].val_loss, result.final.val_loss, result.ppl_ratio, result.seconds)
    return result
