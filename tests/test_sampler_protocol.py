"""The sampler protocol (vargen/sampling/base.py) and the model contract samplers rely on
(vargen/models/generator.py): every registered sampler is built from Python, set up with a
:class:`SamplerContext` and called ``(model, cond_B, generator) -> (out, stats)``; generate.py
dispatches on the protocol only; models declare their samplers at registration; the speculative
samplers draw from CTF's stage 1 through the token-AR contract, exactly."""

import itertools
import pathlib

import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

from vargen.models.generator import drop_labels
from vargen.registry import SAMPLERS, import_components
from vargen.sampling.base import Sampler, SamplerContext
from vargen.sampling.generate import check_sampler_fits, default_sampler_for, generate

import_components()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest: tiny tensors, one intra-op thread
    yield


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def brightness(images, labels=None):
    """A reward for TTS-VAR / best-of-N given by 'package.module:function'."""
    return images.mean((1, 2, 3))  # (M,)


def pixels(images):
    """Features for TTS-VAR's clustering given by 'package.module:function'."""
    return images.flatten(1)  # (M, F)


def _llamagen(seed=0, **kw):
    from tests.toys import tiny_llamagen

    return tiny_llamagen(seed, **kw)


def _ctf(seed=0, num_coarse=4, grid=(4, 4), vocab=24, std=None):
    from tests.test_ctf_labels import _FakeVQ
    from vargen.models.ctf import CTF, CTFConfig

    torch.manual_seed(seed)
    cfg = CTFConfig(
        vocab_size=vocab, grid=list(grid), num_classes=3, num_coarse=num_coarse, dim=16, depth=2, heads=2
    )
    cfg.stage2_dim, cfg.stage2_depth = 16, 1
    model = CTF(cfg)
    model.attach_tokenizer(_FakeVQ(v=vocab))
    if std is not None:  # peaked, varied stage-1 conditionals (as tests/test_speculative_cache.py)
        for p in model.stage1.parameters():
            torch.nn.init.normal_(p, std=std, generator=seeded(seed + 10))
    return model.double().eval()


def _var():
    from tests.test_var import tiny_pair

    return tiny_pair()[1]


def _ts():
    from tests.test_token_shuffle import _ts_model

    return _ts_model()


def _tokenbridge():
    from tests.test_tokenbridge import _model

    return _model()


def _xar(seed=0):
    from tests.test_cspd_sampler import _xar

    return _xar(seed).eval()


def _tarflow():
    from tests.toys import tiny_tarflow

    return tiny_tarflow(std=0.05, dtype=torch.float32)


def _mdm():
    from tests.test_lsd import _tiny_mdm

    return _tiny_mdm()


def _lsd():
    from vargen.models.lsd_student import LSDStudent, LSDStudentConfig

    torch.manual_seed(0)
    base = dict(name="mdm", vocab_size=11, grid=[2, 3], num_classes=2, dim=32, depth=2, heads=2)
    return LSDStudent(LSDStudentConfig(student_steps=2, base=base)).eval()


def _unet():
    from vargen.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig

    torch.manual_seed(0)
    cfg = DiffusionUNetConfig(channels=1, resolution=8, num_classes=2, block_out_channels=[8, 8])
    return DiffusionUNet(cfg).eval()


def _classifier_loader(ckpt, device):
    from tests.test_diffusion_minority_pipeline import _classifier

    return _classifier(), OmegaConf.create({"task": "minority_classifier"})


def _loads(factory):
    """A checkpoint loader for the context that builds ``factory()`` instead of reading a file."""
    return lambda ckpt, device: (factory(), OmegaConf.create({"task": "generator"}))


REWARD = {"reward": "tests.test_sampler_protocol:brightness"}
FEATURES = {"feature_net": "tests.test_sampler_protocol:pixels"}
# kind -> (sampler config, model factory, labels, checkpoint loader of the context or None)
CASES = {
    "ar": ({"name": "ar", "cfg_scale": 2.0}, _llamagen, 3, None),
    "speculative": ({"name": "speculative", "draft_ckpt": "draft", "gamma": 2}, _llamagen, 3,
                    _loads(lambda: _llamagen(1, dim=8, depth=1))),
    "sjd": ({"name": "sjd", "window": 3}, _llamagen, 3, None),
    "gsd": ({"name": "gsd", "window": 3, "group": 4}, _llamagen, 3, None),
    "ctf": ({"name": "ctf", "cfg_scale": 1.5}, _ctf, 3, None),
    "var": ({"name": "var", "cfg_scale": 1.5}, _var, 3, None),
    "tts_var": ({"name": "tts_var", "n": 2, **FEATURES, **REWARD}, _var, 2, None),
    "best_of_n": ({"name": "best_of_n", "n": 2, **REWARD}, _var, 2, None),
    "token_shuffle": ({"name": "token_shuffle", "cfg_scale": 1.5}, _ts, 3, None),
    "tokenbridge": ({"name": "tokenbridge", "cfg_scale": 1.5}, _tokenbridge, 3, None),
    "xar": ({"name": "xar", "num_steps": 2}, _xar, 3, None),
    "cspd": ({"name": "cspd", "draft_ckpt": "draft", "gamma": 2, "num_steps": 2}, _xar, 3,
             _loads(lambda: _xar(1))),
    "tarflow": ({"name": "tarflow", "method": "auto", "calib": 2, "window": 4}, _tarflow, 3, None),
    "mdm": ({"name": "mdm", "steps": 3}, _mdm, 3, None),
    "lsd": ({"name": "lsd"}, _lsd, 3, None),
    "ddim": ({"name": "ddim", "steps": 2, "cfg_scale": 1.5}, _unet, 2, None),
    "fkc_cfg": ({"name": "fkc_cfg", "steps": 2, "particles": 2}, _unet, 2, None),
    "minority": ({"name": "minority", "classifier_ckpt": "clf", "steps": 2}, _unet, 2, _classifier_loader),
}  # fmt: skip


def test_every_registered_sampler_has_a_case():
    assert sorted(CASES) == SAMPLERS.names()


def _rows(out):
    return out[0].shape[0] if isinstance(out, list) else out.shape[0]


@pytest.mark.parametrize("kind", sorted(CASES))
def test_build_setup_and_draw_from_python(kind):
    """SAMPLERS.build -> setup(ctx) -> call: the output has a row per label, the stats are a
    record, the same seed draws the same output, and the sampler declares whether it batches
    continuously (then a call with ``slots`` rows in flight draws every label too)."""
    cfg, factory, n, loader = CASES[kind]
    model = factory()
    sampler = SAMPLERS.build(cfg)
    assert isinstance(sampler, Sampler) and isinstance(sampler.continuous, bool)
    sampler.setup(SamplerContext(model, "cpu", None, loader))
    labels = torch.arange(n) % 2
    out, stats = sampler(model, labels, seeded(0))
    again, _ = sampler(model, labels, seeded(0))
    assert _rows(out) == n and isinstance(stats, dict) and "seconds" in stats
    same = (
        [torch.equal(a, b) for a, b in zip(out, again)]
        if isinstance(out, list)
        else [torch.equal(out, again)]
    )
    assert all(same)
    if sampler.continuous:
        out_c, _ = sampler(model, labels, seeded(0), slots=2)
        assert _rows(out_c) == n


@pytest.mark.parametrize("kind", ["speculative", "cspd", "minority"])
def test_samplers_that_load_checkpoints_refuse_to_draw_before_setup(kind):
    cfg, factory, n, _ = CASES[kind]
    with pytest.raises(RuntimeError, match="setup"):
        SAMPLERS.build(cfg)(factory(), torch.arange(n) % 2, seeded(0))


def test_generate_dispatches_on_the_protocol_only():
    src = (pathlib.Path(__file__).parents[1] / "vargen" / "sampling" / "generate.py").read_text()
    assert "hasattr(" not in src and "DEFAULT_SAMPLER" not in src and "SAMPLER_MODELS" not in src


def test_models_declare_their_samplers_at_registration():
    old_defaults = {
        "llamagen": "ar", "tarflow": "tarflow", "var": "var", "tokenbridge_ar": "tokenbridge",
        "token_shuffle": "token_shuffle", "ctf": "ctf", "xar": "xar", "mdm": "mdm", "lsd_student": "lsd",
        "ddpm_unet": "ddim",
    }  # fmt: skip
    assert {m: default_sampler_for(m) for m in old_defaults} == old_defaults
    for sampler, model in [("sjd", "ctf"), ("gsd", "llamagen"), ("cspd", "xar"), ("minority", "ddpm_unet")]:
        check_sampler_fits(sampler, model)
    with pytest.raises(ValueError, match=r"sampler 'sjd' draws from .*llamagen.*use sampler.name=xar"):
        check_sampler_fits("sjd", "xar")
    with pytest.raises(ValueError, match=r"samplers for var: \['best_of_n', 'tts_var', 'var'\]"):
        check_sampler_fits("ar", "var")


def test_drop_labels_draws_what_the_models_drew_inline():
    labels = torch.arange(1000) % 7
    torch.manual_seed(3)
    drop = torch.rand(labels.shape, device=labels.device) < 0.3  # the code 7 models wrote out
    want = torch.where(drop, torch.full_like(labels, 7), labels)
    torch.manual_seed(3)
    assert torch.equal(drop_labels(labels, 7, 0.3), want)
    assert torch.equal(drop_labels(labels, 7, 0.0), labels)


def test_forward_guided_is_one_batched_call_mixing_the_pair():
    model = _mdm()
    x = torch.randint(0, 12, (3, 6), generator=seeded(0))
    cond = torch.tensor([0, 1, 0])
    calls = []

    def logits(x_BN, cond_B):
        calls.append(x_BN.shape[0])
        return model.logits(x_BN, cond_B)

    mixed = model.forward_guided(logits, x, cond_B=cond, cfg_scale=3.0)
    c, u = model.logits(x, cond), model.logits(x, torch.full_like(cond, model.null_class))
    assert calls == [6]  # one call on the cond rows and their null-class twins
    torch.testing.assert_close(mixed, u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.forward_guided(logits, x, cond_B=cond, cfg_scale=1.0), c) and calls[-1] == 3


# ---------------------------------------------------------------- SD / SJD / GSD on CTF's stage 1
def _stage1_joint(model, label: int):
    """Exact probability of every coarse sequence under stage 1, (K**T,) lexicographic."""
    ar = model.next_token_model
    K, T = ar.vocab_size, ar.num_tokens
    seqs = torch.tensor(list(itertools.product(range(K), repeat=T)))  # (K^T, T)
    with torch.no_grad():
        logp = torch.log_softmax(ar.logits(seqs[:, : T - 1], torch.full((len(seqs),), label)).double(), -1)
    return logp.gather(2, seqs[..., None])[..., 0].sum(1).exp()


def _coarse_pvalue(model, ids_NT, joint):
    K, T = model.cfg.num_coarse, ids_NT.shape[1]
    coarse = model.coarse_of[ids_NT]  # (N, T) the fine ids' clusters = the drawn coarse sequence
    code = (coarse * K ** torch.arange(T - 1, -1, -1)).sum(1)
    counts = torch.bincount(code, minlength=K**T).double()
    return chisquare(counts.numpy(), (joint * len(ids_NT)).numpy()).pvalue


@pytest.mark.parametrize("kind", ["speculative", "sjd"])
def test_speculative_samplers_on_ctf_stage1_are_exact(kind):
    """Through ``next_token_model`` SD (draft: another CTF) and SJD draw CTF's coarse sequences
    from stage 1's exact joint (chi-square over all K^T sequences), and stage 2 completes them
    (mask_to_cluster: every fine id lies in its coarse label's cluster)."""
    model = _ctf(0, num_coarse=3, grid=(1, 3), std=0.5)
    cfg = {
        "speculative": {"name": "speculative", "draft_ckpt": "d", "gamma": 2},
        "sjd": {"name": "sjd", "window": 3},
    }
    sampler = SAMPLERS.build({**cfg[kind], "use_cache": False})
    sampler.setup(
        SamplerContext(model, "cpu", None, _loads(lambda: _ctf(1, num_coarse=3, grid=(1, 3), std=0.5)))
    )
    ids, stats = sampler(model, torch.zeros(20_000, dtype=torch.long), seeded(5))
    assert ids.shape == (20_000, 3) and ids.max() < model.vocab_size  # fine ids, not coarse labels
    assert _coarse_pvalue(model, ids, _stage1_joint(model, 0)) > 1e-3
    assert 0 < stats["accepted"] < stats["proposed"]  # speculation happened, with rejections


def test_ctf_as_its_own_draft_accepts_every_draft_and_caching_changes_no_token():
    model = _ctf(0, std=0.4)
    labels = torch.arange(6) % 3
    ids = {}
    for use_cache in (True, False):
        sampler = SAMPLERS.build(
            {"name": "speculative", "draft_ckpt": "self", "gamma": 3, "use_cache": use_cache}
        )
        sampler.setup(SamplerContext(model, "cpu", None, lambda ckpt, device: (model, None)))
        ids[use_cache], stats = sampler(model, labels, seeded(2), slots=4)
        assert stats["accepted"] == stats["proposed"] > 0
    assert torch.equal(ids[True], ids[False])
    sjd = {
        c: SAMPLERS.build({"name": "sjd", "window": 4, "use_cache": c, "cfg_scale": 2.0})
        for c in (True, False)
    }
    a, b = (sjd[c](model, labels, seeded(3))[0] for c in (True, False))
    assert torch.equal(a, b)


def test_generate_draws_ctf_through_sjd_like_the_sampler():
    model = _ctf(0)
    labels = torch.arange(5) % 3
    sampler = SAMPLERS.build({"name": "sjd", "window": 3})
    ids, _, stats = generate(model, None, labels, sampler, seeded(4), batch_size=2)
    want, _ = sampler(model, labels, seeded(4), slots=2)
    assert torch.equal(ids, want) and stats["target_calls_per_image"] > 0
