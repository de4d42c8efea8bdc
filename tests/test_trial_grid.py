"""The lazy trial grid (campaign.grid): the same trials, order, keys and resume bookkeeping as the
tuple of TrialPlans that resolve built before, without building it."""
import pytest

from campaign.grid import TrialGrid, distinct_trials, pending_trials
from campaign.spec import TrialPlan, trials_per_site
from trainables.results import trial_key

KINDS = ("neuron", "weight")
SITES = {"neuron": [0, 3, 17, 1200], "weight": [-1]}  # -1: a proportional campaign's site pool
FAULT_BITS = {"neuron": [("flip", [30, 0, "random"]), ("burst:2", ["random:23-30"]), ("stuck1", [31])],
              "weight": [("flip", [7, 6]), ("zero", ["random"])]}
SEEDS = (5, 0, 2**63 - 1)


def eager(kinds, sites, seeds, fault_bits):
    """What resolve built before: every trial, site-major."""
    return tuple(TrialPlan(kind, site, bit, seed, fault) for kind in kinds for site in sites[kind] for seed in seeds
                 for fault, its_bits in fault_bits[kind] for bit in its_bits)


def key(t):
    return trial_key(t.kind, t.site, t.bit, t.seed, t.fault)


def test_the_grid_holds_the_trials_of_the_tuple_in_order_by_index_and_by_iteration():
    grid = TrialGrid.site_major(KINDS, SITES, SEEDS, FAULT_BITS)
    trials = eager(KINDS, SITES, SEEDS, FAULT_BITS)
    assert len(grid) == len(trials) == 4 * 3 * 5 + 1 * 3 * 3
    assert tuple(grid) == trials and grid == trials
    assert [grid[i] for i in range(len(grid))] == list(trials)
    assert grid[-1] == trials[-1] and grid[-len(grid)] == trials[0]
    for bad in (len(grid), -len(grid) - 1):
        with pytest.raises(IndexError):
            grid[bad]
    assert tuple(grid[:7]) == trials[:7] and len(grid[:7]) == 7 and grid[2:9:3] == trials[2:9:3]
    assert trials_per_site(grid) == trials_per_site(trials) == 3 * 5
    assert trials_per_site(grid[:17]) == trials_per_site(trials[:17]) == 15


def test_its_keys_are_a_set_that_knows_each_key_and_no_other():
    grid, keys = distinct_trials(TrialGrid.site_major(KINDS, SITES, SEEDS, FAULT_BITS))
    trials = eager(KINDS, SITES, SEEDS, FAULT_BITS)
    assert list(keys) == [key(t) for t in trials] and len(keys) == len(trials)
    assert all(key(t) in keys and grid.index_of(key(t)) == i for i, t in enumerate(trials))
    outside = [trial_key("neuron", 0, 30, 6), trial_key("neuron", 4, 30, 5), trial_key("neuron", 0, 29, 5),
               trial_key("neuron", 0, 31, 5, "flip"), trial_key("neuron", 0, 30, 5, "burst:2"),
               trial_key("weight", -1, 7, 5, "zero"), trial_key("param", 0, 30, 5), "neuron-s0000-b30-seed5-",
               "garbage", "neuron-sall-b30-seed5", trial_key("neuron", 0, 30, 5) + "0"]
    assert not any(k in keys for k in outside)
    cut = TrialGrid.site_major(KINDS, SITES, SEEDS, FAULT_BITS)[:10]
    assert key(trials[9]) in cut.keys() and key(trials[10]) not in cut.keys()


def test_repeated_axis_values_keep_one_trial_per_key_as_the_drivers_dict_did():
    seeds, sites = (3, 1, 3, 2, 1), {"neuron": [2, 1, 2], "weight": [4]}
    fault_bits = {"neuron": [("flip", [5, 5, 6])], "weight": [("flip", [1])]}
    trials = eager(KINDS, sites, seeds, fault_bits)
    grid, keys = distinct_trials(TrialGrid.site_major(KINDS, sites, seeds, fault_bits))
    wanted = {key(t): t for t in trials}
    assert list(keys) == list(wanted) and tuple(grid) == tuple(wanted.values())
    assert len(grid) == 2 * 3 * 2 + 1 * 3 * 1
    cut, cut_keys = distinct_trials(TrialGrid.site_major(KINDS, sites, seeds, fault_bits)[:20])  # cut: built eagerly
    assert list(cut_keys) == list({key(t): t for t in trials[:20]})


def test_pending_trials_skip_the_finished_in_order():
    grid, keys = distinct_trials(TrialGrid.site_major(KINDS, SITES, SEEDS, FAULT_BITS))
    trials = eager(KINDS, SITES, SEEDS, FAULT_BITS)
    finished = frozenset(key(t) for t in trials[::4])
    assert list(pending_trials(grid, finished)) == [(key(t), t) for t in trials if key(t) not in finished]
