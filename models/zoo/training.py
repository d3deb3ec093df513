"""The small training loop the zoo's models share: AdamW, warm-up + cosine, a progress bar."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = 0


def seed_everything(seed: int) -> None:
    """Seed every generator training touches so a zoo build repeats itself."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def progress_bar(transient: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), transient=transient,
    )


def train(model: nn.Module, batches: Callable[[int], Iterable[tuple[Tensor, ...]]], steps_per_epoch: int,
          loss_fn: Callable[[nn.Module, tuple[Tensor, ...]], Tensor], cfg: TrainConfig, name: str) -> float:
    """Run ``cfg.epochs`` epochs; ``batches(epoch)`` yields the epoch's batches. Returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, cfg.warmup_fraction))
    model.train()
    loss_value = float("nan")
    with progress_bar() as bar:
        task = bar.add_task(f"train {name}", total=total, info="")
        for epoch in range(cfg.epochs):
            for batch in batches(epoch):
                loss = loss_fn(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                loss_value = loss.item()
                bar.update(task, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_value:.3f}")
    model.eval()
    return loss_value
