"""No-repeat n-gram blocking for beam search, shared by the torch and the numpy (ONNX) decoders."""
from __future__ import annotations


def block_repeats(logp, seqs, n: int) -> None:
    """Set -inf in `logp` (B, k, V) on words that would repeat an n-gram already in each beam's sequence
    `seqs` (B, k, T); works on torch tensors and numpy arrays alike (both index the same way)."""
    b, k, t = seqs.shape
    if t < n - 1:
        return
    rows = seqs.tolist()
    for i in range(b):
        for j in range(k):
            s = rows[i][j]
            prefix = tuple(s[t - n + 1:]) if n > 1 else ()
            banned = [s[p + n - 1] for p in range(t - n + 1) if tuple(s[p:p + n - 1]) == prefix]
            if banned:
                logp[i, j, banned] = float("-inf")
