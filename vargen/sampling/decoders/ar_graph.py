"""Static-shape KV-cached next-token decoding, replayed as a CUDA graph (``sample_ar(..., cuda_graph=True)``).

Why: a batch-1 decode step of a small model is bound by per-op launch overhead, not arithmetic
(a few hundred small kernels per token). A CUDA graph records one step's kernels once and
replays them with one launch. A graph replays fixed kernels on fixed addresses with fixed shapes,
which the eager step cannot give: :class:`~vargen.nn.kv_cache.KVCache` keeps its length as a
Python int and attends over ``[:length]`` (a new shape every step), the inputs and the noise are
new tensors every step. So the step here is static:

* the keys/values are preallocated at the full length T_max = N (positions 0..N-1: the class
  token, then image tokens 0..N-2) and written at a position held in a device tensor
  (``index_copy_``); attention runs over all T_max slots with an additive mask of the slots past
  that position (-inf: they weigh exactly 0, so the same attention up to float rounding);
* the RoPE rows, the mask row and the step's noise are picked by the device position
  (``index_select``); the noise of every step is drawn before the loop, in the eager order;
* the input ids, the labels and the output ids live in static buffers, and the step itself
  writes its sampled ids into the output and into the next step's input, then advances the
  position: replaying the one captured step N-1 times decodes the whole sequence.

The step reuses the model's prepared decode weights, :meth:`Block.forward_cached` (through a
duck-typed cache whose ``append`` writes at the device position and returns every slot) and the
fused logits warper. :class:`StaticDecoder` runs eagerly on any device, which is how the CPU
tests check it against :func:`~vargen.sampling.decoders.ar.sample_ar` (logits up to rounding,
the same ids); :func:`sample_ar_static` with ``capture=True`` captures it on CUDA.
"""

from __future__ import annotations

import collections
import time
import weakref

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vargen.nn.kv_cache import additive_causal
from vargen.sampling.base import inference
from vargen.sampling.decoders.ar import _StepNoise
from vargen.sampling.stats import new_stats
from vargen_kernels.dispatch import interpret_requested
from vargen_kernels.logits_warper import warp_and_sample

WARMUP_STEPS = 2  # eager steps on a side stream before capture (compile Triton, pick SDPA backends)
GRAPHS_PER_MODEL = 4  # captured steps kept per model (least recently used dropped)
# model -> OrderedDict(key -> StaticDecoder): the kept steps (static_decoder)
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def static_weights(model, what: str, path: str) -> list:
    """The prepared decode weights a static step runs on (:meth:`ARTransformer.prepared_decode_weights`),
    after checking that the model takes the prepared-weight fast path of ``ARTransformer.<path>``."""
    if model._module_path(model.tok_emb.weight):
        raise ValueError(
            f"the static {what} runs the prepared-weight fast path of ARTransformer.{path}: "
            "it needs fp32 weights, eval mode (or dropout 0) and ARTransformer's own output map"
        )
    return model.prepared_decode_weights()


def kept(store: weakref.WeakKeyDictionary, model, key, build):
    """The object ``store`` keeps for ``model`` under ``key`` (the last :data:`GRAPHS_PER_MODEL`
    used, least recently used dropped), or ``build()``'s, kept. Returns (object, built)."""
    entries = store.setdefault(model, collections.OrderedDict())
    obj, built = entries.get(key), False
    if obj is None:
        obj = entries[key] = build()
        built = True
        while len(entries) > GRAPHS_PER_MODEL:
            entries.popitem(last=False)
    entries.move_to_end(key)
    return obj, built


def warm_and_capture(step, warm: int, side: torch.cuda.Stream):
    """``warm`` eager calls of ``step`` on the side stream (graph capture needs them: Triton kernels
    compile, libraries pick their kernels), then one call captured, not run, into a new
    :class:`torch.cuda.CUDAGraph`, returned. Call inside ``torch.cuda.device``."""
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(warm):
            step()
    main.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()  # recorded, not run
    return graph


class StaticKVCache:
    """Keys/values (rows, H, T_max, d) per layer, written at the device position ``pos_1`` (1,).

    Quacks like :class:`~vargen.nn.kv_cache.KVCache` for :meth:`Block.forward_cached`:
    :meth:`append` writes one position and returns every slot (a fixed shape); the caller masks
    the slots past the position. Slots past it hold zeros or a stale value; they are masked, and
    every step writes its own slot before it attends.
    """

    def __init__(self, depth, rows, heads, max_len, head_dim, pos_1, device, dtype):
        shape = (rows, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.pos_1 = pos_1
        self.max_len = max_len

    def append(self, layer: int, k_BH1d, v_BH1d):
        """Write one position's keys/values at ``pos_1``; return K, V (rows, H, T_max, d)."""
        self.k[layer].index_copy_(2, self.pos_1, k_BH1d)
        self.v[layer].index_copy_(2, self.pos_1, v_BH1d)
        return self.k[layer], self.v[layer]


class StaticDecoder:
    """One decode step of fixed shapes on static buffers (module docstring): the step a CUDA
    graph captures, callable eagerly on any device.

    ``cond_in``: (rows,) labels of the forward (with CFG: the B labels, then B null classes);
    ``noise_NBV``: the uniform noise of every step, (N, B, V) in step order; ``warp``: the
    warper's ``cfg_scale``, ``temperature``, ``top_k``, ``top_p``. Call ``step(first=True)`` once
    (position 0, the class token), then :meth:`step` N-1 times; the ids are in ``ids_BN``.
    """

    def __init__(self, model, cond_in: torch.Tensor, B: int, noise_NBV: torch.Tensor, warp: dict):
        self.weights = static_weights(model, "decode step", "forward_step")
        w = model.tok_emb.weight
        c, N, V = model.cfg, model.num_tokens, model.vocab_size
        rows, device = cond_in.shape[0], w.device
        if noise_NBV.shape != (N, B, V) or rows % B:
            raise ValueError(
                f"noise must be (N, B, V) = {(N, B, V)} and rows a multiple of B, got "
                f"{tuple(noise_NBV.shape)} and {rows}"
            )
        self.model, self.B, self.rows, self.N = model, B, rows, N
        self.guided = warp.get("cfg_scale", 1.0) != 1.0
        self.warp = warp
        self.pos_1 = torch.zeros(1, dtype=torch.long, device=device)  # the position being fed
        self.cache = StaticKVCache(c.depth, rows, c.heads, N, c.dim // c.heads, self.pos_1, device, w.dtype)
        self.mask_SS = additive_causal(N, w.dtype, device)  # row i: the slots position i sees
        self.cond_in = cond_in.clone()  # (rows,) written by reset
        self.tok_in = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (rows, 1) the last ids
        self.noise_NBV = noise_NBV  # owned (the caller's fresh draw); reset copies into it
        self.ids_BN = torch.zeros(B, N, dtype=torch.long, device=device)
        self.graph = None  # the captured step (:func:`decode`), replayed by every later call

    def reset(self, cond_in: torch.Tensor, noise_NBV: torch.Tensor) -> None:
        """Start a new sequence on the same buffers (so a captured step replays on it): new labels
        and noise, position 0. Stale keys/values need no clearing (each step writes its slot
        before it attends)."""
        self.cond_in.copy_(cond_in)
        self.noise_NBV.copy_(noise_NBV)
        self.pos_1.zero_()
        self.tok_in.zero_()
        self.ids_BN.zero_()

    def step(self, first: bool = False) -> torch.Tensor:
        """Decode the token at the current position and advance; returns the logits (rows, V).

        ``first``: position 0, whose input is the class embedding (call it once, at the start);
        otherwise the input is the previous step's ids. No host syncs and no shape that depends
        on the position: capturable."""
        m, pos_1 = self.model, self.pos_1
        if first:
            x_BTC = F.embedding(self.cond_in, m.cls_emb.weight)[:, None]  # (rows, 1, C)
        else:
            x_BTC = F.embedding(self.tok_in, m.tok_emb.weight)  # (rows, 1, C)
        rope = (
            m.rope_cos_pairs.index_select(0, pos_1),  # (1, d)
            m.rope_sin_pairs.index_select(0, pos_1),
            m.rope_swap,
        )
        mask_111S = self.mask_SS.index_select(0, pos_1)[None, None]  # (1, 1, 1, S) additive
        *block_w, head_w = self.weights
        for i, blk in enumerate(m.blocks):
            x_BTC = blk.forward_cached(x_BTC, rope, self.cache, i, block_w[i], mask_111S)
        logits = m._head(x_BTC, head_w)[:, -1]  # (rows, V)
        B = self.B
        noise_BV = self.noise_NBV.index_select(0, pos_1)[0]  # (B, V)
        ids_B = warp_and_sample(
            logits[:B], logits[B:] if self.guided else None, uniform_BV=noise_BV, **self.warp
        )
        self.ids_BN.index_copy_(1, pos_1, ids_B[:, None])
        self.tok_in.view(self.rows // B, B).copy_(ids_B.expand(self.rows // B, B))  # every CFG half
        pos_1.add_(1)
        return logits


def decode(dec: StaticDecoder, capture: bool, progress: bool = False) -> int:
    """Run ``dec`` over the whole sequence; returns the number of graph replays.

    ``capture`` (CUDA): position 0 eagerly, then replays of ``dec.graph`` when an earlier call
    captured it; else :data:`WARMUP_STEPS` steps eagerly (the warm-up on a side stream, as graph
    capture needs: Triton kernels compile, libraries pick their kernels), then one step captured
    into a :class:`torch.cuda.CUDAGraph` (kept on ``dec``) and replayed for the rest; the warm-up
    steps are real steps (the graph reads the position from the device, so it continues from
    there). Ends with a sync of the current stream, so that the graph and its memory are not
    freed under running work and the caller's clock sees the whole decode. Without ``capture``
    every step runs eagerly (any device)."""
    N = dec.N
    dec.step(first=True)
    if not capture:
        for _ in tqdm(range(1, N), desc="decode", disable=not progress, leave=False):
            dec.step()
        return 0
    rest = N - 1
    with torch.cuda.device(dec.ids_BN.device):
        if dec.graph is None:
            warm = min(WARMUP_STEPS, rest)
            rest -= warm
            if rest > 0:  # the warm-up steps are real steps: the graph continues from there
                dec.graph = warm_and_capture(dec.step, warm, torch.cuda.Stream())
            else:
                for _ in range(warm):
                    dec.step()
        for _ in tqdm(range(rest), desc="decode", disable=not progress, leave=False):
            dec.graph.replay()
        torch.cuda.current_stream().synchronize()
    return rest


@inference
def sample_ar_static(
    model,
    cond_B: torch.Tensor,
    *,
    generator: torch.Generator,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    capture: bool = True,
    progress: bool = False,
):
    """:func:`~vargen.sampling.decoders.ar.sample_ar` on the static step: ids (B, N) and stats.

    The noise is drawn before the loop, step by step as the eager decoder draws it
    (:class:`_StepNoise`: the same numbers, the same final generator state), so with equal logits
    the ids are those of ``sample_ar``. It is held whole: (N, B, V) fp32 (16 MiB at N=256, B=16,
    V=1024). ``capture`` needs a CUDA model (:func:`decode`); ``capture=False`` runs the same steps
    eagerly on any device (the CPU tests). The stats count what ``sample_ar`` counts. The
    static step and its graph are kept per model and reused by a later call of the same shapes
    and options (:func:`static_decoder`): capturing costs a few eager steps.
    """
    if capture and model.device.type != "cuda":
        raise ValueError(f"cuda_graph needs a model on CUDA, got one on {model.device.type}")
    if capture and interpret_requested():  # the interpreter copies to the host: not capturable
        raise ValueError("cuda_graph cannot capture the Triton interpreter: unset TRITON_INTERPRET")
    t0 = time.perf_counter()
    B, N, V = cond_B.shape[0], model.num_tokens, model.vocab_size
    device = model.device
    cond_in = model.guidance_labels(cond_B.to(device), cfg_scale != 1.0)  # (rows,)
    noise = _StepNoise(generator, N, B, V, device, torch_warper=False)
    noise_NBV = torch.stack([noise(i) for i in range(N)])  # (N, B, V): one copy, not N
    warp = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    dec = static_decoder(model, cond_in, B, noise_NBV, warp, capture)
    replays = decode(dec, capture, progress)
    stats = new_stats()
    stats["target_forwards"] = N
    stats["positions_computed"] = cond_in.shape[0] * N
    stats["tokens"] = stats["accepted"] = stats["proposed"] = B * N
    stats["graph_replays"] = replays
    stats["seconds"] = time.perf_counter() - t0
    return dec.ids_BN, stats


def static_decoder(model, cond_in, B, noise_NBV, warp, capture) -> StaticDecoder:
    """A :class:`StaticDecoder` for these shapes and options, reset to ``cond_in`` and
    ``noise_NBV``: the one an earlier call built (with its captured graph) when the key matches,
    else a new one, kept (:func:`kept`). The key holds the model's prepared decode weights (the
    list itself, kept alive with the entry: a weight change builds a new list, so a graph never
    replays on stale weights), the shapes, the warper options and whether it is captured."""
    weights = model.prepared_decode_weights()
    key = (id(weights), tuple(cond_in.shape), B, tuple(sorted(warp.items())), capture)
    dec, built = kept(_DECODERS, model, key, lambda: StaticDecoder(model, cond_in, B, noise_NBV, warp))
    if not built:
        dec.reset(cond_in, noise_NBV)
    return dec
