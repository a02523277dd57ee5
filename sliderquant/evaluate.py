"""Perplexity by the GPTQ/OmniQuant protocol.

The token stream is cut into non-overlapping windows of ``seqlen`` tokens (the remainder is
dropped; a 2-D input is cut row by row).  Each window is run on its own; inside it token ``t``
is predicted from tokens ``< t`` (``seqlen - 1`` predictions per window).  The perplexity is
``exp`` of the mean token negative log-likelihood over all windows.  This is not lm-eval's
word-level perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``(n_windows, seqlen)`` non-overlapping windows of a 1-D or 2-D token tensor."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 1-D or 2-D, got shape {tuple(tokens.shape)}")
    per_row = tokens.shape[1] // seqlen
    if per_row == 0:
        raise ValueError(f"{tokens.shape[1]} tokens per row are fewer than seqlen={seqlen}")
    return tokens[:, :per_row * seqlen].reshape(-1, seqlen)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> float:
    """``exp(mean NLL)`` of ``model`` over the first ``max_windows`` windows (all if None)."""
    wins = windows(tokens, seqlen)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        wins = wins[:max_windows]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    starts = range(0, wins.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="perplexity", unit="batch")
    try:
        for i in starts:
            batch = wins[i:i + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            labels = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  reduction="sum")
            nll_sum += float(nll.double())
            count += labels.numel()
    finally:
        model.train(was_training)
    return math.exp(nll_sum / count)
