"""Site enumeration, filters and the seed's layer table."""
import pytest
from torch import nn

from tests.models_for_tests import plain_net, shared_relu_net
from trainables.inject.sites import enumerate_sites, parse_index_list, select_sites, site_table


def test_plain_net_sites_follow_forward_order_with_input_first():
    sites = enumerate_sites(plain_net(), (3, 8, 8))
    assert [s.module_type for s in sites] == ["Identity", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU",
                                              "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert sites[0].name == "input" and sites[0].output_shape == (3, 8, 8)
    assert sites[1].weight_shape == (8, 3, 3, 3) and sites[1].output_shape == (8, 8, 8)
    assert sites[8].weight_shape == (32, 256) and sites[8].output_shape == (32,)
    assert [s.index for s in sites] == list(range(12))


def test_reused_module_gives_one_site_per_call_and_one_weight_site():
    sites = enumerate_sites(shared_relu_net(), (3, 8, 8))
    assert [(s.name, s.call) for s in sites] == [("input", 0), ("conv1", 0), ("bn1", 0), ("relu", 0), ("conv2", 0),
                                                 ("relu", 1), ("pool", 0), ("fc", 0)]
    assert [s.index for s in select_sites(sites, "weight")] == [1, 2, 4, 7]


def test_filters_by_type_and_index():
    sites = enumerate_sites(plain_net(), (3, 8, 8))
    assert [s.index for s in select_sites(sites, "neuron", types="Conv2d,Linear")] == [1, 5, 8, 11]
    assert [s.index for s in select_sites(sites, "neuron", indices="0,2-4")] == [0, 2, 3, 4]
    assert [s.index for s in select_sites(sites, "weight", types="Linear", indices=[11])] == [11]
    assert len(select_sites(sites, "neuron", types="all", indices="all")) == 12


def test_unknown_index_and_type_list_the_valid_ones():
    sites = enumerate_sites(plain_net(), (3, 8, 8))
    with pytest.raises(ValueError, match=r"index\(es\) 12 do not exist.*valid: 0-11"):
        select_sites(sites, "neuron", indices="3,12")
    with pytest.raises(ValueError, match=r"weight site index\(es\) 3 do not exist.*valid: 1-2,5,8,11"):
        select_sites(sites, "weight", indices=[3])
    with pytest.raises(ValueError, match="unknown neuron layer type.*Conv3d.*this model has: BatchNorm2d, Conv2d"):
        select_sites(sites, "neuron", types="Conv3d")
    with pytest.raises(ValueError, match="unknown site kind"):
        select_sites(sites, "bias")
    with pytest.raises(ValueError, match="bad layer index"):
        parse_index_list("1,x")


def test_table_has_the_seed_columns():
    table = site_table(enumerate_sites(plain_net(), (3, 8, 8)))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["Layer", "#", "Layer", "type"] and "Weight shape" in lines[0] and "Output shape" in lines[0]
    assert lines[3].split() == ["1", "Conv2d", "0", "[8,", "3,", "3,", "3]", "[8,", "8,", "8]", "0"]


def test_model_without_logits_is_refused():
    with pytest.raises(ValueError, match=r"\(batch, classes\) float logits; got \(2, 2, 8, 8\)"):
        enumerate_sites(nn.Conv2d(3, 2, 1), (3, 8, 8))

    class Pair(nn.Module):
        def forward(self, x):
            return x.flatten(1), x

    with pytest.raises(ValueError, match="got tuple"):
        enumerate_sites(Pair(), (3, 2, 2))
