"""A TDT (token-and-duration transducer) loss that trains on a CPU in reasonable time.

NeMo's `tdt` loss is CUDA-only and its `tdt_pytorch` reference loops over every (b, t, u) in
Python. Here the forward variable alpha[t] is a vector over all label positions and the whole
batch, and the only Python loop is over time frames:

- arcs that advance time (blank with duration >= 1, labels with duration >= 1) come from frames
  already computed: a logsumexp over the durations;
- label arcs of duration 0 stay in the same frame and chain along u. That recurrence,
  alpha[u] = logaddexp(A[u], alpha[u-1] + e[u-1]), is solved at once: with C the cumulative
  sum of e, alpha = C + logcumsumexp(A - C).

`check_against_nemo()` compares it, value and gradient, with NeMo's reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG = -1e4  # log(0) stand-in that keeps gradients finite


def tdt_loss(
    acts: torch.Tensor,
    labels: torch.Tensor,
    act_lens: torch.Tensor,
    label_lens: torch.Tensor,
    blank: int,
    durations: Sequence[int],
    sigma: float = 0.0,
) -> torch.Tensor:
    """Negative log-likelihood per utterance.

    acts: joint logits [B, T, U+1, V+1+len(durations)] (tokens incl. blank, then durations);
    labels: [B, U]; act_lens, label_lens: [B]. sigma is TDT's logit under-normalisation.
    """
    n_dur = len(durations)
    lab = torch.log_softmax(acts[..., :-n_dur], -1) - sigma
    dur = torch.log_softmax(acts[..., -n_dur:], -1)
    batch, frames, positions, _ = lab.shape
    blank_lp = lab[..., blank]  # [B, T, U+1]
    index = labels[:, : positions - 1].clamp(min=0).long()[:, None, :, None].expand(batch, frames, positions - 1, 1)
    emit_lp = torch.gather(lab[:, :, : positions - 1, :], 3, index).squeeze(3)  # [B, T, U]
    neg = torch.full((batch, 1), NEG, dtype=lab.dtype)
    zero = torch.zeros((batch, 1), dtype=lab.dtype)
    alphas: list[torch.Tensor] = []
    for t in range(frames):
        if t == 0:
            arrived = torch.cat([zero, neg.expand(batch, positions - 1)], 1)
        else:
            arrived = torch.logsumexp(torch.stack(_arcs_into(t, alphas, blank_lp, emit_lp, dur, durations, neg)), 0)
        if 0 in durations:  # label arcs of duration 0: a chain along u inside frame t
            step = emit_lp[:, t] + dur[:, t, :-1, durations.index(0)]
            cum = torch.cat([zero, torch.cumsum(step, 1)], 1)
            arrived = cum + torch.logcumsumexp(arrived - cum, 1)
        alphas.append(arrived)
    alpha = torch.stack(alphas, 1)  # [B, T, U+1]
    rows = torch.arange(batch)
    finals = []
    for n, d in enumerate(durations):  # the utterance ends with a blank that jumps past the end
        if d == 0:
            continue
        t = (act_lens - d).clamp(min=0)
        value = alpha[rows, t, label_lens] + blank_lp[rows, t, label_lens] + dur[rows, t, label_lens, n]
        finals.append(torch.where(act_lens - d >= 0, value, torch.full_like(value, NEG)))
    return -torch.logsumexp(torch.stack(finals), 0)


def _arcs_into(t, alphas, blank_lp, emit_lp, dur, durations, neg) -> list[torch.Tensor]:
    """Log-weights of every arc of duration >= 1 that lands in frame t, per label position."""
    terms = []
    for n, d in enumerate(durations):
        if d == 0 or t - d < 0:
            continue
        prev = alphas[t - d]
        terms.append(prev + blank_lp[:, t - d] + dur[:, t - d, :, n])  # blank: u stays
        emit = prev[:, :-1] + emit_lp[:, t - d] + dur[:, t - d, :-1, n]  # label: u-1 -> u
        terms.append(torch.cat([neg, emit], 1))
    return terms


def check_against_nemo(seed: int = 0, sigma: float = 0.05) -> tuple[float, float]:
    """Max |difference| of loss values and of gradients against NeMo's TDTLossPytorch on a
    small random case (its code calls .cuda(), made a no-op here: there is no GPU)."""
    from unittest import mock

    from nemo.collections.asr.losses.rnnt_pytorch import TDTLossPytorch

    gen = torch.Generator().manual_seed(seed)
    durations = [0, 1, 2, 3, 4]
    batch, frames, positions, vocab = 3, 7, 4, 5
    acts = torch.randn(batch, frames, positions + 1, vocab + 1 + len(durations), generator=gen, dtype=torch.float64)
    acts.requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, positions), generator=gen)
    act_lens, label_lens = torch.tensor([7, 5, 3]), torch.tensor([4, 2, 1])
    reference = TDTLossPytorch(blank=vocab, durations=durations, reduction="none", sigma=sigma)
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        expected = reference(acts=acts, labels=labels, act_lens=act_lens, label_lens=label_lens)
    (grad_expected,) = torch.autograd.grad(expected.sum(), acts)
    got = tdt_loss(acts, labels, act_lens, label_lens, vocab, durations, sigma=sigma)
    (grad_got,) = torch.autograd.grad(got.sum(), acts)
    return float((got - expected).abs().max().detach()), float((grad_got - grad_expected).abs().max())


if __name__ == "__main__":
    print("max |loss diff|, max |grad diff|:", check_against_nemo())
