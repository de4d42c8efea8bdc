"""The prefix ladder (trainables.inject.suffix): sites run in increasing forward order fill each
cache from the previous site's through a bridge, with every count and record identical to the
full forward pass and to the prefix path without the ladder, within the cache budget."""
import pytest
import torch

from tests.test_suffix import assert_same_records, fashion, random_28, seeded
from trainables.inject import engine, suffix
from trainables.zoo.demo_models import DemoViT
from trainables.zoo.models import load_model

# model -> (model, data, batch size, per kind: sites in increasing forward order, none cut at the input)
LADDERS = {
    "demo:vgg": (lambda: load_model("demo:vgg"), lambda: fashion(48), 16,
                 {"neuron": [1, 3, 5, 8, 11, 13, 16], "weight": [2, 5, 9, 16]}),
    # the inplace relu (6, 9, 14, 17: its bridge clones its input), the downsampled identity live across a block
    "demo:resnet": (lambda: load_model("demo:resnet"), lambda: fashion(48), 16,
                    {"neuron": [3, 5, 6, 9, 11, 14, 17, 25, 27], "weight": [2, 7, 10, 16, 27]}),
    # MultiheadAttention sites (3, 9, 15, 21) are nodes of the shared graph; params of one module share a cut
    "demo:vit": (lambda: seeded(DemoViT), lambda: random_28(24), 8, {"neuron": [1, 2, 3, 5, 9, 21, 26, 27],
                         "param": ["encoder.layers.encoder_layer_0.ln_1.weight", "encoder.layers.encoder_layer_0.ln_1.bias",
                                   "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                                   "encoder.layers.encoder_layer_0.self_attention.out_proj.bias",
                                   "encoder.layers.encoder_layer_2.ln_2.bias", "heads.head.weight", "heads.head.bias"]}),
}


def site_of(bench, kind, ref):
    if kind == "param":
        return next(p for p in bench.params if p.name == ref)
    return bench.site(kind, ref)


def run(bench, kind, site, bit, prefix=None):
    return engine.run_faults(bench, site, kind, bit, seed=2, images_per_weight_fault=24, record="all", prefix=prefix)


@pytest.mark.parametrize("name", list(LADDERS))
def test_ladder_gives_the_full_and_the_plain_prefix_records_and_runs_each_prefix_once(name):
    """Each kind's sites in order, bits 30 and random: the ladder's records equal the full pass's
    (and, bit 30, the prefix path's without the ladder). Only each kind's first site computes every batch's
    prefix from the images; later sites compute only the probe batch and bridge the others."""
    make_model, make_data, batch, ladders = LADDERS[name]
    model, data = make_model(), make_data()
    ladder = engine.prepare(model, data, batch_size=batch, device="cpu", prefix=True)
    plain = engine.prepare(model, data, batch_size=batch, device="cpu", prefix=True)
    plain.prefix_state.ladder = False
    changed, expected_from_images, expected_bridged, plain_from_images = 0, 0, 0, 0
    for kind, refs in ladders.items():
        n = len(data[0])  # weight faults change every 24 images: 48 images in batches 0-16, 16-24, 24-40, 40-48
        batches = -(-n // batch) if kind == "neuron" else sum(-(-(min(g + 24, n) - g) // batch) for g in range(0, n, 24))
        expected_from_images += batches + len(refs) - 1
        expected_bridged += (len(refs) - 1) * (batches - 1)
        plain_from_images += len(refs) * batches
        cuts = []
        for ref in refs:
            site = site_of(ladder, kind, ref)
            for bit in (30, "random"):
                full, climbed = run(ladder, kind, site, bit, prefix=False), run(ladder, kind, site, bit)
                assert climbed.path == "prefix"
                assert_same_records(full, climbed)
                changed += int(full.records.changed.sum())
            direct = run(plain, kind, site, 30)
            assert direct.path == "prefix"
            assert_same_records(direct, run(ladder, kind, site, 30))
            cuts.append(ladder.prefix_state.runner.split.cut)
        assert cuts == sorted(cuts)
    stats = ladder.prefix_state.stats
    assert (stats.from_images, stats.bridged) == (expected_from_images, expected_bridged)
    assert (plain.prefix_state.stats.from_images, plain.prefix_state.stats.bridged) == (plain_from_images, 0)
    assert ladder.prefix_state.ladder_reasons == {}
    assert changed > 20  # the faults change predictions: the comparison has teeth
    if name == "demo:resnet":  # bn1 -> inplace relu: the bridge writes into its input, so it gets a copy
        bridge = ladder.prefix_state.bridges[((5, "layer1.bn1", 0, "neuron"), (6, "layer1.relu", 0, "neuron"))]
        assert bridge.clone_slots == (1,)


def test_small_budget_and_a_step_back_give_the_same_records():
    """Cache budget 2.5 batches of the layer1 cuts (401,408 bytes a batch of 16; 200,704 after
    the block, 301,056 at the downsample). Stepping back (8 -> 6) computes from the images; the
    step 9 -> 10 frees the last old batch to stay within the budget and computes it later."""
    unit = 2 * 16 * 16 * 14 * 14 * 4  # the identity and the site output: 16 channels of 14 x 14
    images, labels = fashion(64)
    bench = engine.prepare(load_model("demo:resnet"), (images, labels), batch_size=16, device="cpu", prefix=True,
                           prefix_cache_mb=2.5 * unit / 2**20)
    state = bench.prefix_state
    steps = []
    for index in (4, 6, 8, 6, 9, 10, 12):
        site = bench.site("neuron", index)
        full = run(bench, "neuron", site, 30, prefix=False)
        pre = run(bench, "neuron", site, 30)
        assert pre.path == "prefix"
        assert_same_records(full, pre)
        assert state.runner.used <= state.runner.budget
        steps.append((state.stats.from_images, state.stats.bridged, sorted(lo for lo, _ in state.runner.cache)))
    assert steps == [
        (4, 0, [0, 16]),  # the first site: every batch from the images, the first two cached
        (7, 1, [0, 16]),  # the probe batch and the two that did not fit from the images; batch 16 bridged
        (10, 2, [0, 16]),
        (14, 2, [0, 16]),  # a step back: from the images
        (17, 3, [0, 16, 32, 48]),  # half the size a batch: 32 and 48 are computed and fit
        (19, 5, [0, 16, 32]),  # 16 and 32 bridged; 48 made room for them and is computed again
        (21, 7, [0, 16, 32, 48]),  # half the size again: 16 and 32 bridged, 48 computed and kept
    ]


def test_a_bridge_that_does_not_reproduce_the_prefix_is_not_used(monkeypatch):
    """A wrong bridge (its first output negated) fails the check on the probe batch: the reason
    is kept, the cache is filled from the images, and the records stay the full pass's."""
    real = suffix.bridge_between

    def wrong(lower, upper):
        bridge = real(lower, upper)
        module = bridge.module
        return suffix.Bridge(lambda *values: tuple(-v if i == 0 else v for i, v in enumerate(module(*values))),
                             bridge.clone_slots)

    monkeypatch.setattr(suffix, "bridge_between", wrong)
    bench = engine.prepare(load_model("demo:vgg"), fashion(48), batch_size=16, device="cpu", prefix=True)
    for index in (2, 5, 9):
        site = bench.site("neuron", index)
        assert_same_records(run(bench, "neuron", site, 30, prefix=False), run(bench, "neuron", site, 30))
    state = bench.prefix_state
    assert (state.stats.from_images, state.stats.bridged, state.bridges) == (9, 0, {})
    assert list(state.ladder_reasons.values()) == ["the bridge does not reproduce the prefix: value 0: tensors differ"] * 2


def test_bridge_passes_residual_values_through_and_refuses_to_go_down():
    bench = engine.prepare(load_model("demo:resnet"), fashion(16), batch_size=16, device="cpu", prefix=True)
    gm = suffix.trace(bench.model)
    nodes = list(gm.graph.nodes)
    cut = {name: nodes.index(suffix.site_node(gm, name, 0)) + 1 for name in ("layer1.conv1", "layer1.bn2", "layer2.conv1")}
    lower, upper = (suffix.split_at(gm, cut[n], nodes[cut[n] - 1]) for n in ("layer1.conv1", "layer1.bn2"))
    bridge = suffix.bridge_between(lower, upper)
    assert (lower.live, upper.live) == (["relu", "layer1_conv1"], ["relu", "layer1_bn2"])  # the identity passes through
    with torch.inference_mode():
        got = bridge(lower.prefix(bench.images))
        want = upper.prefix(bench.images)
    assert suffix._differs(got, want) == ""
    with pytest.raises(ValueError, match="^the cuts are not in increasing order on one graph$"):
        suffix.bridge_between(upper, lower)
    other = suffix.split_at(suffix.trace(bench.model), cut["layer2.conv1"], None)
    with pytest.raises(ValueError, match="^the cuts are not in increasing order on one graph$"):
        suffix.bridge_between(lower, other)
