"""No-repeat n-gram blocking for beam search, shared by the torch and the numpy (ONNX) decoders."""
from __future__ import annotations


def block_repeats(logp, seqs, n: int) -> None:
    """Set -inf in `logp` (B, k, V) on words that would repeat an n-gram already in each beam's sequence
    `seqs` (B, k, T); works on torch tensors (on their device, no host read) and numpy arrays alike."""
    b, k, t = seqs.shape
    if t < n - 1:
        return
    if hasattr(seqs, "unfold"):
        _block_on_device(logp, seqs, n)
        return
    rows = seqs.tolist()
    for i in range(b):
        for j in range(k):
            s = rows[i][j]
            prefix = tuple(s[t - n + 1:]) if n > 1 else ()
            banned = [s[p + n - 1] for p in range(t - n + 1) if tuple(s[p:p + n - 1]) == prefix]
            if banned:
                logp[i, j, banned] = float("-inf")


def _block_on_device(logp, seqs, n: int) -> None:
    """The loop above as tensor ops: every n-gram window of each beam, those whose first n - 1 words are
    the beam's last n - 1 ban their last word (a beam's step costs no host read on CUDA)."""
    import torch

    t, v = seqs.shape[2], logp.shape[2]
    if t - n + 1 <= 0:
        return
    windows = seqs.unfold(2, n, 1)  # (B, k, W, n), W = t - n + 1
    prefix = seqs[:, :, t - n + 1:].unsqueeze(2)  # (B, k, 1, n - 1)
    match = (windows[..., :n - 1] == prefix).all(-1)  # (B, k, W)
    # unmatched windows write to a spare column V: every write is True, so repeated words never race
    banned = torch.zeros(*logp.shape[:2], v + 1, dtype=torch.bool, device=logp.device)
    banned.scatter_(2, torch.where(match, windows[..., n - 1], v), True)
    logp.masked_fill_(banned[..., :v], float("-inf"))
