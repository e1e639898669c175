"""FKC-CFG against its own target p_c^w p_u^(1-w) (issue 20, item 8): on exact Gaussian
denoisers the target is Gaussian in closed form, and at equal network evaluations the
sampler-side FKC (vargen.diffusion.fkc.fkc_cfg_ddpm) lands closer to it than plain CFG, whose
guided chain has a bias that more steps do not remove."""

from benchmarks.diffusion_fkc_target import CASES, errors, sample


def test_fkc_is_closer_to_its_target_than_plain_cfg_at_equal_nfe(one_thread, monkeypatch):
    import benchmarks.diffusion_fkc_target as bench

    unc, cond, w = CASES["gauss"]
    monkeypatch.setattr(bench, "UNCOND", unc)
    monkeypatch.setattr(bench, "COND", cond)
    fkc = errors(sample(w, 100, 4, True, 8000, seed=0), w)  # 800 evaluations per sample
    cfg = errors(sample(w, 400, 1, False, 8000, seed=0), w)  # 800
    assert fkc["mean_err"] < 0.5 * cfg["mean_err"] and fkc["w1"] < cfg["w1"], (fkc, cfg)
    # the plain chain's error is its target bias, not noise: exact draws of that size sit far below
    assert cfg["mean_err"] > 0.04, cfg
