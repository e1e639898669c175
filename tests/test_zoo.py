"""benchmarks/zoo.py: a trained entry is reused, a changed config retrains it and what depends on it."""

import os

import pytest

from benchmarks.zoo import ZOO, Zoo, ZooEntry, config_path, order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "configs", "data", "digits.yaml")
TRAIN = os.path.join(ROOT, "configs", "train", "cpu.yaml")


def write_configs(folder, ar_dim=16, vq_codes=16):
    vq = f"""defaults: [{DATA}, {TRAIN}]
task: tokenizer
model: {{name: vq, hidden: [8, 8], downsample: 4, codebook_size: {vq_codes}, code_dim: 4}}
train: {{steps: 2, batch_size: 8, eval_every: 0, ckpt_every: 2}}
"""
    ar = f"""defaults: [{DATA}, {TRAIN}]
task: generator
tokenizer_ckpt: "???"
model: {{name: llamagen, dim: {ar_dim}, depth: 1, heads: 2}}
train: {{steps: 2, batch_size: 8, eval_every: 0, ckpt_every: 2}}
"""
    paths = {}
    for name, text in (("vq", vq), ("ar", ar)):
        paths[name] = os.path.join(folder, f"{name}.yaml")
        with open(paths[name], "w") as f:
            f.write(text)
    return {"vq": ZooEntry(paths["vq"]), "ar": ZooEntry(paths["ar"], {"tokenizer_ckpt": "vq"})}


def test_reuse_and_retrain_only_what_changed(tmp_path):
    cfgs, root = tmp_path / "cfg", str(tmp_path / "zoo")
    cfgs.mkdir()
    entries = write_configs(str(cfgs))
    first = Zoo(zoo=entries, root=root, log=lambda *a: None)
    paths = first.ensure(["ar"])
    assert first.trained == ["vq", "ar"]
    assert all(os.path.isfile(os.path.join(p, "model.safetensors")) for p in paths.values())

    again = Zoo(zoo=entries, root=root, log=lambda *a: None)
    assert again.ensure(["ar"]) == paths and again.trained == []  # nothing trained twice

    write_configs(str(cfgs), ar_dim=32)  # the generator changed: only it retrains
    changed = Zoo(zoo=entries, root=root, log=lambda *a: None)
    new = changed.ensure(["ar"])
    assert changed.trained == ["ar"] and new["vq"] == paths["vq"] and new["ar"] != paths["ar"]

    write_configs(str(cfgs), ar_dim=32, vq_codes=32)  # the tokenizer changed: both retrain
    deep = Zoo(zoo=entries, root=root, log=lambda *a: None)
    deep.ensure(["ar"])
    assert deep.trained == ["vq", "ar"]


def test_hash_ignores_where_and_how_visibly_a_run_trains(tmp_path):
    cfgs = tmp_path / "cfg"
    cfgs.mkdir()
    entries = write_configs(str(cfgs))
    a = Zoo(zoo=entries, root=str(tmp_path / "a")).digest("ar")
    b = Zoo(["train.progress=false"], zoo=entries, root=str(tmp_path / "b")).digest("ar")
    c = Zoo(["train.steps=3"], zoo=entries, root=str(tmp_path / "a")).digest("ar")
    assert a == b and a != c


def test_shipped_entries_resolve_and_order_dependencies_first():
    names = order(list(ZOO), ZOO)
    assert set(names) == set(ZOO)
    for name, entry in ZOO.items():
        assert os.path.isfile(config_path(entry.config)), name
        for dep in entry.deps.values():
            assert names.index(dep) < names.index(name)
    zoo = Zoo(root="/nonexistent")
    assert len({zoo.digest(n) for n in ZOO}) == len(ZOO)  # every shipped config validates
    with pytest.raises(KeyError, match="unknown zoo entry"):
        order(["photos_nope"], ZOO)
