"""xAR entities: how a (h, w) latent grid of tokens is grouped into prediction units (xAR, arXiv:2502.20388).

An entity is the set of tokens predicted together in one AR step. Kinds:
- "token": every token is its own entity (raster order), N entities;
- "cell": k x k cells in raster order of cells, tokens raster inside a cell (xAR's released code);
- "subsample": the tokens sharing one (row mod s, col mod s) offset, offsets in raster order;
- "image": one entity holding every token;
- "scale": coarse-to-fine resolutions of the latent; entity r is the latent area-downsampled to
  scales[r] x scales[r] (the last scale is the full grid), so its tokens are not a permutation
  of the grid but a pyramid, and unclusterify reads the finest scale.

``clusterify(x_BNC) -> x_BLC`` puts tokens in entity order (L = sum of entity sizes) and
``unclusterify`` is its inverse; ``entity_sizes`` gives the size of each entity in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("token", "cell", "subsample", "image", "scale")


class Entities:
    def __init__(self, kind: str, grid: list[int], cell: int = 2, stride: int = 2, scales=(1, 2, 4)):
        if kind not in KINDS:
            raise ValueError(f"model.entity: unknown entity kind '{kind}'; one of {KINDS}")
        h, w = grid
        self.kind, self.h, self.w = kind, h, w
        self.scales = list(scales)
        if kind == "scale":
            if self.scales[-1] != h or h != w:
                raise ValueError(f"model.scales: last scale must equal the square grid {grid}, got {scales}")
            self.sizes = [s * s for s in self.scales]
            self.perm = None
            return
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w)
        if kind == "token":
            key, self.sizes = rows * w + cols, [1] * (h * w)
        elif kind == "image":
            key, self.sizes = rows * w + cols, [h * w]
        elif kind == "cell":
            if h % cell or w % cell:
                raise ValueError(f"model.cell: {cell} does not divide the grid {grid}")
            ent = (rows // cell) * (w // cell) + cols // cell
            key = ent * cell * cell + (rows % cell) * cell + cols % cell
            self.sizes = [cell * cell] * (h * w // (cell * cell))
        else:  # subsample
            if h % stride or w % stride:
                raise ValueError(f"model.stride: {stride} does not divide the grid {grid}")
            ent = (rows % stride) * stride + cols % stride
            key = ent * (h * w) + rows * w + cols
            self.sizes = [h * w // (stride * stride)] * (stride * stride)
        self.perm = torch.argsort(key.flatten())  # entity-order position -> raster index
        self.inv = torch.argsort(self.perm)

    @property
    def num_entities(self) -> int:
        return len(self.sizes)

    def entity_index(self) -> torch.Tensor:
        """(L,) entity id of each position in entity order."""
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))

    def clusterify(self, x_BNC: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            return x_BNC[:, self.perm.to(x_BNC.device)]  # (B, N, C) in entity order
        B, N, C = x_BNC.shape
        img = x_BNC.transpose(1, 2).reshape(B, C, self.h, self.w)
        levels = [F.adaptive_avg_pool2d(img, s).flatten(2).transpose(1, 2) for s in self.scales]
        return torch.cat(levels, dim=1)  # (B, sum s^2, C)

    def unclusterify(self, x_BLC: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            return x_BLC[:, self.inv.to(x_BLC.device)]  # (B, N, C) raster
        return x_BLC[:, -self.h * self.w :]  # the finest scale is the full latent
