"""Coarse labels for coarse-to-fine token prediction (CTF, arXiv 2503.16194).

K-means over a trained VQ codebook (V, D) groups the codes into K clusters; a code's coarse label is
its nearest centroid. Deterministic given the seed (k-means++ seeding from an explicit generator,
Lloyd iterations until assignments stop changing). Empty clusters are re-seeded with the code
farthest from its centroid so every label has at least one member (needed for stage 2's masking).
"""

import torch


def kmeans(x_VD: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (centroids (K, D), labels (V,)) with labels[v] = argmin_k |x_v - c_k|."""
    v = x_VD.shape[0]
    if not 1 <= k <= v:
        raise ValueError(f"ctf.num_coarse: K={k} must lie in [1, vocabulary size {v}]")
    x = x_VD.double()
    g = torch.Generator().manual_seed(seed)
    idx = [int(torch.randint(v, (1,), generator=g))]
    for _ in range(1, k):  # k-means++ seeding
        d2 = torch.cdist(x, x[idx]).amin(1).pow(2)
        if d2.sum() == 0:
            d2 = torch.ones_like(d2)
        idx.append(int(torch.multinomial(d2, 1, generator=g)))
    c = x[idx].clone()  # (K, D)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
            else:
                far = (x - c[labels]).norm(dim=1).argmax()
                c[j] = x[far]
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return c.to(x_VD.dtype), labels


def cluster_mask(labels_V: torch.Tensor, k: int) -> torch.Tensor:
    """(K, V) bool: mask[k, v] is True when code v belongs to coarse cluster k."""
    return labels_V.unsqueeze(0) == torch.arange(k).unsqueeze(1)
