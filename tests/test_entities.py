"""xAR entities: clusterify / unclusterify are inverse for every kind; entity layouts."""

import pytest
import torch

from vargen.models.entities import KINDS, Entities


@pytest.mark.parametrize("kind", KINDS)
def test_unclusterify_inverts_clusterify(kind):
    ent = Entities(kind, [4, 4], cell=2, stride=2, scales=[1, 2, 4])
    x = torch.randn(3, 16, 5)
    y = ent.clusterify(x)
    assert y.shape[1] == sum(ent.sizes) == ent.entity_index().numel()
    torch.testing.assert_close(ent.unclusterify(y), x, rtol=0, atol=0)
    if kind != "scale":  # a permutation: the inverse also holds the other way round
        torch.testing.assert_close(ent.clusterify(ent.unclusterify(y)), y, rtol=0, atol=0)


def test_entity_layouts():
    idx = torch.arange(16).view(1, 16, 1).float()  # raster index of each token
    assert Entities("token", [4, 4]).num_entities == 16
    assert Entities("image", [4, 4]).sizes == [16]
    cell = Entities("cell", [4, 4], cell=2).clusterify(idx).flatten().tolist()
    assert cell[:4] == [0, 1, 4, 5] and cell[4:8] == [2, 3, 6, 7]
    sub = Entities("subsample", [4, 4], stride=2).clusterify(idx).flatten().tolist()
    assert sub[:4] == [0, 2, 8, 10] and sub[4:8] == [1, 3, 9, 11]
    sc = Entities("scale", [4, 4], scales=[1, 2, 4]).clusterify(idx).flatten()
    assert sc[0].item() == idx.mean().item() and sc[1].item() == (0 + 1 + 4 + 5) / 4
    with pytest.raises(ValueError, match="model.cell"):
        Entities("cell", [4, 4], cell=3)
