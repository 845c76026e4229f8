"""Validation: token-weighted loss and perplexity over the validation packs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from job.data import IGNORE_INDEX, Packed


def loss_sum(model, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy and the number of target tokens.

    attention_mask=None with restarting position_ids is what makes transformers mask each packed file on its own;
    use_cache=False because a cache silently turns that detection off.
    """
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False).logits
    targets = labels[:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (targets != IGNORE_INDEX).sum()


@torch.no_grad()
def validate(model, packed: Packed, batch_size: int, max_batches: int | None, device, rank: int = 0, world: int = 1, reduce=None) -> dict:
    """Validation loss as total loss over total tokens (not a mean of batch means), and its perplexity."""
    was_training = model.training
    model.eval()
    starts = list(range(0, len(packed), batch_size))
    if max_batches is not None:
        starts = starts[:max_batches]
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    for start in starts[rank::world]:
        rows = slice(start, start + batch_size)
        batch_loss, batch_tokens = loss_sum(
            model, packed.input_ids[rows].to(device), packed.position_ids[rows].to(device), packed.labels[rows].to(device)
        )
        total += batch_loss.double()
        tokens += batch_tokens.double()
    if reduce is not None:
        total, tokens = reduce(total), reduce(tokens)
    model.train(was_training)
    loss = (total / tokens.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens.item())}
