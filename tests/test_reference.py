"""The fast engine agrees fault by fault with the seed's PyTorchFI + bitstring procedure."""
import numpy as np
import pytest
import torch

from tests.models_for_tests import make_data, plain_net
from trainables.inject import engine
from trainables.inject.reference import bitstring_flip, reference_run
from trainables.inject.sites import select_sites


@pytest.mark.parametrize("bit,memory_format", [(30, torch.contiguous_format), ("random", torch.contiguous_format),
                                               ("random", torch.channels_last)])
def test_neuron_faults_agree_with_reference_at_every_site(bit, memory_format):
    model = plain_net().to(memory_format=memory_format)  # channels_last: positions stay logical (C, H, W)
    images, labels = make_data(96)
    bench = engine.prepare(model, (images, labels), batch_size=32, device="cpu")
    changed_total = 0
    for site in bench.sites:
        ours = engine.run_faults(bench, site, "neuron", bit, seed=21, record="all").records
        ref = reference_run(model, images, site, "neuron", bit, seed=21, batch_size=32)
        assert np.array_equal(ref.golden, ours.golden), site
        assert np.array_equal(ref.faulty, ours.faulty), site
        changed_total += int(ours.changed.sum())
    assert changed_total > 20  # the comparison covers real prediction changes


@pytest.mark.parametrize("bit,memory_format", [(30, torch.contiguous_format), ("random", torch.contiguous_format),
                                               ("random", torch.channels_last)])
def test_weight_faults_agree_with_reference_at_every_weight_site(bit, memory_format):
    model = plain_net().to(memory_format=memory_format)  # channels_last conv weights: positions stay logical
    images, labels = make_data(96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench = engine.prepare(model, (images, labels), batch_size=16, device="cpu")
    changed_total = 0
    for site in select_sites(bench.sites, "weight"):
        ours = engine.run_faults(bench, site, "weight", bit, seed=4, images_per_weight_fault=16, record="all").records
        ref = reference_run(model, images, site, "weight", bit, seed=4, batch_size=16, images_per_weight_fault=16)
        assert np.array_equal(ref.faulty, ours.faulty), site
        changed_total += int(ours.changed.sum())
    assert changed_total > 0
    for k, v in model.state_dict().items():  # both engines leave the model as it was
        bits = (lambda t: t.contiguous().view(torch.uint8)) if v.is_floating_point() else (lambda t: t)
        assert torch.equal(bits(v), bits(before[k])), k


def test_bitstring_flip_matches_known_values():
    assert bitstring_flip(1.0, 31, torch.float32) == -1.0
    assert bitstring_flip(1.0, 22, torch.float32) == 1.5
    assert bitstring_flip(1.0, 14, torch.bfloat16) == float("inf")
    assert bitstring_flip(1.0, 9, torch.float16) == 1.5
