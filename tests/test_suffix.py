"""Prefix reuse (trainables.inject.suffix): every record identical to the full forward pass, the
cache left intact, its budget kept, and models that cannot be split running the full pass."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from campaign.spec import CampaignSpec, SpecError, resolve, spec_from_mapping
from tests.models_for_tests import make_data
from trainables.inject import engine, suffix
from trainables.trial import CampaignSettings, TrialPoint, run_trial
from trainables.zoo.data import load_dataset
from trainables.zoo.demo_models import DemoViT
from trainables.zoo.models import load_model


class FunctionalResidual(nn.Module):
    """Residual connections written with functional and in-place adds: ``x`` is live across
    four sites, and ``y.add_(out)`` writes into a tensor cached at the cut after ``conv3``
    (fx traces ``y += out`` as an out-of-place add, ``add_`` stays in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.act(torch.add(self.conv2(x), x))
        out = self.conv3(y)
        y.add_(out)
        z = F.relu(self.drop(y) * 0.5 + x, inplace=True)
        return self.fc(z.mean((2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


def seeded(cls):
    torch.manual_seed(0)
    return cls().eval()


def fashion(n):
    data = load_dataset("fashion-mnist", limit=n)
    return data.images, data.labels


def random_28(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# model -> (build, data, batch size, site kinds, the sites whose cut is at the input)
MODELS = {
    "demo:vgg": (lambda: load_model("demo:vgg"), lambda: fashion(48), 24, ("neuron", "weight"),
                 {("neuron", "input"), ("weight", "features.0")}),
    "demo:resnet": (lambda: load_model("demo:resnet"), lambda: fashion(32), 16, ("neuron", "weight"),
                    {("neuron", "input"), ("weight", "conv1")}),
    "functional-residual": (lambda: seeded(FunctionalResidual), lambda: make_data(64), 32, ("neuron", "weight", "param"),
                            {("neuron", "input"), ("weight", "conv1"), ("param", "conv1.weight"), ("param", "conv1.bias")}),
    "demo:vit": (lambda: seeded(DemoViT), lambda: random_28(16), 8, ("neuron", "param"),
                 {("neuron", "input"), ("param", "conv_proj.weight"), ("param", "conv_proj.bias")}),
}


def assert_same_records(full, pre):
    for column, a in full.records.as_dict().items():
        assert np.array_equal(a, getattr(pre.records, column), equal_nan=column.startswith("value")), column
    assert np.array_equal(full.counts.by_bit, pre.counts.by_bit)


def sites_of(bench, kind):
    if kind == "param":  # blocks 1-3 of the ViT repeat block 0
        return [p for p in bench.params if not any(f"encoder_layer_{i}" in p.name for i in (1, 2, 3))]
    return [s for s in bench.sites if kind == "neuron" or s.is_weight_site]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_site_gives_the_full_forward_records(name):
    """Every neuron site (leaf and container calls), weight site and (for two models) param
    site, bits 30 and random: each fault's faulty top-1 and values equal the full forward
    pass's. Only sites whose cut is at the input run the full pass."""
    make_model, make_images, batch, kinds, at_input = MODELS[name]
    bench = engine.prepare(make_model(), make_images(), batch_size=batch, device="cpu", prefix=True)
    changed, full_path = 0, set()
    for kind in kinds:
        for site in sites_of(bench, kind):
            for bit in (30, "random"):
                full = engine.run_faults(bench, site, kind, bit, seed=2, images_per_weight_fault=24, record="all", prefix=False)
                pre = engine.run_faults(bench, site, kind, bit, seed=2, images_per_weight_fault=24, record="all")
                assert_same_records(full, pre)
                changed += int(full.records.changed.sum())
                if pre.path == "full":
                    full_path.add((kind, site.name))
                    assert bench.prefix_state.reasons[(site.index, site.name, site.call, kind)] in suffix.SILENT_REASONS
    assert changed > 100  # the faults change predictions: the comparison has teeth
    assert full_path == at_input


def test_module_reuse_and_residual_cut_carry_every_live_value():
    bench = engine.prepare(load_model("demo:resnet"), fashion(8), batch_size=8, device="cpu", prefix=True)
    relu_call1 = next(s for s in bench.sites if s.name == "layer2.relu" and s.call == 1)
    relu_call0 = next(s for s in bench.sites if s.name == "layer2.relu" and s.call == 0)
    engine.run_faults(bench, relu_call0, "neuron", 30, seed=1)
    # inside the block: the downsampled identity (computed first in DemoResNet) and the site's output cross the cut
    assert bench.prefix_state.runner.split.live == ["layer2_downsample_1", "layer2_relu"]
    engine.run_faults(bench, relu_call1, "neuron", 30, seed=1)
    assert bench.prefix_state.runner.split.live == ["layer2_relu_1"]


def test_suffix_writing_into_a_cached_tensor_gets_a_copy_and_the_cache_stays_intact():
    bench = engine.prepare(seeded(FunctionalResidual), make_data(64), batch_size=32, device="cpu", prefix=True)
    conv3 = next(s for s in bench.sites if s.name == "conv3")
    first = engine.run_faults(bench, conv3, "neuron", 30, seed=1, record="all")
    runner = bench.prefix_state.runner
    assert runner.split.live == ["relu", "act", "conv3"]  # x, y and the site's output
    assert runner.split.clone_slots == (1,)  # y.add_(out) writes into y
    cached = {k: [v.clone() for v in values] for k, values in runner.cache.items()}
    for bit in (31, 22, 30):
        engine.run_faults(bench, conv3, "neuron", bit, seed=1)
    assert all(torch.equal(a, b) for k, values in runner.cache.items() for a, b in zip(values, cached[k]))
    again = engine.run_faults(bench, conv3, "neuron", 30, seed=1, record="all")
    assert_same_records(first, again)


def test_cache_keeps_its_budget_and_recomputes_the_rest():
    images, labels = make_data(64)
    probe = engine.prepare(seeded(FunctionalResidual), (images, labels), batch_size=32, device="cpu", prefix=True)
    site = next(s for s in probe.sites if s.name == "conv2")
    engine.run_faults(probe, site, "neuron", 30, seed=1)
    per_batch = probe.prefix_state.runner.used // 2  # two batches of 32 cached: x and conv2 output
    assert per_batch == 2 * 32 * 8 * 8 * 8 * 4
    bench = engine.prepare(seeded(FunctionalResidual), (images, labels), batch_size=32, device="cpu", prefix=True,
                           prefix_cache_mb=1.5 * per_batch / 2**20)
    full = engine.run_faults(bench, site, "neuron", 30, seed=1, record="all", prefix=False)
    for _ in range(2):
        assert_same_records(full, engine.run_faults(bench, site, "neuron", 30, seed=1, record="all"))
    runner = bench.prefix_state.runner
    assert list(runner.cache) == [(0, 32)] and runner.used == per_batch
    assert (runner.hits, runner.misses) == (3, 3)  # batch 32..63 is recomputed every time


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_half_modes_identical(mode):
    bench = engine.prepare(load_model("demo:resnet"), fashion(32), mode=mode, batch_size=16, device="cpu", prefix=True)
    for site in bench.sites[1::5]:
        full = engine.run_faults(bench, site, "neuron", "random", seed=3, record="all", prefix=False)
        pre = engine.run_faults(bench, site, "neuron", "random", seed=3, record="all")
        assert pre.path == "prefix"
        assert_same_records(full, pre)


def test_untraceable_model_runs_the_full_pass_and_says_why_once():
    model = seeded(Untraceable)
    bench = engine.prepare(model, make_data(40), batch_size=16, device="cpu", prefix=True)
    for site in bench.sites[1:]:
        full = engine.run_faults(bench, site, "neuron", 30, seed=1, record="all", prefix=False)
        pre = engine.run_faults(bench, site, "neuron", 30, seed=1, record="all")
        assert pre.path == "full"
        assert_same_records(full, pre)
    chosen = [("neuron", s) for s in bench.sites] + [("weight", s) for s in bench.sites if s.is_weight_site]
    reasons = suffix.fallback_reasons(model, chosen, bench.images[:2])
    assert list(reasons) == [("neuron", "torch.fx cannot trace Untraceable: symbolically traced variables cannot be "
                                        "used as inputs to control flow"), ("weight", "torch.fx cannot trace Untraceable: "
                             "symbolically traced variables cannot be used as inputs to control flow")]
    assert reasons[list(reasons)[0]] == ["1 conv#0", "2 fc#0"]  # the input site loses nothing: not listed


def test_bad_cache_budget_is_one_clear_line():
    for bad in (0, -1, "lots", float("nan"), True):
        with pytest.raises(ValueError, match=r"^prefix_cache_mb must be a positive size in MiB, got .*$"):
            engine.prepare(seeded(FunctionalResidual), make_data(4), device="cpu", prefix=True, prefix_cache_mb=bad)
    with pytest.raises(SpecError, match=r"^prefix_cache_mb: cannot read 'lots' as a number$"):
        spec_from_mapping({"prefix-cache-mb": "lots"})
    with pytest.raises(SpecError, match=r"^prefix_cache_mb: must be a positive size in MiB, got -2.0$"):
        resolve(spec_from_mapping({"prefix_cache_mb": "-2"}))


def test_trials_are_site_major_and_a_splittable_model_has_no_notes():
    plan = resolve(CampaignSpec(model="demo:vgg", sites=("neuron",), layers="1,2", bits="30,31", seeds=(5, 6), images=8))
    assert [(t.site, t.seed, t.bit) for t in plan.trials] == [
        (1, 5, 30), (1, 5, 31), (1, 6, 30), (1, 6, 31), (2, 5, 30), (2, 5, 31), (2, 6, 30), (2, 6, 31)]
    assert plan.notes == () and plan.reuses_prefix


def test_prefix_reuse_is_used_only_where_a_site_has_several_trials():
    """One trial per site (the demo: one seed, random bit) has no cached prefix to share."""
    one = dict(model="demo:vgg", sites=("neuron",), layers="1,2", images=8)
    assert not resolve(CampaignSpec(**one, bits="random", seeds=(5,))).reuses_prefix
    assert resolve(CampaignSpec(**one, bits="random", seeds=(5, 6))).reuses_prefix
    assert resolve(CampaignSpec(**one, bits="30,31", seeds=(5,))).reuses_prefix
    assert not resolve(CampaignSpec(**one, bits="30,31", seeds=(5, 6), prefix=False)).reuses_prefix


def test_trial_rows_say_which_path_ran_and_agree(tmp_path):
    rows = {}
    for prefix in (True, False):
        settings = CampaignSettings(name="t", directory=str(tmp_path / str(prefix)), model="demo:vgg",
                                    dataset="fashion-mnist", images=300, report_every=128, record="all", prefix=prefix)
        rows[prefix] = [run_trial(settings, TrialPoint(kind, site, 30, 4)) for kind, site in (("neuron", 0), ("neuron", 6), ("weight", 5))]
    assert [r["path"] for r in rows[True]] == ["full", "prefix", "prefix"]  # the input site has no prefix
    assert [r["path"] for r in rows[False]] == ["full", "full", "full"]
    for a, b in zip(rows[True], rows[False]):
        assert (a["images"], a["mismatches"], a["changed"], a["nonfinite"]) == (b["images"], b["mismatches"], b["changed"], b["nonfinite"])
    assert rows[True][1]["changed"] > 0
    faults = [pd.read_parquet(tmp_path / str(p) / "faults").sort_values(["trial_key", "image"]) for p in (True, False)]
    assert faults[0]["faulty"].tolist() == faults[1]["faulty"].tolist() and len(faults[0]) == 900
