"""Fused Triton kernels, each beside its torch reference and a dispatcher (:mod:`.dispatch`).

* :mod:`.logits_warper`: CFG, temperature, top-k, top-p and Gumbel-max sampling per row;
* :mod:`.speculative_verify`: SD / SJD acceptance test, first rejection and residual draw;
* :mod:`.group_verify`: GSD's group-exact verification (rank-block partition, group residual);
* :mod:`.fkc`: FKC-CFG log-weight increment, ESS and systematic resampling per group;
* :mod:`.tarflow_step`: TarFlow's affine coupling update and each token's move.
* :mod:`.cspd_ratio`: CSpD's last-step density ratio and acceptance, and the residual's proposals;
* :mod:`.ragged_attention`: attention of a window per row over a ragged KV cache (windowed decoding).

The tests run them under the Triton CPU interpreter; the compiled path is checked only by
``benchmarks/gpu_check.sh`` on a GPU.
"""
