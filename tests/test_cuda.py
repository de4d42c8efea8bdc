"""CUDA checks (skipped where no GPU is present): the engine on a GPU gives the same fault
list as on the CPU, leaves the model intact, agrees with the reference, and strict FP32
keeps the low mantissa bits that TF32 would drop."""
import numpy as np
import pytest
import torch

from tests.models_for_tests import make_data, plain_net, shared_relu_net
from trainables.inject import engine
from trainables.inject.bitflip import dtype_width, flip_bit
from trainables.inject.reference import reference_run
from trainables.inject.sites import select_sites

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_flip_on_gpu_equals_flip_on_cpu_for_every_bit(dtype):
    t = (torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 1e3).to(dtype)
    bits = torch.arange(4096) % dtype_width(dtype)
    gpu = flip_bit(t.cuda(), bits.cuda()).cpu()
    assert torch.equal(gpu.view(torch.uint8), flip_bit(t, bits).view(torch.uint8))


@pytest.mark.parametrize("kind", ["neuron", "weight"])
def test_gpu_trials_use_the_cpu_fault_list_and_restore_the_model(kind):
    images, labels = make_data(300)
    model = shared_relu_net()
    cpu = engine.prepare(model, (images, labels), batch_size=64, device="cpu")
    gpu_model = shared_relu_net()
    gpu = engine.prepare(gpu_model, (images, labels), batch_size=100, device="cuda")
    before = {k: v.clone() for k, v in gpu_model.state_dict().items()}
    for site in select_sites(cpu.sites, kind):
        a = engine.run_faults(cpu, site, kind, "random", seed=2, images_per_weight_fault=32, record="all").records
        b = engine.run_faults(gpu, site, kind, "random", seed=2, images_per_weight_fault=32, record="all").records
        for column in ("image", "position", "bit", "fault_group", "golden_correct"):
            assert np.array_equal(getattr(a, column), getattr(b, column)), (site, column)
        assert np.allclose(a.value_before, b.value_before, rtol=1e-4, atol=1e-5)
        assert (a.faulty == b.faulty).mean() > 0.97
    for k, v in gpu_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gpu_engine_agrees_with_reference_on_gpu():
    model = plain_net().cuda()
    images, labels = make_data(128)
    bench = engine.prepare(model, (images, labels), batch_size=64, device="cuda")
    for site in bench.sites:
        ours = engine.run_faults(bench, site, "neuron", 30, seed=5, record="all").records
        ref = reference_run(model, images, site, "neuron", 30, seed=5, batch_size=64)
        assert np.array_equal(ours.faulty, ref.faulty), site


def test_strict_fp32_keeps_a_flip_of_mantissa_bit_0_in_a_convolution_input():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).cuda().eval()
    x = torch.randn(8, 64, 32, 32, device="cuda")
    x_flipped = x.clone()
    x_flipped[0, 5, 7, 7] = flip_bit(x[0, 5, 7, 7], 0)
    with engine.math_mode("fp32"), torch.inference_mode():
        assert not torch.equal(conv(x), conv(x_flipped))  # the fault is visible in strict FP32
