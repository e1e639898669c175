"""SJD / GSD iterations of fixed shapes, replayed as a CUDA graph (``cuda_graph=True``).

Why: at batch 1 an SJD or GSD iteration is launch-bound on a GPU as a plain decode step is (a
window forward is a few hundred small kernels, the verification a few dozen more), so on the
H200 the eager samplers read 0.95-1.5x eager plain decoding and lose to graph-replayed plain
decoding (:mod:`vargen.sampling.decoders.ar_graph`, 4x faster than eager). A graph replays an
iteration's kernels with one launch, but only on fixed shapes and addresses, which the eager
loop (:func:`~vargen.sampling.speculative.jacobi.sample_jacobi`) does not have: its
:class:`~vargen.nn.kv_cache.RaggedKVCache` attends over a host-side bound that grows, the
random numbers and the Jacobi state are new tensors every iteration. Here:

* the keys/values are preallocated over every slot a window can reach (T + W) and written at
  the rows' device-held positions (one ``index_copy_`` of d-vectors per layer, as the ragged
  path writes); attention runs over all slots with the per-row causal mask (the slots a row
  must not see weigh exactly 0, so the same attention up to float rounding);
* the window's inputs, rotary rows and mask rows are gathered at the device positions, the
  class embedding stands where a position is 0 (as :meth:`ARTransformer.forward_window`'s
  ragged path does);
* the verification and Jacobi update are :func:`~vargen.sampling.speculative.jacobi.jacobi_step`
  itself (one copy of the math), on uniforms pre-drawn into a buffer indexed by a device-held
  iteration counter; its results are copied into the static state (tokens, lengths, drafts, q)
  and its verification counts logged on the device.

The host drives it as the eager loop does (:meth:`RowQueue.iterations`'s schedule): it reads
how far the furthest-behind row still has to go, which makes ceil(left / W) more iterations
certain, draws exactly their random numbers in the eager order (the same generator calls, so
the same numbers and the same final generator state), replays them, and reads again. So the
iterations run are the eager loop's, and with equal probabilities the ids are
``sample_jacobi``'s (tested on CPU, where :class:`StaticJacobi` runs the same step eagerly).
Every sample runs at once (no refill: a refill changes the batch's labels and draft state on
the host); ``sample_jacobi(..., cuda_graph=True, slots=s)`` runs chunks of ``s`` samples.

The iteration and its graph are kept per model (:func:`static_jacobi`) and replayed by later
calls of the same shapes and options after an in-place reset: otherwise every call pays a few
eager iterations and a capture. The eager draw order costs 4 generator calls
per iteration, ~0.19 ms of host time on the H200 against a ~0.5 ms replayed iteration;
``noise="chunk"`` draws one call per kind and stretch instead (other ids, the same sampler).
"""

from __future__ import annotations

import contextlib
import time
import weakref

import torch
import torch.nn.functional as F

from vargen.nn.kv_cache import additive_causal
from vargen.sampling.base import inference
from vargen.sampling.decoders.ar_graph import kept, static_weights, warm_and_capture
from vargen.sampling.speculative.jacobi import fused_pair, jacobi_step
from vargen.sampling.speculative.verify import token_ratio, token_residual, verify_counts, window_inputs
from vargen.sampling.stats import finish_speculative, new_stats
from vargen_kernels.dispatch import interpret_requested
from vargen_kernels.logits_warper import warped_probs

WARMUP_ITERATIONS = 2  # eager iterations on a side stream before capture (Triton compiles, SDPA picks)
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(key -> StaticJacobi)


class StaticWindowCache:
    """Keys/values (rows, H, T + W, d) per layer, written at each row's window slots.

    Quacks like :class:`~vargen.nn.kv_cache.KVCache` for :meth:`Block.forward_cached`:
    :meth:`append` writes the window and returns every slot (a fixed shape); the caller's mask
    hides the slots a query may not see. :meth:`begin` sets the window's flattened slot rows in
    place, from the device positions (no host read)."""

    def __init__(self, depth, rows, heads, max_len, head_dim, width, device, dtype):
        shape = (rows, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.base_RH1 = (torch.arange(rows * heads, device=device) * max_len).view(rows, heads, 1)
        self.rows_X = torch.zeros(rows * heads * width, dtype=torch.long, device=device)

    def begin(self, pos_RW: torch.Tensor) -> None:
        """The window's slots: row r writes positions ``pos_RW[r]`` (slot = sequence position)."""
        self.rows_X.copy_((self.base_RH1 + pos_RW[:, None, :]).view(-1))  # (R*H*W,)

    def append(self, layer: int, k_RHWd, v_RHWd):
        """Write the window's keys/values into its slots; return K, V (R, H, T + W, d)."""
        d = k_RHWd.shape[-1]
        self.k[layer].view(-1, d).index_copy_(0, self.rows_X, k_RHWd.reshape(-1, d))
        self.v[layer].view(-1, d).index_copy_(0, self.rows_X, v_RHWd.reshape(-1, d))
        return self.k[layer], self.v[layer]


class StaticJacobi:
    """One SJD / GSD iteration of fixed shapes on static buffers (module docstring): what a CUDA
    graph captures, callable eagerly on any device.

    ``cond_in``: (R,) labels of the forward (with CFG the B labels, then B null classes);
    ``window`` W; ``ratio_fn``, ``residual_fn``, ``fused``, ``backend`` as
    :func:`~vargen.sampling.speculative.jacobi.jacobi_step` takes them. The buffers hold the
    random numbers of :attr:`capacity` = ceil(T / W) iterations (the most one read of the lengths
    can make certain). Fill them with :meth:`draw` (``start`` sets the initial drafts), then call
    :meth:`step` once per drawn iteration."""

    def __init__(self, model, cond_in, B, window, warp, ratio_fn, residual_fn, fused, backend):
        self.weights = static_weights(model, "window", "forward_window")
        w = model.tok_emb.weight
        c, T, V = model.cfg, model.num_tokens, model.vocab_size
        R, W, device = cond_in.shape[0], window, w.device
        if R % B:
            raise ValueError(f"rows ({R}) must be a multiple of the batch ({B})")
        g, S = W - 1, T + W  # drafts per window, slots a window can reach
        self.model, self.B, self.R, self.W, self.T, self.V = model, B, R, W, T, V
        self.warp, self.guided = warp, warp.get("cfg_scale", 1.0) != 1.0
        self.step_args = (ratio_fn, residual_fn, fused, backend)
        self.cache = StaticWindowCache(c.depth, R, c.heads, S, c.dim // c.heads, W, device, w.dtype)
        self.mask_SS = additive_causal(S, w.dtype, device)  # row i: the slots a query at position i sees
        self.ar_W = torch.arange(W, device=device)
        self.cond_in = cond_in.clone()  # (R,) written by reset
        # the Jacobi state (1b(a)), updated in place by every iteration
        self.ids_BX = torch.zeros(B, T + W, dtype=torch.long, device=device)  # pad absorbs writes past T
        self.len_B = torch.zeros(B, dtype=torch.long, device=device)
        self.draft_Bg = torch.zeros(B, g, dtype=torch.long, device=device)
        self.q_BgV = torch.zeros(B, g, V, dtype=w.dtype, device=device)
        # each iteration's (n_B, cap_B, active_B), reduced to COUNTERS once at the end (counts):
        # at most T iterations run (the furthest-behind row emits >= 1 token in each)
        self.log_I3B = torch.zeros(T, 3, B, dtype=torch.long, device=device)
        self.done_1 = torch.zeros(1, dtype=torch.long, device=device)  # iterations so far
        # the random numbers of up to K iterations (draw), and which one is next
        K = max(1, -(-T // W))
        self.u_KBWV = torch.zeros(K, B, W, V, device=device)
        self.a_KBg = torch.zeros(K, B, g, device=device)
        self.ures_KBV = torch.zeros(K, B, V, device=device)
        self.fresh_KBg = torch.zeros(K, B, g, dtype=torch.long, device=device)
        self.it_1 = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None  # the captured iteration (:func:`run`), replayed by every later call

    def reset(self, cond_in: torch.Tensor) -> None:
        """Start a new batch on the same buffers (so a captured iteration replays on it): new
        labels, no tokens, zero counts. Drafts and q come with :meth:`draw` (``start``); stale
        keys/values need no clearing (a slot is written before any query may see it)."""
        self.cond_in.copy_(cond_in)
        self.ids_BX.zero_()
        self.len_B.zero_()
        self.log_I3B.zero_()
        self.done_1.zero_()

    def counts(self) -> torch.Tensor:
        """:data:`COUNTERS` of the iterations since :meth:`reset` (a device tensor): the same
        integers as adding each iteration's :func:`verify_counts`, a dozen small ops that would
        otherwise be replayed in every iteration."""
        n_IB, cap_IB, active_IB = self.log_I3B.unbind(1)
        return verify_counts(n_IB, cap_IB, active_IB.bool(), 0)

    @property
    def capacity(self) -> int:
        """Iterations whose random numbers fit in the buffers."""
        return self.u_KBWV.shape[0]

    def draw(
        self, generator: torch.Generator, iterations: int, start: bool = False, order: str = "eager"
    ) -> None:
        """Draw the random numbers of the next ``iterations`` iterations into the buffers and
        rewind the counter. ``order="eager"``: the same generator calls, in the same order, as
        ``sample_jacobi`` makes for them (per iteration: the verification's (B, W, V), (B, g),
        (B, V) uniforms, then (B, g) random ids), so the same ids; 4 calls per iteration, which
        on a GPU cost more host time than a replayed iteration (~0.2 ms against ~0.5 ms at batch
        1, photos_ar). ``order="chunk"``: one call per kind for the whole chunk, in that kind
        order: other numbers (so other ids than ``sample_jacobi``), the same distribution (every
        number is still a fresh uniform used once). ``start``: first the (B, g) random initial
        drafts, one-hot q."""
        if not 0 < iterations <= self.capacity:
            raise ValueError(f"iterations must be in 1..{self.capacity}, got {iterations}")
        if order not in ("eager", "chunk"):
            raise ValueError(f"noise order must be 'eager' or 'chunk', got {order!r}")
        gen_dev = generator.device

        def put(buf, fill):
            if buf.device == gen_dev:  # in place: rand / randint are uniform_ / random_ on a new tensor
                fill(buf)
            else:
                buf.copy_(fill(torch.empty(buf.shape, dtype=buf.dtype, device=gen_dev)))

        V = self.V
        if start:
            put(self.draft_Bg, lambda t: t.random_(0, V, generator=generator))
            self.q_BgV.copy_(F.one_hot(self.draft_Bg, V))
        if order == "chunk":
            k = iterations
            for buf in (self.u_KBWV[:k], self.a_KBg[:k], self.ures_KBV[:k]):
                put(buf, lambda t: t.uniform_(generator=generator))
            put(self.fresh_KBg[:k], lambda t: t.random_(0, V, generator=generator))
        else:
            for k in range(iterations):
                for buf in (self.u_KBWV[k], self.a_KBg[k], self.ures_KBV[k]):
                    put(buf, lambda t: t.uniform_(generator=generator))
                put(self.fresh_KBg[k], lambda t: t.random_(0, V, generator=generator))
        self.it_1.zero_()

    def window_probs(self) -> torch.Tensor:
        """The target's warped distributions (B, W, V) at positions len_b .. len_b + W - 1."""
        m, B, W = self.model, self.B, self.W
        inputs_BW = window_inputs(self.ids_BX, self.len_B, W)  # last committed token, then drafts
        pos_BW = self.len_B[:, None] + self.ar_W  # (B, W) = the window's slots
        reps = self.R // B
        inputs_RW, pos_RW = inputs_BW.repeat(reps, 1), pos_BW.repeat(reps, 1)  # every CFG half
        x_RWC = torch.where(
            (pos_RW == 0)[..., None],
            F.embedding(self.cond_in, m.cls_emb.weight)[:, None],
            F.embedding(inputs_RW, m.tok_emb.weight),
        )  # (R, W, C): the class token at position 0
        rope_RW = pos_RW.clamp(max=m.rope_cos.shape[0] - 1)  # past the sequence: the last angle
        rope = (m.rope_cos_pairs[rope_RW][:, None], m.rope_sin_pairs[rope_RW][:, None], m.rope_swap)
        mask_R1WS = self.mask_SS[pos_RW][:, None]  # (R, 1, W, S)
        self.cache.begin(pos_RW)
        *block_w, head_w = self.weights
        for i, blk in enumerate(m.blocks):
            x_RWC = blk.forward_cached(x_RWC, rope, self.cache, i, block_w[i], mask_R1WS)
        logits_RWV = m._head(x_RWC, head_w)  # (R, W, V)
        V = logits_RWV.shape[-1]
        c = logits_RWV[:B].reshape(B * W, V)
        u = logits_RWV[B : 2 * B].reshape(B * W, V) if self.guided else None
        return warped_probs(c, u, **self.warp).view(B, W, V)

    def step(self) -> None:
        """One iteration: the window forward, :func:`jacobi_step` on this iteration's random
        numbers, the state updated in place. No host reads, no shape that depends on the
        lengths: capturable."""
        len_B, g, it = self.len_B, self.W - 1, self.it_1
        active_B = len_B < self.T
        self.ids_BX.scatter_(1, len_B[:, None] + self.ar_W[:g], self.draft_Bg)  # drafts at len .. len+g-1
        p_BWV = self.window_probs()
        draws = tuple(buf.index_select(0, it)[0] for buf in (self.u_KBWV, self.a_KBg, self.ures_KBV))
        fresh_Bg = self.fresh_KBg.index_select(0, it)[0]
        n_B, cap_B, len_B, draft_Bg, q_BgV = jacobi_step(
            p_BWV,
            self.q_BgV,
            self.draft_Bg,
            len_B,
            active_B,
            self.ids_BX,
            self.T,
            draws,
            fresh_Bg,
            *self.step_args,
        )
        self.len_B.copy_(len_B)
        self.draft_Bg.copy_(draft_Bg)
        self.q_BgV.copy_(q_BgV)
        self.log_I3B.index_copy_(0, self.done_1, torch.stack([n_B, cap_B, active_B.long()])[None])
        self.done_1.add_(1)
        it.add_(1)


def run(
    jac: StaticJacobi, generator: torch.Generator, capture: bool, stats: dict, noise: str = "eager"
) -> int:
    """Run ``jac`` until every row holds T tokens, on the eager loop's schedule (module
    docstring); returns the number of graph replays. ``capture`` (CUDA): replays of
    ``jac.graph`` when an earlier call captured it, else the first :data:`WARMUP_ITERATIONS`
    iterations eagerly on a side stream, one captured (recorded, not run, and kept on ``jac``),
    then replays; ends with a sync. ``noise``: the order of the draws (:meth:`StaticJacobi.draw`).
    Counts ``target_forwards`` and ``syncs``."""
    T, W = jac.T, jac.W
    graph, replays, start = jac.graph, 0, True
    with torch.cuda.device(jac.len_B.device) if capture else contextlib.nullcontext():
        while True:
            left = T - int(jac.len_B.min())  # the one host read per chunk
            stats["syncs"] += 1
            if left <= 0:
                break
            todo = -(-left // W)  # an iteration emits at most W tokens per row: these are certain
            while todo > 0:
                k = min(todo, jac.capacity)
                jac.draw(generator, k, start, noise)
                start = False
                stats["target_forwards"] += k
                if not capture:
                    for _ in range(k):
                        jac.step()
                elif graph is None:
                    warm = min(WARMUP_ITERATIONS, k)
                    if k > warm:  # capture only once an iteration is left to replay
                        graph = jac.graph = warm_and_capture(jac.step, warm, torch.cuda.Stream())
                        for _ in range(k - warm):
                            graph.replay()
                        replays += k - warm
                    else:
                        for _ in range(warm):
                            jac.step()
                else:
                    for _ in range(k):
                        graph.replay()
                    replays += k
                todo -= k
        if capture:
            torch.cuda.current_stream().synchronize()
    return replays


@inference
def sample_jacobi_static(
    model,
    cond_B,
    *,
    generator,
    window=16,
    ratio_fn=token_ratio,
    residual_fn=token_residual,
    backend="auto",
    capture=True,
    noise="eager",
    **warp,
):
    """:func:`~vargen.sampling.speculative.jacobi.sample_jacobi` on the static iteration: ids
    (B, T) and the same stats. ``capture`` needs a CUDA model; ``capture=False`` runs the same
    iterations eagerly on any device (the CPU tests). Every row of ``cond_B`` runs at once.
    The static iteration and its graph are kept per model and reused by a later call of the
    same shapes and options (:func:`static_jacobi`): capturing costs a few eager iterations.
    ``noise``: ``"eager"`` draws ``sample_jacobi``'s numbers (the same ids), ``"chunk"`` one call
    per kind and chunk of iterations (other ids, the same sampler; less host time per iteration:
    :meth:`StaticJacobi.draw`)."""
    if capture and model.device.type != "cuda":
        raise ValueError(f"cuda_graph needs a model on CUDA, got one on {model.device.type}")
    if capture and interpret_requested():  # the interpreter copies to the host: not capturable
        raise ValueError("cuda_graph cannot capture the Triton interpreter: unset TRITON_INTERPRET")
    if window < 1:
        raise ValueError(f"sampler.window must be >= 1, got {window}")
    t0 = time.perf_counter()
    warp = {"cfg_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, **warp}
    device = model.device
    cond_B = cond_B.to(device)
    B, T = cond_B.shape[0], model.num_tokens
    cond_in = model.guidance_labels(cond_B, warp["cfg_scale"] != 1.0)  # (R,)
    fused = fused_pair(ratio_fn, residual_fn)
    jac = static_jacobi(model, cond_in, B, window, warp, ratio_fn, residual_fn, fused, backend, capture)
    stats = {**new_stats(), "syncs": 0}
    stats["graph_replays"] = run(jac, generator, capture, stats, noise)
    stats["positions_computed"] = stats["target_forwards"] * cond_in.shape[0] * window
    return jac.ids_BX[:, :T], finish_speculative(stats, B, B * T, t0, jac.counts())


def graph_key(fn):
    """What identifies a ratio or residual function in :func:`static_jacobi`'s cache: its
    ``graph_key`` attribute (the samplers' closures set one from their constants), else itself."""
    return getattr(fn, "graph_key", fn)


def static_jacobi(
    model, cond_in, B, window, warp, ratio_fn, residual_fn, fused, backend, capture
) -> StaticJacobi:
    """A :class:`StaticJacobi` for these shapes and options, reset to ``cond_in``: the one an
    earlier call built (with its captured graph) when the key matches, else a new one, kept
    (:func:`~vargen.sampling.decoders.ar_graph.kept`).

    The key holds the model's prepared decode weights (the list itself, kept alive with the
    entry: a weight change builds a new list, so a graph never replays on stale weights), the
    shapes, the warper options, the ratio / residual (:func:`graph_key`), the backend and
    whether it is captured. A closure's own tensors (GSD's embedding table) are read where the
    first call's closure holds them: equal for equal weights."""
    weights = model.prepared_decode_weights()
    key = (
        id(weights),
        tuple(cond_in.shape),
        B,
        window,
        tuple(sorted(warp.items())),
        graph_key(ratio_fn),
        graph_key(residual_fn),
        fused,
        backend,
        capture,
    )
    build = lambda: StaticJacobi(model, cond_in, B, window, warp, ratio_fn, residual_fn, fused, backend)  # noqa: E731
    jac, _ = kept(_GRAPHS, model, key, build)
    jac.reset(cond_in)
    return jac
