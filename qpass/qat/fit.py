"""`fit`: a short training loop with knowledge distillation from the float model."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm.auto import tqdm

from qpass.errors import QpassError
from qpass.qat.quantizers import ActivationQuantizer, WeightQuantizer

PACT_DECAY = 2e-4
"""L2 regularization of PACT's clipping values (Choi et al. 2018, lambda_alpha = 0.0002)."""


def fit(
    qat_module: nn.Module,
    data: Iterable[Any],
    teacher: nn.Module | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    temperature: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    progress: bool = True,
) -> list[float]:
    """Train `qat_module` (a `QATModule`, or any float module) on `data` for `epochs` passes;
    return the loss of every step.

    data: re-iterable batches, each `x` or `(x, labels)` (e.g. a torch DataLoader).
    teacher: the float model; the loss is then the KL divergence from its softmax to the
    student's at `temperature` (times T^2, Hinton et al. 2015), plus the cross-entropy with the
    labels where the batches have them. Without a teacher the batches need labels.
    optimizer: "adam" (AdamW, the default) or "sgd" (Nesterov momentum, as LSQ trains); the
    learning rate follows a cosine schedule from `lr` to 0 over all steps. With BatchNorm folded,
    per-channel weight steps differ by orders of magnitude and one SGD learning rate that moves
    the small ones safely barely moves the large ones (on ResNet20, SGD at lr 5e-4 diverged in
    four steps: a first-layer step grew 65x); Adam's per-parameter normalization trains all of
    them (lr 1e-4). `weight_decay` applies to the weights, PACT_DECAY to PACT's clipping values,
    nothing to the steps and zero points. Any other torch loop trains the module too.
    """
    if epochs < 1:
        raise QpassError(f"epochs must be >= 1, not {epochs}")
    steps_per_epoch = len(data) if hasattr(data, "__len__") else None
    if not steps_per_epoch:
        raise QpassError("fit needs data with a length (e.g. a DataLoader or a list of batches)")
    total = epochs * steps_per_epoch
    groups = _groups(qat_module, weight_decay)
    if optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    elif optimizer == "adam":
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    else:
        raise QpassError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    if teacher is not None:
        teacher.eval()
    qat_module.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc="quantization-aware training", disable=not progress)
    for _ in range(epochs):
        for batch in data:
            x, labels = batch if isinstance(batch, list | tuple) else (batch, None)
            loss = _loss(qat_module(x), x, labels, teacher, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
    bar.close()
    qat_module.eval()
    return losses


def _loss(logits, x, labels, teacher, temperature: float) -> torch.Tensor:
    if teacher is None and labels is None:
        raise QpassError("fit needs labels in the batches, or a teacher to distill from")
    loss = torch.zeros((), dtype=logits.dtype)
    if teacher is not None:
        with torch.no_grad():
            target = F.softmax(teacher(x) / temperature, dim=-1)
        log_student = F.log_softmax(logits / temperature, dim=-1)
        loss = loss + F.kl_div(log_student, target, reduction="batchmean") * temperature**2
    if labels is not None:
        loss = loss + F.cross_entropy(logits, labels)
    return loss


def _groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: weights (and biases) with `weight_decay`, PACT clipping values with
    PACT_DECAY, steps and zero points without decay."""
    clips, steps = [], []
    for sub in module.modules():
        if isinstance(sub, ActivationQuantizer):
            (clips if sub.pacts else steps).append(sub.step)
            steps.extend([sub.zero_param] if sub.zero_param is not None else [])
        elif isinstance(sub, WeightQuantizer):
            steps.append(sub.step)
    taken = {id(p) for p in clips + steps}
    weights = [p for p in module.parameters() if id(p) not in taken]
    groups = [
        {"params": weights, "weight_decay": weight_decay},
        {"params": clips, "weight_decay": PACT_DECAY},
        {"params": steps, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
