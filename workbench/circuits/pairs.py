"""Contrastive prompt pairs and the metric a circuit explains.

A pair is a clean prompt, whose answer the model should give, and a patch prompt that
differs minimally and calls for another answer (Marks et al. 2024, §3: e.g. subject-verb
agreement with the subject's number flipped). Both have the same length, so a feature at
position p of one is compared with position p of the other. The default metric is the
logit difference m = logit(clean answer) − logit(patch answer) at the last position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ContrastivePairs:
    clean: Tensor  # [n, pos] token ids
    patch: Tensor  # [n, pos]
    clean_answer: Tensor  # [n] the token the clean prompt calls for
    patch_answer: Tensor  # [n] the token the patch prompt calls for
    name: str = "pairs"
    description: str = ""
    texts: list[tuple[str, str]] = field(default_factory=list, repr=False)  # (clean, patch) as text, when known

    def __post_init__(self) -> None:
        self.clean, self.patch = torch.as_tensor(self.clean).long(), torch.as_tensor(self.patch).long()
        self.clean_answer = torch.as_tensor(self.clean_answer).long().reshape(-1)
        self.patch_answer = torch.as_tensor(self.patch_answer).long().reshape(-1)
        if self.clean.ndim != 2 or self.clean.shape != self.patch.shape:
            raise ValueError(f"clean and patch must be token ids of one shape [n_pairs, positions] (pairs of equal "
                             f"length); got {tuple(self.clean.shape)} and {tuple(self.patch.shape)}. Pad or drop the "
                             "pairs whose prompts tokenize to different lengths.")
        n = self.clean.shape[0]
        if n == 0:
            raise ValueError("no pairs given")
        if self.clean_answer.shape != (n,) or self.patch_answer.shape != (n,):
            raise ValueError(f"clean_answer and patch_answer need one token id per pair ({n}); got "
                             f"{tuple(self.clean_answer.shape)} and {tuple(self.patch_answer.shape)}")
        if bool((self.clean_answer == self.patch_answer).any()):
            raise ValueError("a pair's clean and patch answers are the same token: its logit difference is 0 "
                             "whatever the model does; drop it")

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def positions(self) -> int:
        return self.clean.shape[1]

    def subset(self, rows) -> "ContrastivePairs":
        rows = torch.as_tensor(rows, dtype=torch.long)
        texts = [self.texts[i] for i in rows.tolist()] if self.texts else []
        return ContrastivePairs(self.clean[rows], self.patch[rows], self.clean_answer[rows], self.patch_answer[rows],
                                self.name, self.description, texts)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.subset(range(start, min(start + batch_size, len(self))))

    def position_labels(self, tokenizer) -> list[str]:
        """A label per position for figures: the first pair's clean token, or "clean/patch"
        where the pair differs (for templated pairs: the slot that changes)."""
        labels = []
        for c, p in zip(self.clean[0].tolist(), self.patch[0].tolist()):
            clean, patch = tokenizer.decode([c]), tokenizer.decode([p])
            labels.append(clean if c == p else f"{clean}/{patch}")
        return labels


def logit_diff(logits: Tensor, pairs: ContrastivePairs) -> Tensor:
    """logit(clean answer) − logit(patch answer) at the last position, one value per pair."""
    last = logits[:, -1]
    return (last.gather(1, pairs.clean_answer[:, None].to(last.device))
            - last.gather(1, pairs.patch_answer[:, None].to(last.device)))[:, 0]


@torch.no_grad()
def task_performance(model, pairs: ContrastivePairs, batch_size: int = 64) -> dict:
    """How well the model solves the task. ``accuracy``: the fraction of the 2n prompts on
    which the answer the prompt calls for beats the other one (clean prompts: clean answer;
    patch prompts: patch answer); ``both_correct``: pairs right on both sides; and the mean
    logit difference logit(clean answer) − logit(patch answer) on each side."""
    clean, patch = [], []
    for batch in pairs.batches(batch_size):
        clean.append(logit_diff(model(batch.clean.to(model.cfg.device)), batch).cpu())
        patch.append(logit_diff(model(batch.patch.to(model.cfg.device)), batch).cpu())
    clean, patch = torch.cat(clean), torch.cat(patch)
    right_clean, right_patch = (clean > 0).float(), (patch < 0).float()
    return {"pairs": len(pairs), "accuracy": float((right_clean.mean() + right_patch.mean()) / 2),
            "clean_accuracy": float(right_clean.mean()), "patch_accuracy": float(right_patch.mean()),
            "both_correct": float((right_clean * right_patch).mean()), "logit_diff_clean": float(clean.mean()),
            "logit_diff_patch": float(patch.mean())}
