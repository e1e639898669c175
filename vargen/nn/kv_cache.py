"""Preallocated key/value caches: one length for the batch (:class:`KVCache`) or one per row
(:class:`RaggedKVCache`, speculative decoding with ragged rows)."""

from __future__ import annotations

import copy

import torch

from vargen_kernels.dispatch import backend_for


class KVCache:
    """Preallocated keys/values per layer, (B, H, T_max, d); ``length`` tokens are valid.

    ``crop(n)`` rolls the cache back to its first n tokens (speculative decoding).
    """

    def __init__(self, depth, batch, heads, max_len, head_dim, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length = 0
        self.max_len = max_len
        self.weights = None  # the model's prepared decode weights for this run (ARTransformer.forward_step)

    def append(self, layer: int, k_BHtd, v_BHtd):
        """Write new keys/values after the valid prefix; return the full valid K, V."""
        t = k_BHtd.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > {self.max_len}")
        self.k[layer][:, :, self.length : end] = k_BHtd
        self.v[layer][:, :, self.length : end] = v_BHtd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int):
        self.length += t

    def crop(self, n: int):
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {n}")
        self.length = n

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache of the given batch rows (repeats allowed), same valid length."""
        out = copy.copy(self)
        out.k = [t[rows] for t in self.k]  # (len(rows), H, T_max, d)
        out.v = [t[rows] for t in self.v]
        return out


def additive_causal(S: int, dtype, device) -> torch.Tensor:
    """(S, S) additive mask: row i is 0 at the slots a query at position i sees (<= i), -inf after."""
    slot_S = torch.arange(S, device=device)
    mask_SS = torch.zeros(S, S, dtype=dtype, device=device)
    return mask_SS.masked_fill_(slot_S[None, :] > slot_S[:, None], float("-inf"))


class RaggedKVCache:
    """Preallocated keys/values per layer, (B, H, T_max, d), where row b has its own length L_b.

    For speculative decoding with ragged rows: :meth:`begin` opens a window of W new positions
    L_b .. L_b+W-1 per row, whose keys/values :meth:`append` scatters into those slots; query i
    of row b may attend to slots <= L_b + i (its committed prefix and its own causal window).
    :meth:`rollback` then sets each row's length to its committed length; slots past it are
    stale, masked in every later window and overwritten when the row gets there. Allocate
    T_max = sequence length + the widest window, so a finished row's window stays in bounds.

    No host synchronisation: the lengths stay on the device, and the attended width S comes
    from a host-side upper bound on max_b L_b (grown by every window, not lowered by a
    rollback, capped at T_max; a caller that reads the lengths anyway may lower it), not from
    reading the lengths. Slots past a row's length are masked, so a wider S changes only the
    cost, not the result.

    Equal rows (``equal_rows``, on for :meth:`ARTransformer.new_ragged_cache`): on the CPU, where
    reading the lengths stalls nothing, :meth:`begin` reads them, and when every row has the same
    length L (batch 1 always, CFG rows included) the window runs as a plain cached block:
    ``start`` = L, the keys/values are written by one slice copy per layer (no per-row scatter)
    and the mask is a view of a causal table built once. Same slots, same S, same mask values,
    so the same attention, bit for bit, as the ragged path (tested); ``start`` is None otherwise.
    """

    def __init__(self, depth, batch, heads, max_len, head_dim, device, dtype):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.bound = 0  # host-side upper bound on max(length_B)
        self._slot_S = torch.arange(max_len, device=device)  # (T_max,) reused by every window
        self._slots_BW = None
        self._rows_X = None  # the window's rows of the flattened (B*H*T_max, d) keys/values (begin)
        self._base_BH1 = None  # the first such row of each (batch row, head)
        self._used = 0
        self._causal_SS = None  # additive causal mask of every slot, built on first use (_causal)
        self.equal_rows = False  # whether begin may take the equal-length fast path (class docstring)
        self.start = None  # the rows' common length in an equal-rows window, else None
        self.weights = None  # the model's prepared decode weights for this run (forward_window)
        self.backend = "auto"  # how attention over it runs (vargen_kernels.dispatch.backend_for)
        self.reference_attention = True  # whether ``backend`` resolved to the torch reference (begin)

    def positions(self, width: int) -> torch.Tensor:
        """(B, W) sequence positions L_b .. L_b+W-1 of the next window (= its cache slots)."""
        return self.length_B[:, None] + self._slot_S[:width]

    def begin(self, width: int, used: int | None = None) -> torch.Tensor | None:
        """Open a window of ``width`` positions after each row's length; returns the per-row
        attention mask (B, 1, W, S) over the first S slots any row may use, additive (0 where
        query i of row b may attend to a slot, -inf elsewhere): built once per forward, where a
        boolean mask would be converted to this again in every layer's attention. With equal
        rows (``start`` set, see the class docstring) it is a broadcast view of :meth:`_causal`,
        and None for a single position seeing every slot (nothing to mask).

        S = ``used`` when the caller tracks its own host-side bound on max(length) + width,
        else ``bound + width`` (capped at T_max). A caller that sets ``length_B`` directly
        (not through :meth:`advance`) must keep ``bound`` >= max(length_B) itself."""
        if width > self.max_len:
            raise ValueError(f"KV cache overflow: a window of {width} > {self.max_len}")
        # resolved once per window, not in every layer (a Python cost of ~1/4 of SDPA's at batch 1)
        self.reference_attention = backend_for(self.k[0], self.length_B, backend=self.backend) == "torch"
        self._used = min(self.bound + width, self.max_len) if used is None else int(used)
        if self._used > self.max_len:
            raise ValueError(f"KV cache overflow: {self._used} > {self.max_len}")
        B, H = self.k[0].shape[:2]
        self.start = self._common_length()
        if self.start is not None:
            L, S = self.start, self._used
            if L + width > self.max_len:
                raise ValueError(f"KV cache overflow: {L + width} > {self.max_len}")
            if width == 1 and S == L + 1:
                return None
            return self._causal()[L : L + width, :S].expand(B, 1, width, S)  # (B, 1, W, S) view
        self._slots_BW = self.positions(width)  # (B, W) slot = sequence position
        if self._base_BH1 is None or self._base_BH1.shape[0] != B:
            self._base_BH1 = (torch.arange(B * H, device=self._slot_S.device) * self.max_len).view(B, H, 1)
        self._rows_X = (self._base_BH1 + self._slots_BW[:, None, :]).view(-1)  # (B*H*W,)
        return self._causal()[:, : self._used][self._slots_BW][:, None]  # (B, 1, W, S)

    def _common_length(self) -> int | None:
        """The rows' one length when ``equal_rows`` and it is free to read (CPU), else None."""
        if not self.equal_rows or self.length_B.device.type != "cpu":
            return None
        lengths = self.length_B.tolist()
        return lengths[0] if lengths.count(lengths[0]) == len(lengths) else None

    def _causal(self) -> torch.Tensor:
        """(T_max, T_max) :func:`additive_causal` mask; row i is the mask of every query at
        sequence position i."""
        if self._causal_SS is None:
            self._causal_SS = additive_causal(self.max_len, self.k[0].dtype, self._slot_S.device)
        return self._causal_SS

    def append(self, layer: int, k_BHWd, v_BHWd):
        """Write the window's keys/values into its slots (a slice with equal rows, else one
        ``index_copy_`` of d-vectors into the flattened cache: 2-4x cheaper than a per-element
        ``scatter_`` at batch 16); return K, V (B, H, S, d)."""
        if self.start is not None:
            L, W = self.start, k_BHWd.shape[2]
            self.k[layer][:, :, L : L + W] = k_BHWd
            self.v[layer][:, :, L : L + W] = v_BHWd
        else:
            d = k_BHWd.shape[-1]
            self.k[layer].view(-1, d).index_copy_(0, self._rows_X, k_BHWd.reshape(-1, d))
            self.v[layer].view(-1, d).index_copy_(0, self._rows_X, v_BHWd.reshape(-1, d))
        return self.k[layer][:, :, : self._used], self.v[layer][:, :, : self._used]

    def advance(self, width: int):
        """Count the window as written: every row's length grows by ``width``."""
        self.length_B = self.length_B + width
        self.bound = min(self.bound + width, self.max_len)

    def rollback(self, length_B: torch.Tensor):
        """Keep at most ``length_B`` positions per row (a row keeps fewer if it has fewer)."""
        self.length_B = torch.minimum(self.length_B, length_B)

    def select_rows(self, rows: torch.Tensor) -> RaggedKVCache:
        """A new cache of the given batch rows (their lengths kept): drops finished rows."""
        out = copy.copy(self)
        out.k = [t[rows] for t in self.k]  # (len(rows), H, T_max, d)
        out.v = [t[rows] for t in self.v]
        out.length_B = self.length_B[rows]
        return out
