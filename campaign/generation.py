"""Generation campaigns: a causal LM decoding ``prompts:`` data greedily, with bit flips in its
neuron, weight, param and KV-cache sites (trainables.inject.generation). Validation at the edge
and the trial list; campaign.spec.resolve hands prompts: data sets here.

Trials: one per (kind, site, bit, seed, fault model) and, for neuron and kv sites, per listed
decode step (``--steps 0,3,7``: a trial per step, one fault per prompt at that step); ``random``
(the default: one step per prompt drawn inside the trial) and ``prefill`` (= step 0) are one trial
each. Weight and param faults persist for the whole generation: no step, one fault per prompt.
"""
from __future__ import annotations

import dataclasses
import re

from campaign.spec import (
    CampaignSpec,
    ResolvedCampaign,
    SpecError,
    TrialPlan,
    input_digests,
    is_causal_lm,
    resolve_seeds,
    spec_fault_bits,
)

PREFIX = "prompts:"
DEFAULT_NEW_TOKENS = 16
DEFAULT_STEPS = "random"
GENERATION_KINDS = ("neuron", "weight", "param", "kv")
DEFAULT_IMAGES_PER_WEIGHT_FAULT = CampaignSpec.images_per_weight_fault


def is_generation(spec: CampaignSpec, dataset: str | None = None) -> bool:
    """Whether the campaign decodes prompts (its data set is prompts:<file>)."""
    return str(dataset if dataset is not None else spec.dataset or "").startswith(PREFIX)


def parse_step_list(text: str) -> list[int] | str:
    """'random' | 'prefill' | '0,3,7' | '0-3' -> the text or a sorted list of steps; ValueError otherwise."""
    low = str(text).strip().lower()
    if low in ("random", "prefill"):
        return low
    steps: set[int] = set()
    for part in [p.strip() for p in low.split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"cannot read {part!r}: use random, prefill, a list of decode steps like 0,3,7 or a "
                             f"range like 0-3 (0 = the prefill)")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"range {part} is reversed: write {b}-{a}")
        steps.update(range(a, b + 1))
    if not steps:
        raise ValueError("no decode steps given: use random, prefill or a list like 0,3,7")
    return sorted(steps)


def steps_text(steps: list[int] | str) -> str:
    return steps if isinstance(steps, str) else ",".join(map(str, steps))


def plain_problems(spec: CampaignSpec) -> list[str]:
    """Problems of the generation settings visible without loading anything, one line each: steps
    beyond --new-tokens, --new-tokens/--steps/--sites kv without prompts: data, and options a
    generation campaign does not take."""
    problems = []
    generation = is_generation(spec)
    if spec.new_tokens is not None and spec.new_tokens < 1:
        problems.append(f"new_tokens: must be a positive integer, got {spec.new_tokens}")
    if not generation:
        for name, given in (("new_tokens", spec.new_tokens is not None), ("steps", spec.steps is not None)):
            if given:
                problems.append(f"{name}: applies to generation campaigns, whose data set is prompts:<file> (one prompt "
                                f"a line; demo:lm ships prompts:demo-lm-prompts); {spec.dataset or 'the default data set'} "
                                f"is not prompts")
        if "kv" in spec.sites:
            problems.append("sites: kv (KV-cache sites) exist only while a causal LM generates: pass --dataset "
                            "prompts:<file> (teacher-forced and classification data have no KV cache)")
        return problems
    new_tokens = spec.new_tokens or DEFAULT_NEW_TOKENS
    steps = None
    if spec.steps is not None:
        try:
            steps = parse_step_list(spec.steps)
        except ValueError as exc:
            problems.append(f"steps: {exc}")
    if isinstance(steps, list) and new_tokens >= 1:
        if steps[-1] >= new_tokens:
            problems.append(f"steps: decode step {steps[-1]} is beyond --new-tokens {new_tokens}: steps are "
                            f"0..{new_tokens - 1} (0 = the prefill)")
        elif "kv" in spec.sites and steps[-1] == new_tokens - 1:
            problems.append(f"steps: kv faults flip the cache after step s, read by step s+1: with --new-tokens "
                            f"{new_tokens} kv steps are 0..{new_tokens - 2}; step {steps[-1]} is only for neuron faults "
                            f"(run them in a campaign of their own)")
    if "kv" in spec.sites and new_tokens == 1:
        problems.append("new_tokens: kv faults need at least 2 new tokens (a step after the fault must read the cache)")
    if steps is not None and not {"neuron", "kv"} & set(spec.sites):
        problems.append("steps: decode steps are for neuron and kv faults; weight and param faults persist for the "
                        "whole generation")
    unsupported = [k for k in spec.sites if k not in GENERATION_KINDS]
    if unsupported:
        problems.append(f"sites: {', '.join(unsupported)}: generation campaigns inject into neuron, weight, param and "
                        f"kv sites")
    for name, given in (("protect", str(spec.protect).lower() != "none"), ("quantize", bool(spec.quantize)),
                        ("weight_format", bool(spec.weight_format)), ("buffers", bool(spec.buffers)),
                        ("site_sampling", spec.site_sampling != "per-site"), ("margin", spec.margin is not None),
                        ("target_margin", spec.target_margin is not None), ("allocate", spec.allocate is not None),
                        ("images_per_weight_fault", spec.images_per_weight_fault != DEFAULT_IMAGES_PER_WEIGHT_FAULT)):
        if given:
            what = ("one weight or param fault per prompt, for the whole generation"
                    if name == "images_per_weight_fault" else "fp32, tf32, fp16 or bf16, unprotected, every prompt")
            problems.append(f"{name}: not for a generation campaign (it runs {what})")
    return problems


def select_sites(spec: CampaignSpec, found, hf, no_cache: str | None, problems: list[str]) -> tuple[dict, list]:
    """The selected sites per kind (neuron, weight and param as sites.select_campaign_sites selects
    them; kv: the KV sites whose index --layers names, all by default), appending one line per problem."""
    from trainables.inject import generation
    from trainables.inject.sites import parse_index_list, select_campaign_sites

    leaf_kinds = [k for k in spec.sites if k in ("neuron", "weight")]
    others = [k for k in spec.sites if k in ("neuron", "weight", "param")]
    selected, more = select_campaign_sites(found, others, spec.layers if leaf_kinds else None, spec.layer_types,
                                           spec.params, spec.modules, spec.buffers) if others else ({}, [])
    problems += more
    kv = generation.kv_sites(hf) if no_cache is None else []
    if "kv" in spec.sites and no_cache is None:
        indices = parse_index_list(spec.layers)
        chosen = kv if indices is None else [s for s in kv if s.index in indices]
        missing = sorted(set(indices or ()) - {s.index for s in kv})
        if not chosen or (missing and not leaf_kinds):
            problems.append(f"layers: {', '.join(map(str, missing))} {'is no' if len(missing) == 1 else 'are no'} "
                            f"KV-cache site of {spec.model} (kv sites 0..{len(kv) - 1}: 2 x layer + 0 keys, 1 values; "
                            f"see `python -m campaign layers --model {spec.model} --sites kv`)")
        selected["kv"] = chosen
    return selected, kv


def resolve_generation(spec: CampaignSpec, dataset: str, prompts, model, problems: list[str]) -> ResolvedCampaign:
    """The trials of a generation campaign; SpecError listing every problem (one line each)."""
    from trainables.generation_trial import KV_SITE_TYPE, digest_data
    from trainables.inject import formats, generation
    from trainables.inject.engine import MATH_MODES
    from trainables.inject.sites import param_table, site_table

    problems = list(problems)
    if not is_causal_lm(model):
        raise SpecError("\n".join(problems + [f"model: {spec.model} is not a causal LM: generation campaigns (prompts: "
                                              f"data) need one (hf:<dir> or demo:lm)"]))
    hf = model.hf_model
    new_tokens = spec.new_tokens or DEFAULT_NEW_TOKENS
    steps = parse_step_list(spec.steps or DEFAULT_STEPS)
    try:
        generation.check_prompts(prompts.token_ids, new_tokens, int(hf.config.vocab_size), prompts.context_length)
    except ValueError as exc:
        problems.append(f"{dataset}: {exc}")
    no_cache = generation.cache_problem(hf)
    if "kv" in spec.sites and no_cache is not None:
        problems.append(f"sites: kv: {spec.model} decodes without a KV cache ({no_cache}): it has no KV-cache sites")
    digests = input_digests(spec, digest_data(prompts), model)  # of the model as loaded, as the workers check it
    dtype = MATH_MODES[spec.dtype]
    width = formats.width(dtype)
    fault_bits = spec_fault_bits(spec, width, problems)
    try:
        found = generation.survey_sites(model, len(prompts.token_ids[0]), spec.dtype)
    except ValueError as exc:
        raise SpecError("\n".join(problems + [f"model {spec.model}: {exc}"])) from None
    selected, _ = select_sites(spec, found, hf, no_cache, problems)
    step_dim: dict[str, list] = {}
    for kind in spec.sites:
        if kind in ("weight", "param"):
            step_dim[kind] = [None]
            continue
        try:
            generation.parse_steps(steps, new_tokens, kind)
        except ValueError as exc:
            problems.append(f"steps: {exc}")
        step_dim[kind] = list(steps) if isinstance(steps, list) else [steps]
    if problems:
        raise SpecError("\n".join(dict.fromkeys(problems)))
    spec, seeds = resolve_seeds(spec)
    spec = dataclasses.replace(spec, dataset=dataset, seeds=seeds, fault=",".join(f for f, _ in fault_bits),
                               new_tokens=new_tokens,  # steps: null where no kind takes one (a resume reads it back)
                               steps=steps_text(steps) if {"neuron", "kv"} & set(spec.sites) else None)
    trials = tuple(TrialPlan(kind, site.index, bit, seed, fault, step=step)
                   for kind in spec.sites for site in selected[kind] for seed in seeds
                   for fault, its_bits in fault_bits for bit in its_bits for step in step_dim[kind])
    leaves = [s for s in found.sites if spec.modules is not None or not s.container]
    table = "\n\n".join([site_table(leaves), *([param_table(found.params)] if "param" in spec.sites else []),
                         *([generation.kv_table(selected["kv"])] if "kv" in spec.sites else [])])
    names = {s.index: f"{s.name}#{s.call}" for s in leaves}
    chunk = spec.batch_size > 1 and steps == "random" and len(prompts.token_ids) > 1
    notes = (f"generation: {len(prompts.token_ids)} prompts x {new_tokens} new tokens, greedy; faults start from the "
             f"golden state {'after the step before theirs' if spec.prefix else '(--no-prefix: from the prompt)'}",)
    if chunk and {"neuron", "kv"} & set(spec.sites):
        notes += (f"generation: random steps with --batch-size {spec.batch_size}: each fault decodes its whole chunk of "
                  f"prompts of one length (same results; --batch-size 1 runs fewer rows)",)
    sizes = {(kind, s.index): (KV_SITE_TYPE, s.numel_per_position) for kind, chosen in selected.items() if kind == "kv"
             for s in chosen}
    return ResolvedCampaign(spec, dataset, seeds, table, {k: [s.index for s in v] for k, v in selected.items()}, names,
                            trials, len(prompts.token_ids), digests, notes=notes, site_sizes=sizes)


def layers_lines(spec: CampaignSpec, dataset: str, data, model) -> list[str]:
    """What ``python -m campaign layers`` prints for a generation campaign (prompts: data or --sites kv):
    the neuron and weight sites as generation numbers them, param sites with --sites param, and the
    KV-cache sites (kv_table); SpecError (one line each) for what cannot be listed."""
    from trainables.inject import generation
    from trainables.inject.sites import param_table, site_table

    if not is_causal_lm(model):
        raise SpecError(f"sites: kv: {spec.model} is not a causal LM: KV-cache sites are a causal LM's (hf:<dir>, demo:lm)")
    problems = [f"sites: {k}: generation campaigns inject into neuron, weight, param and kv sites"
                for k in spec.sites if k not in GENERATION_KINDS]
    if problems:
        raise SpecError("\n".join(problems))
    hf = model.hf_model
    no_cache = generation.cache_problem(hf)
    if "kv" in spec.sites and no_cache is not None:
        raise SpecError(f"sites: kv: {spec.model} decodes without a KV cache ({no_cache}): it has no KV-cache sites")
    prompts = is_generation(spec, dataset)
    length = len(data.token_ids[0]) if prompts else int(data.images.shape[1])
    found = generation.survey_sites(model, length, spec.dtype)
    selected, kv = select_sites(spec, found, hf, no_cache, problems)
    if problems:
        raise SpecError("\n".join(problems))
    leaves = [s for s in found.sites if not s.container]
    shown = selected["neuron"] if spec.modules is not None and "neuron" in selected else leaves
    lines = [f"{spec.model} generating from {dataset if prompts else f'{length}-token prompts'}: {len(leaves)} neuron sites, "
             f"{sum(s.is_weight_site for s in leaves)} weight sites, {len(found.params)} param sites, {len(kv)} KV-cache "
             f"sites{f' (none: it decodes without a cache: {no_cache})' if no_cache else ''}; output shapes per prompt at "
             f"the prefill (a decode step: 1 position)", site_table(shown)]
    if "param" in spec.sites:
        lines += ["", param_table(found.params)]
    if kv:
        lines += ["", "KV-cache sites (--sites kv; --layers selects them by kv site index):",
                  generation.kv_table(selected.get("kv", kv))]
    lines += ["", "selected: " + ", ".join(f"{len(chosen)} {kind}" for kind, chosen in selected.items()) + " sites"]
    return lines
