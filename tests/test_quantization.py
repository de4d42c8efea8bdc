"""int8 quantized models (torch.ao FX PTQ, x86 backend) and fp8 weight storage: faults equal
hand edits of the stored integers (bitstring as the oracle), weights come back bit for bit,
bad inputs get one line, and int8 accuracy stays within a point of fp32."""
import math

import pytest
import torch
from bitstring import BitArray

from trainables.inject import engine, formats
from trainables.zoo import quantization as Q
from trainables.zoo.data import load_dataset
from trainables.zoo.models import load_model

N = 128  # images per fault check


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", limit=1000)


@pytest.fixture(scope="module")
def int8_vgg():
    return Q.quantize_int8(load_model("demo:vgg"), Q.calibration_data("fashion-mnist"), "demo:vgg")


@pytest.fixture(scope="module")
def int8_bench(int8_vgg, fashion):
    return engine.prepare(int8_vgg, (fashion.images[:N], fashion.labels[:N]), "int8", batch_size=64, device="cpu")


def flipped_code(code: int, bit: int, signed: bool) -> int:
    """``code`` with LSB-0 ``bit`` flipped, by bitstring (MSB-first: position 7 - bit)."""
    bits = BitArray(int=code, length=8) if signed else BitArray(uint=code, length=8)
    bits.invert(7 - bit)
    return bits.int if signed else bits.uint


def hand_flip(q: torch.Tensor, positions, bits) -> torch.Tensor:
    """Image i's element positions[i] (logical C,H,W order) with bits[i] flipped in q's codes."""
    codes = q.int_repr().contiguous()
    flat = codes.view(codes.shape[0], -1)
    for i, (p, b) in enumerate(zip(positions.tolist(), bits.tolist())):
        flat[i, p] = flipped_code(int(flat[i, p]), b, signed=q.dtype == torch.qint8)
    return torch._make_per_tensor_quantized_tensor(codes, q.q_scale(), q.q_zero_point())


def reference_neuron(model, images, site, positions, bits) -> torch.Tensor:
    """Faulty top-1 per image: the site's output edited by hand, run through the rest of the model."""
    with torch.inference_mode():
        if site.index == 0:
            return model(hand_flip(images, positions, bits)).argmax(1)
        module = model.get_submodule(site.name)
        handle = module.register_forward_hook(lambda _m, _i, out: hand_flip(out, positions, bits))
        try:
            return model(images).argmax(1)
        finally:
            handle.remove()


def test_int8_sites_are_the_quantized_modules(int8_bench):
    sites = [(s.index, s.name, s.module_type, s.is_weight_site) for s in int8_bench.sites]
    assert sites[0] == (0, "input", "Identity", False)
    assert (13, "classifier.0", "LinearReLU", True) in sites  # Linear + ReLU fused: one site
    assert [s.name for s in int8_bench.sites if s.is_weight_site] == ["features.0", "features.4", "features.8",
                                                                      "classifier.0", "classifier.3"]
    assert int8_bench.images.dtype == torch.quint8 and int8_bench.width_for("neuron") == 8
    assert int8_bench.dtype_for("weight") == torch.qint8


@pytest.mark.parametrize("index", [0, 1, 3, 13, 15])
def test_int8_neuron_flips_equal_hand_edits_of_int_repr(int8_bench, index):
    bench = int8_bench
    site = bench.site("neuron", index)
    out = engine.run_faults(bench, site, "neuron", "random", seed=3, record="all")
    rec = out.records
    assert len(rec) == N and sorted(set(rec.bit.tolist())) == list(range(8))
    expected = reference_neuron(bench.model, bench.images, site, torch.from_numpy(rec.position), torch.from_numpy(rec.bit))
    assert rec.faulty.tolist() == expected.tolist()
    assert out.counts.mismatches == int(((expected != bench.golden) & bench.golden_correct).sum())


def test_int8_neuron_records_decode_codes_with_scale_and_zero_point(int8_bench):
    bench = int8_bench
    site = bench.site("neuron", 3)  # features.2 (ReLU): quint8 codes
    rec = engine.run_faults(bench, site, "neuron", 7, seed=5, record="all").records
    captured = []
    handle = bench.model.get_submodule(site.name).register_forward_hook(lambda _m, _i, o: captured.append(o))
    with torch.inference_mode():
        bench.model(bench.images[:1])
    handle.remove()
    scale, zero_point = captured[0].q_scale(), captured[0].q_zero_point()
    codes = rec.raw_before.astype("int64") & 0xFF  # the int8 view of a quint8 code
    assert (rec.value_before == (codes - zero_point) * scale).all()
    assert (rec.value_after == ((codes ^ 128) - zero_point) * scale).all()  # bit 7 of an unsigned code adds 128 x scale


def test_int8_prefix_reuse_gives_the_same_faults(int8_bench):
    site = int8_bench.site("neuron", 5)
    full = engine.run_faults(int8_bench, site, "neuron", "random", seed=2, stop=64, record="all", prefix=False)
    reused = engine.run_faults(int8_bench, site, "neuron", "random", seed=2, stop=64, record="all", prefix=True)
    assert reused.path == "prefix" and full.path == "full"
    assert (reused.counts.by_bit == full.counts.by_bit).all()
    assert reused.records.faulty.tolist() == full.records.faulty.tolist()


def packed_state(model):
    """Every packed weight's codes, quantization parameters and bias, and the packed bytes."""
    state = {}
    for name, m in model.named_modules():
        w = formats.packed_weight(m)
        if w is not None:
            state[name] = (w.int_repr().clone(), w.q_per_channel_scales().clone(), w.q_per_channel_zero_points().clone(),
                           m.bias().clone())
    return state


@pytest.mark.parametrize("index", [1, 15])
def test_int8_weight_flips_equal_hand_edits_and_packed_weights_come_back(int8_bench, index):
    bench = int8_bench
    site = bench.site("weight", index)
    before = packed_state(bench.model)
    with torch.inference_mode():
        logits_before = bench.model(bench.images[:64])
    out = engine.run_faults(bench, site, "weight", "random", seed=4, images_per_weight_fault=32, record="all")
    module = bench.model.get_submodule(site.name)
    w, b = module.weight(), module.bias()
    expected = []
    for g in range(N // 32):
        pos, bit = int(out.records.position[g * 32]), int(out.records.bit[g * 32])
        codes = w.int_repr().contiguous().clone()
        flat = codes.view(-1)
        flat[pos] = flipped_code(int(flat[pos]), bit, signed=True)
        module.set_weight_bias(torch._make_per_channel_quantized_tensor(
            codes, w.q_per_channel_scales(), w.q_per_channel_zero_points(), w.q_per_channel_axis()), b)
        with torch.inference_mode():
            expected += bench.model(bench.images[g * 32 : (g + 1) * 32]).argmax(1).tolist()
        module.set_weight_bias(w, b)
    assert out.records.faulty.tolist() == expected
    after = packed_state(bench.model)
    assert before.keys() == after.keys() and len(after) == 5
    for name in before:
        assert all(torch.equal(x, y) for x, y in zip(before[name], after[name])), name
    with torch.inference_mode():
        assert torch.equal(bench.model(bench.images[:64]), logits_before)


def test_fp8_weight_flips_equal_hand_edits_of_the_stored_bytes(fashion):
    images, labels = fashion.images[:N], fashion.labels[:N]
    bench = engine.prepare(load_model("demo:vgg"), (images, labels), "fp32", batch_size=100, device="cpu",
                           weight_format="fp8_e4m3fn")
    site = bench.site("weight", 5)  # features.4, a Conv2d
    module = bench.model.get_submodule(site.name)
    stored = module.weight_fp8
    assert stored.dtype == torch.float8_e4m3fn and bench.width_for("weight") == 8 and bench.width_for("neuron") == 32
    saved = stored.clone()
    out = engine.run_faults(bench, site, "weight", "random", seed=6, images_per_weight_fault=32, record="all")
    assert torch.equal(stored.view(torch.uint8), saved.view(torch.uint8))  # restored bit for bit
    expected = []
    for g in range(N // 32):
        pos, bit = int(out.records.position[g * 32]), int(out.records.bit[g * 32])
        raw = stored.view(torch.uint8).view(-1)
        assert out.records.raw_before[g * 32] & 0xFF == int(raw[pos])
        raw[pos] = flipped_code(int(raw[pos]), bit, signed=False)
        with torch.inference_mode():
            expected += bench.model(images[g * 32 : (g + 1) * 32]).argmax(1).tolist()
        value = float(stored.view(-1)[pos].float())
        assert out.records.value_after[g * 32] == value or (math.isnan(value) and math.isnan(out.records.value_after[g * 32]))
        stored.copy_(saved)
    assert out.records.faulty.tolist() == expected
    # the sites and their numbering are those of the fp32 model
    plain = engine.prepare(load_model("demo:vgg"), (images[:8], labels[:8]), "fp32", device="cpu")
    assert [(s.index, s.name, s.weight_shape) for s in bench.sites] == [(s.index, s.name, s.weight_shape) for s in plain.sites]


def test_fp8_e5m2_prefix_reuse_matches_the_full_pass(fashion):
    bench = engine.prepare(load_model("demo:resnet"), (fashion.images[:64], fashion.labels[:64]), "fp32", batch_size=32,
                           device="cpu", weight_format="fp8_e5m2")
    site = bench.site("weight", 4)  # layer1.conv1
    assert site.module_type == "Conv2d"
    full = engine.run_faults(bench, site, "weight", "random", seed=1, images_per_weight_fault=16, record="all", prefix=False)
    reused = engine.run_faults(bench, site, "weight", "random", seed=1, images_per_weight_fault=16, record="all", prefix=True)
    assert reused.path == "prefix" and reused.records.faulty.tolist() == full.records.faulty.tolist()


def test_bad_inputs_get_one_line(int8_bench, fashion):
    data = (fashion.images[:8], fashion.labels[:8])
    cases = [
        (lambda: engine.run_faults(int8_bench, int8_bench.site("neuron", 1), "neuron", 8, seed=1),
         "bit 8 is outside int8 (quint8 activations): allowed 0..7"),
        (lambda: engine.run_faults(int8_bench, int8_bench.site("weight", 1), "weight", 9, seed=1),
         "bit 9 is outside int8 (qint8 weights): allowed 0..7"),
        (lambda: engine.prepare(int8_bench.model, data, "fp32", device="cpu"), "int8-quantized: its mode is int8"),
        (lambda: engine.prepare(load_model("demo:vgg"), data, "int8", device="cpu"), "mode int8 needs a quantized model"),
        (lambda: engine.prepare(int8_bench.model, data, "int8", device="cpu", weight_format="fp8_e5m2"), "not both"),
        (lambda: engine.prepare(load_model("demo:vgg"), data, "fp32", device="cpu", weight_format="fp4"),
         "unknown weight format 'fp4'"),
        (lambda: engine.prepare(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU()), data, "fp32", device="cpu",
                                weight_format="fp8_e4m3fn"), "has no weight sites"),
        (lambda: Q.quantize_int8(load_model("demo:text"), torch.zeros(4, 32, dtype=torch.int64), "demo:text"),
         "needs floating image inputs"),
        (lambda: Q.calibration_data("fashion-mnist-calib"), "no calibration split for 'fashion-mnist-calib'"),
    ]
    fp8_bench = engine.prepare(load_model("demo:vgg"), data, "fp32", device="cpu", weight_format="fp8_e4m3fn")
    cases.append((lambda: engine.run_faults(fp8_bench, fp8_bench.site("weight", 1), "weight", 8, seed=1),
                  "bit 8 is outside fp8_e4m3fn: allowed 0..7"))
    for call, message in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_untraceable_model_is_refused_in_one_line():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent control flow: not traceable

    with pytest.raises(ValueError, match=r"^--quantize int8: torch.fx cannot trace branchy \(TraceError") as info:
        Q.quantize_int8(Branchy(), torch.randn(8, 4), "branchy")
    assert "\n" not in str(info.value)


def test_missing_backend_is_refused_in_one_line(monkeypatch):
    monkeypatch.delenv(Q.ENGINE_VARIABLE, raising=False)
    monkeypatch.setattr(Q, "_supported_engines", lambda: ["qnnpack", "none"])
    model = load_model("demo:vgg")
    with pytest.raises(ValueError, match=r"^--quantize int8 needs the x86 or fbgemm quantized backend, and this torch build "
                                         r"has only qnnpack$"):
        Q.quantize_int8(model, torch.zeros(2, 1, 28, 28), "demo:vgg")
    assert type(model.features[0]) is torch.nn.Conv2d  # refused before any work


def test_a_forced_engine_is_used_or_refused_in_one_line(monkeypatch):
    """BITFLIP_QUANTIZED_ENGINE picks the int8 kernels (how one CPU reproduces another class's)."""
    monkeypatch.setattr(Q, "_supported_engines", lambda: ["qnnpack", "x86", "fbgemm", "onednn", "none"])
    monkeypatch.setenv(Q.ENGINE_VARIABLE, "onednn")
    assert Q.backend() == "onednn"
    monkeypatch.delenv(Q.ENGINE_VARIABLE)
    assert Q.backend() == "x86"
    monkeypatch.setenv(Q.ENGINE_VARIABLE, "qnnpack")
    with pytest.raises(ValueError, match=r"^BITFLIP_QUANTIZED_ENGINE=qnnpack: use one of x86, fbgemm, onednn \(the "):
        Q.backend()


def test_quantization_is_deterministic():
    def small():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 26 * 26, 10)).eval()

    calibration = Q.calibration_data("fashion-mnist", limit=64)
    one, two = (Q.quantize_int8(small(), calibration, "small") for _ in range(2))
    assert getattr(one, formats.INPUT_QPARAMS) == getattr(two, formats.INPUT_QPARAMS)
    assert packed_state(one).keys() == packed_state(two).keys() == {"0", "4"}  # Conv-BN-ReLU fused into "0"
    for (name, a), (_, b) in zip(packed_state(one).items(), packed_state(two).items()):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name
    assert [(n, m.scale, m.zero_point) for n, m in one.named_modules() if hasattr(m, "scale")] == \
           [(n, m.scale, m.zero_point) for n, m in two.named_modules() if hasattr(m, "scale")]


@pytest.mark.parametrize("name", ["demo:vgg", "demo:resnet"])
def test_int8_clean_accuracy_within_one_point_of_fp32(name, fashion, int8_vgg):
    """On the first 1,000 test images (all 10,000: see the README)."""
    data = (fashion.images, fashion.labels)
    fp32 = engine.prepare(load_model(name), data, "fp32", batch_size=500, device="cpu").clean_accuracy
    model = int8_vgg if name == "demo:vgg" else Q.quantize_int8(load_model(name), Q.calibration_data("fashion-mnist"), name)
    int8 = engine.prepare(model, data, "int8", batch_size=500, device="cpu").clean_accuracy
    assert abs(int8 - fp32) <= 0.01, (name, int8, fp32)
    assert round(fp32 * 1000) == {"demo:vgg": 928, "demo:resnet": 923}[name]  # fp32: the same on AVX2 and AVX512
    with torch.inference_mode():  # int8 depends on the kernels (oneDNN or fbgemm): the model run directly is the oracle
        inputs = formats.quantize_inputs(model, fashion.images)
        top1 = torch.cat([model(inputs[lo : lo + 500]).argmax(1) for lo in range(0, len(inputs), 500)])
    assert int8 == float((top1 == fashion.labels).float().mean())


def test_campaign_spec_refuses_bad_format_settings_in_one_line_each():
    from campaign.spec import CampaignSpec, SpecError, check_plain_fields, resolve

    cases = {
        "quantize: unknown 'int4': use int8 (or leave it out for a float model)": dict(quantize="int4"),
        "weight_format: unknown 'fp8': use one of fp8_e4m3fn, fp8_e5m2": dict(weight_format="fp8"),
        "quantize: an int8 model computes in int8; --dtype fp16 does not apply (leave it at fp32)": dict(quantize="int8",
                                                                                                          dtype="fp16"),
        "gpus_per_trial: int8 quantized models run on the CPU (the x86/fbgemm backend): use 0": dict(quantize="int8",
                                                                                                  gpus_per_trial=1.0),
        "sites: param sites are not supported with --weight-format fp8_e5m2 (its faults go to neuron and weight sites)":
            dict(weight_format="fp8_e5m2", sites=("param",)),
    }
    for message, fields in cases.items():
        assert check_plain_fields(CampaignSpec(**fields)) == [message]
    both = check_plain_fields(CampaignSpec(quantize="int8", weight_format="fp8_e5m2"))
    assert len(both) == 1 and "use --quantize or --weight-format, not both" in both[0]
    with pytest.raises(SpecError) as info:
        resolve(CampaignSpec(weight_format="fp8_e4m3fn", bits="30", images=8))
    assert str(info.value) == ("bits: bit 30 is outside a 8-bit dtype: allowed 0..7 (LSB = 0) for the fp8_e4m3fn weights "
                               "(run wider bits in a neuron-only campaign)")
    plan = resolve(CampaignSpec(weight_format="fp8_e4m3fn", bits="all", layers="1", images=8))
    assert sorted({(t.kind, t.bit) for t in plan.trials if t.kind == "weight"}) == [("weight", b) for b in range(8)]
    assert sorted({t.bit for t in plan.trials if t.kind == "neuron"}) == list(range(32))
    assert plan.directory.name == "demo_vgg-fashion-mnist-fp32-fp8_e4m3fn"
    assert plan.identity()["weight_format"] == "fp8_e4m3fn" and plan.identity()["quantize"] is None


# ---------------------------------------------------------------- qparam sites (scales and zero points)


def qparam_state(model):
    """Every quantized module's output scale/zero point (type and exact bits), every buffer,
    and the packed weights (codes, per-channel scales and zero points, bias)."""
    import struct

    attrs = {}
    for name, m in model.named_modules():
        for attr in ("scale", "zero_point"):
            value = getattr(m, attr, None)
            if isinstance(value, float):
                attrs[f"{name}.{attr}"] = ("float", struct.pack("<d", value))
            elif isinstance(value, int):
                attrs[f"{name}.{attr}"] = ("int", value)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return attrs, buffers, packed_state(model)


def assert_same_state(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert before[1][k].dtype == after[1][k].dtype and torch.equal(before[1][k], after[1][k]), k
    assert before[2].keys() == after[2].keys()
    for name in before[2]:
        assert all(torch.equal(x, y) for x, y in zip(before[2][name], after[2][name])), name


def float32_flipped(value: float, bit: int) -> float:
    """float32 ``value`` with LSB-0 ``bit`` flipped, by bitstring (MSB-first: position 31 - bit)."""
    bits = BitArray(float=value, length=32)
    bits.invert(31 - bit)
    return bits.float


def test_qparam_sites_are_the_scales_and_zero_points_in_forward_order(int8_bench):
    from trainables.inject import qparams

    q = int8_bench.qsites
    assert [s.name for s in q[:6]] == ["features.0.scale", "features.0.zero_point", "features.0.weight_scale",
                                       "features.0.weight_zero_point", "features.1.scale", "features.1.zero_point"]
    assert len(q) == 26 and [s.index for s in q] == list(range(26))
    assert [(s.module_type, s.layer, s.numel) for s in q[2:6]] == [("Conv2d", 1, 16), ("Conv2d", 1, 16),
                                                                   ("BatchNorm2d", 2, 1), ("BatchNorm2d", 2, 1)]
    assert q[-1].name == "classifier.3.weight_zero_point" and q[-1].numel == 10
    assert int8_bench.width_for("qparam") == 32 and qparams.WIDTH == 32
    float_bench = engine.prepare(load_model("demo:vgg"), (int8_bench.images.dequantize()[:8], int8_bench.labels[:8]),
                                 "fp32", device="cpu")
    assert float_bench.qsites == [] and float_bench.site("qparam", 0) is None


# (site, seed): features.4.scale, features.4.weight_scale, features.1.zero_point (a buffer). How many
# predictions change depends on the int8 kernels (x86 runs convolutions on oneDNN or fbgemm by CPU,
# and they differ for a zero point far outside 8 bits): the hand edits are the oracle.
@pytest.mark.parametrize("index, seed", [(6, 4), (8, 2), (5, 4)])
def test_qparam_flips_equal_hand_edits_and_everything_comes_back(int8_bench, index, seed):
    bench = int8_bench
    site = bench.site("qparam", index)
    module = bench.model.get_submodule(site.module_name)
    before = qparam_state(bench.model)
    out = engine.run_faults(bench, site, "qparam", "random", seed=seed, images_per_weight_fault=32, record="all")
    assert_same_state(before, qparam_state(bench.model))  # restored bit for bit
    rec = out.records
    assert int(rec.changed.sum()) == out.counts.total("changed")
    assert len(rec) == N and (rec.fault_group == torch.arange(N).numpy() // 32).all()
    expected = []
    for g in range(N // 32):
        pos, bit = int(rec.position[g * 32]), int(rec.bit[g * 32])
        if site.field == "scale":  # a python float: the fp32 value with the bit flipped
            old = module.scale
            new = float32_flipped(old, bit)
            module.scale = new
        elif site.field == "weight_scale":  # the per-channel float64 scales hold fp32 values
            w, b = module.weight(), module.bias()
            scales = w.q_per_channel_scales().clone()
            old = float(scales[pos])
            new = float32_flipped(old, bit)
            scales[pos] = new
            module.set_weight_bias(torch._make_per_channel_quantized_tensor(
                w.int_repr(), scales, w.q_per_channel_zero_points(), w.q_per_channel_axis()), b)
        else:  # a zero point buffer (int64): the int32 value with the bit flipped
            old = int(module.zero_point)
            new = BitArray(int=old, length=32)
            new.invert(31 - bit)
            new = new.int
            module.zero_point.fill_(new)
        assert rec.value_before[g * 32] == old and rec.value_after[g * 32] == new
        with torch.inference_mode():
            expected += bench.model(bench.images[g * 32 : (g + 1) * 32]).argmax(1).tolist()
        if site.field == "scale":
            module.scale = old
        elif site.field == "weight_scale":
            module.set_weight_bias(w, b)
        else:
            module.zero_point.fill_(old)
    assert rec.faulty.tolist() == expected
    assert int(rec.changed.sum()) == int((torch.tensor(expected) != bench.golden).sum()) > 0  # they do change some
    assert out.counts.mismatches == int(((torch.tensor(expected) != bench.golden) & bench.golden_correct).sum())
    assert_same_state(before, qparam_state(bench.model))


def test_qparam_draws_are_their_own_and_stable(int8_bench):
    from trainables.inject import fault_models

    site = int8_bench.site("qparam", 2)  # features.0.weight_scale: 16 elements
    out = engine.run_faults(int8_bench, site, "qparam", "random", seed=9, images_per_weight_fault=64, record="all")
    drawn = fault_models.sample(9, "qparam", 2, "random", 32, 16, 0, 2)
    assert out.records.position[::64].tolist() == drawn.positions.tolist()
    assert out.records.bit[::64].tolist() == drawn.bits.tolist()
    weight = fault_models.sample(9, "weight", 2, "random", 32, 16, 0, 2)  # another kind salt: other draws
    assert (drawn.positions.tolist(), drawn.bits.tolist()) != (weight.positions.tolist(), weight.bits.tolist())


def test_qparam_bad_inputs_get_one_line(int8_bench):
    from campaign.spec import CampaignSpec, check_plain_fields

    float_bench = engine.prepare(load_model("demo:vgg"), (int8_bench.images.dequantize()[:8], int8_bench.labels[:8]),
                                 "fp32", device="cpu")
    site = int8_bench.site("qparam", 0)
    cases = [
        (lambda: engine.run_faults(int8_bench, site, "qparam", 32, seed=1),
         "bit 32 is outside a qparam element (32 bits: float32 scales, int32 zero points): allowed 0..31 (LSB = 0)"),
        (lambda: engine.run_faults(float_bench, site, "qparam", 3, seed=1),
         "qparam sites are the scales and zero points of an int8 model; this model's mode is fp32: use --quantize int8"),
        (lambda: engine.run_faults(int8_bench, int8_bench.site("weight", 1), "qparam", 3, seed=1),
         "qparam faults need a QParamSite"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)
    assert check_plain_fields(CampaignSpec(sites=("neuron", "qparam"))) == [
        "sites: qparam sites are the scales and zero points of an int8 model: add --quantize int8"]
    assert check_plain_fields(CampaignSpec(sites=("qparam",), quantize="int8")) == []


def test_qparam_campaign_plans_32_bit_trials_and_rows_record_the_kind(tmp_path):
    from campaign.spec import CampaignSpec, resolve
    from trainables.trial import CampaignSettings, TrialPoint, run_trial

    plan = resolve(CampaignSpec(quantize="int8", sites=("neuron", "qparam"), bits="all", layers="1", images=8))
    assert plan.sites_by_kind["qparam"] == [0, 1, 2, 3]  # features.0's scale, zero point, weight scales and zero points
    assert sorted({t.bit for t in plan.trials if t.kind == "qparam"}) == list(range(32))
    assert sorted({t.bit for t in plan.trials if t.kind == "neuron"}) == list(range(8))
    assert "features.0.weight_zero_point" in plan.site_table
    settings = CampaignSettings("q", str(tmp_path), "demo:vgg", "fashion-mnist", images=64, mode="int8",
                                images_per_weight_fault=32, record="none", prefix=False)
    row = run_trial(settings, TrialPoint("qparam", 6, 30, 1))  # features.4.scale, exponent MSB
    assert (row["kind"], row["site_name"], row["site_call"], row["images_per_weight_fault"]) == \
           ("qparam", "features.4.scale", None, 32)
    assert row["trial_key"] == "qparam-s0006-b30-seed1" and row["images"] == row["effective"] == 64
    from trainables.trial import workbench  # the worker's cached model: the oracle edits it by hand
    bench, _ = workbench(settings, torch.device("cpu"))
    module = bench.model.get_submodule("features.4")
    old = module.scale
    module.scale = float32_flipped(old, 30)
    try:
        with torch.inference_mode():
            faulty = bench.model(bench.images).argmax(1)
    finally:
        module.scale = old
    changed = faulty != bench.golden
    assert (row["changed"], row["mismatches"]) == (int(changed.sum()), int((changed & bench.golden_correct).sum()))
    assert row["changed"] > 32  # a 2**128-fold output scale: most predictions change


def test_qparam_bit_pools_resolve_per_site_scales_float32_zero_points_int32(int8_bench):
    from campaign.spec import CampaignSpec, SpecError, resolve
    from trainables.inject.faults import parse_bit_spec

    scale, zero_point = int8_bench.site("qparam", 0), int8_bench.site("qparam", 1)  # features.0.scale, .zero_point
    assert (scale.name, zero_point.name) == ("features.0.scale", "features.0.zero_point")
    exponent = parse_bit_spec("random:exponent")
    out = engine.run_faults(int8_bench, scale, "qparam", exponent, seed=2, images_per_weight_fault=2, record="all")
    assert set(out.records.bit.tolist()) == set(range(23, 31))  # float32 exponent bits, each group's fault
    with pytest.raises(ValueError, match=r"int32 \(zero points\) has no exponent field") as err:
        engine.run_faults(int8_bench, zero_point, "qparam", exponent, seed=2)
    assert "\n" not in str(err.value)
    magnitude = engine.run_faults(int8_bench, zero_point, "qparam", parse_bit_spec("random:magnitude"), seed=2,
                                  images_per_weight_fault=8, record="all")
    from trainables.inject import fault_models

    drawn = fault_models.sample(2, "qparam", 1, parse_bit_spec("random:0-30"), 32, 1, 0, N // 8)  # magnitude = bits 30-0
    assert magnitude.records.bit[::8].tolist() == drawn.bits.tolist() and max(drawn.bits) <= 30
    codes = engine.run_faults(int8_bench, int8_bench.site("neuron", 1), "neuron", parse_bit_spec("random:magnitude"), seed=2,
                              record="all")
    assert set(codes.records.bit.tolist()) == set(range(8))  # quint8 codes: 8 magnitude bits, no sign
    with pytest.raises(SpecError, match=r"^bits: bit pool random:exponent: int32 \(zero points\) has no exponent field .* "
                                        r"\(qparam sites\)$"):
        resolve(CampaignSpec(quantize="int8", sites=("qparam",), bits="random:exponent", layers="1", images=8))
    with pytest.raises(SpecError, match=r"^bits: bit pool random:sign: uint8 \(quint8 activation codes\) has no sign field "
                                        r".* \(neuron sites\)$"):
        resolve(CampaignSpec(quantize="int8", sites=("neuron", "weight"), bits="random:sign", layers="1", images=8))
    plan = resolve(CampaignSpec(quantize="int8", sites=("qparam",), bits="random:23-30", layers="1", images=8, seeds=(1,)))
    assert [t.bit for t in plan.trials] == ["random:23-30"] * 4


def test_per_bit_tables_read_qparam_zero_points_as_int32_and_scales_as_float32():
    import pandas as pd

    from analysis import tables

    rows = []
    for site, name, bit, mismatches in ((0, "features.0.scale", 30, 9), (0, "features.0.scale", 31, 1),
                                        (0, "features.0.scale", 3, 0), (1, "features.0.zero_point", 30, 2),
                                        (1, "features.0.zero_point", 31, 5), (3, "features.0.weight_zero_point", 30, 4),
                                        (8, "layer1_relu_scale_0", 2, 0), (9, "layer1_relu_zero_point_0", 2, 1)):
        rows.append(dict(model="demo:resnet", dataset="fashion-mnist", mode="int8", kind="qparam", site_index=site,
                         site_name=name, site_type="ConvReLU2d", trial_key=f"qparam-s{site:04d}-brandom-seed1",
                         bit_spec="random", bit=bit, images=10, golden_correct=10, mismatches=mismatches,
                         changed=mismatches, nonfinite=0))
    frame = pd.DataFrame(rows)
    assert tables.row_formats(frame) == ["fp32"] * 3 + ["int32"] * 3 + ["fp32", "int32"]
    fields = tables.per_bit_field(frame)
    got = [(r.element_format, r.field, r.bit_range, r.width, r.images, r.mismatches) for r in fields.itertuples()]
    assert got == [("fp32", "sign", "31", 1, 10, 1), ("fp32", "exponent", "30-23", 8, 10, 9),
                   ("fp32", "mantissa", "22-0", 23, 20, 0),  # scales: bit 3 and the functional op's bit 2
                   ("int32", "sign", "31", 1, 10, 5), ("int32", "magnitude", "30-0", 31, 30, 7)]  # never pooled with scales
    bits = tables.per_bit(frame)
    assert [(r.element_format, r.bit, r.field, r.mismatches) for r in bits.itertuples()] == [
        ("fp32", 2, "mantissa", 0), ("fp32", 3, "mantissa", 0), ("fp32", 30, "exponent", 9), ("fp32", 31, "sign", 1),
        ("int32", 2, "magnitude", 1), ("int32", 30, "magnitude", 6), ("int32", 31, "sign", 5)]
    assert [tables.group_title(i, r) for i, r in tables.groups(bits)] == [
        "demo:resnet / fashion-mnist / int8 / qparam faults (float32 scales; bit: random)",
        "demo:resnet / fashion-mnist / int8 / qparam faults (int32 zero points; bit: random)"]
    neuron = frame.assign(kind="neuron", site_name="features.0")  # other kinds: today's columns, no element_format
    assert "element_format" not in tables.per_bit(neuron.assign(bit=[7, 6, 5, 4, 3, 2, 1, 0])).columns
