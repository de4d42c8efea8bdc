"""``python -m campaign run|resume|layers|eval|report``: the command line of the project."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from campaign import interrupts
from campaign.numformats import (
    QUANTIZE_MODES,
    WEIGHT_FORMATS,
    effective_mode,
    format_problems,
    name_suffix,
    quantized_model,
)
from campaign.spec import (
    MODES,
    RECORD_LEVELS,
    CampaignSpec,
    SpecError,
    spec_from_mapping,
    spec_from_seed_env,
    spec_from_yaml,
)

RUN_EPILOG = """\
Settings are layered: defaults < the seed study's environment knobs (model_name, dataset,
seed, batch_size, img_size, channels, bit_flip_pos, layer_type, layer_num/layer_nums) <
the YAML file < flags. Bits are numbered LSB = 0 (FP32: 31 sign, 30-23 exponent); the
seed's MSB-first bit_flip_pos=K is accepted as --bits msb:K (bit 31-K for FP32).

With no arguments: the shipped demo (demo:vgg on the shipped Fashion-MNIST test split,
neuron and weight sites, all layers, random bit, one seed) on this machine.
"""


PLAN_EPILOG = """\
Prints, per stratum, its fault population (elements x bits x golden-correct images), the
injections a --margin at --confidence needs (Leveugle et al. 2009, rate 0.5 or from --prior),
those of a campaign stopping at that margin with the anytime-valid interval, what the spec as
given spends and the margin it buys, and wall times from a short timed calibration.
See docs/statistics.md.
"""


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="demo:vgg | demo:resnet | demo:vit | demo:text | chenyaofo:cifar10_resnet20 | "
                                         "torchvision:<arch> | file:<path> | py:<module>:<callable> | timm:<name> | "
                                         "hub:<owner>/<repo>[@ref]:<entry> | hf:<directory> (default demo:vgg; see "
                                         "docs/models.md)")
    parser.add_argument("--model-arg", dest="model_args", action="append", metavar="KEY=VALUE",
                        help="a keyword argument for a py:, timm:, hub: or hf: model (repeat it; values are read as "
                             "int, float, true/false or text)")
    parser.add_argument("--dataset", help="fashion-mnist | fashion-mnist-calib | cifar10 | cifar10-train | cifar100 | "
                                           "cifar100-train | synthetic:CxHxW:classes[:N] | "
                                           "synthetic-tokens:T:vocab:classes[:N] | folder:<dir> | tensors:<file> | "
                                           "hf-dataset:<dir>[:<split>] | py:<module>:<callable> (default: the model's own; "
                                           "see docs/data.md)")
    parser.add_argument("--hub-dir", help="a local clone of the hub: repository or of chenyaofo/pytorch-cifar-models "
                                          "(torch.hub source='local')")
    parser.add_argument("--hub-ref", help="git ref of the zoo to load through torch.hub")
    parser.add_argument("--weights", help="a state_dict file (.pt/.pth or .safetensors), or 'none' for random initialization")
    parser.add_argument("--data-root", help="directory holding cifar-10-batches-py / cifar-100-python")
    parser.add_argument("--download", action="store_true", default=None, help="download CIFAR if it is missing (needs network)")
    parser.add_argument("--dtype", choices=MODES, help="math mode: fp32 (strict, TF32 off; default), tf32, fp16, bf16")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES,
                        help="int8: post-training static int8 quantization (torch.ao FX, x86 backend, CPU), calibrated on "
                             "images disjoint from the evaluated ones; recorded as mode int8")
    parser.add_argument("--weight-format", choices=WEIGHT_FORMATS,
                        help="store each weight site's weight in fp8 (fp8_e4m3fn or fp8_e5m2), upcast for compute; "
                             "weight faults flip its 8 stored bits")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default 256)")
    parser.add_argument("--images", help="use the first N test images, or 'all' (default)")
    parser.add_argument("--transform", help="folder:/hf-dataset: image preprocessing: torchvision:<WeightsEnum>, timm, hf, "
                                            "or resize=256,crop=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225; "
                                            "text: tokenizer=<dir>,max_length=N (see docs/data.md)")
    parser.add_argument("--input-column", help="hf-dataset:/tensors: the inputs' column or key")
    parser.add_argument("--label-column", help="hf-dataset:/tensors: the labels' column or key")
    parser.add_argument("--seq-len", type=int, help="text:/hf-dataset: text for a causal LM: tokens per sequence "
                                                    "(default: the model's context length)")
    parser.add_argument("--data-cache", help="image sources: prepare once into this directory (or auto) and memory-map "
                                             "uint8 pixels (default: in memory)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to read the usage, not the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m campaign", description="Bit-flip fault-injection campaigns on Ray Tune.")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a campaign (no arguments: the shipped demo)", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("spec", nargs="?", help="YAML campaign spec (keys = the long flag names with _)")
    _model_flags(run)
    _site_flags(run)
    _run_flags(run)
    run.add_argument("--margin", type=float, help="stop each stratum (site x bit x fault, pooled over seeds: --num-seeds "
                                                   "is the most) once its anytime-valid interval's half-width is below this")
    run.add_argument("--confidence", type=float, help="confidence of the intervals --margin and --target-margin stop "
                                                       "on (default 0.95)")
    run.add_argument("--allocate", choices=("uniform", "proportional", "neyman", "equal-width"),
                     help="spend --budget injections over the strata: a --pilot share evenly first, the rest by the "
                          "pilot's rates: uniform, proportional (to the strata's fault populations), neyman (best "
                          "whole-model estimate) or equal-width (equal margins)")
    run.add_argument("--budget", type=int, help="injections (golden-correct images) that --allocate spends")
    run.add_argument("--pilot", type=float, help="share of --budget spent evenly first (default 0.2)")
    run.add_argument("--stop-interval", choices=("cs", "wilson"),
                     help="--target-margin stops on: cs, the anytime-valid confidence sequence (default), or wilson, "
                          "the Wilson interval checked at every window (not valid under early stopping; as before)")

    plan = sub.add_parser("plan", help="size a campaign before running it: injections per stratum for a margin, and time",
                          epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("spec", nargs="?", help="YAML campaign spec (as for run)")
    _model_flags(plan)
    _site_flags(plan)
    _run_flags(plan)
    plan.add_argument("--margin", type=float, help="interval half-width wanted per stratum (default: the spec's margin, "
                                                    "else 0.01)")
    plan.add_argument("--confidence", type=float, help="confidence level (default: the spec's with a margin, else 0.99)")
    plan.add_argument("--by", default="trial", help="strata: trial (site x bit x fault, the default), site, type")
    plan.add_argument("--prior", help="an earlier campaign directory: plan with its rates instead of p = 0.5")
    plan.add_argument("--budget", help="injections (2e6) or time (30m, 2h): the margin it buys, split evenly")
    plan.add_argument("--calibrate-images", type=int, default=512,
                      help="images timed per site for the time estimate (default 512; 0: no timing)")
    plan.add_argument("--slots", type=int, help="trials the cluster runs at once (default: what this machine runs)")
    plan.add_argument("--trial-overhead-s", type=float, help="seconds a trial costs beyond its injections (scheduling, "
                                                               "files; default 0.9, measured on a 2-CPU machine)")

    resume = sub.add_parser("resume", help="finish an interrupted campaign")
    resume.add_argument("directory")
    _resource_flags(resume)
    resume.add_argument("--batch-size", type=int, help="images per forward pass (results do not depend on it)")

    layers = sub.add_parser("layers", help="print the injection sites of a model and what they cover")
    _model_flags(layers)
    _site_flags(layers)

    evaluate = sub.add_parser("eval", help="print a model's clean accuracy")
    _model_flags(evaluate)
    evaluate.add_argument("--device", help="cpu or cuda (default: cuda when available)")

    report = sub.add_parser("report", help="tables, the seed's CSV and plots for campaign directories")
    report.add_argument("directories", nargs="+")
    report.add_argument("--out", help="output directory (default <first directory>/report; a local folder, needed "
                                       "when the campaign is on object storage)")
    return parser


def _run_flags(run: argparse.ArgumentParser) -> None:
    """The flags of run that shape a campaign (plan takes them too: it sizes the campaign run would start)."""
    run.add_argument("--bits", help="random (default), all, 30, 0-31, 23,30, msb:1 (MSB-first, the seed's numbering); "
                                    "a bit pool, one trial set whose faults draw their bits from it: random:23-30, "
                                    "random:23+25+30, random:exponent (sign, exponent, mantissa, magnitude: per format)")
    run.add_argument("--fault", help="fault model(s), one trial set each: flip (default), flip:K (K distinct bits: uniform "
                                     "among the width or a bit pool, or the given bit and K-1 above it), burst:K (K "
                                     "adjacent bits up from it), stuck0, stuck1, random (all bits random), zero; a list "
                                     "like flip,burst:2")
    run.add_argument("--protect", help="mitigation, run as paired trials on the same faults: none (default), "
                                       "clamp:<types>:<lo>:<hi> (fmin/fmax, NaN -> bound), relu6, ranger[:<types or module "
                                       "patterns>] (bounds profiled on --calibration)")
    run.add_argument("--bounds", help="ranger: reuse the bounds of this file (a bounds file or a ranger campaign's spec.json)")
    run.add_argument("--calibration", help="ranger: the data set to profile bounds on (default: the evaluation set's "
                                           "training split: fashion-mnist-calib, cifar10-train, cifar100-train)")
    run.add_argument("--new-tokens", type=int, help="prompts: data (a generation campaign): tokens decoded greedily per "
                                                    "prompt (default 16)")
    run.add_argument("--steps", help="generation: the decode steps of neuron and kv faults: 0,3,7 (a trial per step; 0 = "
                                     "the prefill), random (default: a step drawn per prompt), prefill")
    run.add_argument("--seeds", help="explicit seeds, e.g. 1,2,3 (default: --num-seeds drawn from --master-seed)")
    run.add_argument("--num-seeds", type=int, help="how many seeds to draw from --master-seed (default 1)")
    run.add_argument("--master-seed", type=int, help="master seed (default 0; -1 = from the clock, recorded)")
    run.add_argument("--images-per-weight-fault", type=int, help="consecutive images sharing one weight fault (default 256)")
    run.add_argument("--record", choices=RECORD_LEVELS, help="per-fault rows: none, changed (default), all")
    run.add_argument("--target-margin", type=float, help="stop a trial once its interval's half-width is below this "
                                                          "(the anytime-valid confidence sequence at --confidence)")
    run.add_argument("--report-every", type=int, help="images between progress reports / early-stop checks (default 2048)")
    run.add_argument("--prefix-cache-mb", help="golden-activation cache per worker for prefix reuse, MiB "
                                                 "(default: a quarter of the device's free memory)")
    run.add_argument("--no-prefix", dest="prefix", action="store_false", default=None,
                     help="run every fault through the whole forward pass (same results, slower)")
    _resource_flags(run)
    run.add_argument("--out", help="parent directory of campaign directories (default runs), or an object-store URI "
                                    "such as s3://bucket/prefix (configured by the store's environment: AWS_*)")
    run.add_argument("--name", help="campaign directory name (default <model>-<dataset>-<dtype>)")


def _site_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", help="neuron, weight, param or a list like neuron,weight,param (default neuron,weight); "
                                        "qparam (with --quantize int8): the scales and zero points; kv (a causal LM "
                                        "generating from prompts: data): the cached keys and values")
    parser.add_argument("--layers", help="neuron/weight site indices: all (default), 3, 1,4-7")
    parser.add_argument("--layer-types", help="module class names: all (default), Conv2d,Linear; for param sites the "
                                              "type of the module owning the tensor")
    parser.add_argument("--params", help="param sites by qualified name: all (default), globs like '*.bias,conv1.weight' "
                                         "('*' crosses dots), or 're:<regex>' matching whole names (last in a list)")
    parser.add_argument("--modules", help="neuron sites on these modules' outputs instead of every leaf call: type names "
                                          "(EncoderBlock), names or globs (layer2.1, 'encoder.*'), 're:<regex>', or all; "
                                          "containers get indices after the leaf sites")
    parser.add_argument("--buffers", action="store_true", default=None,
                        help="param sites include floating buffers (BatchNorm running mean and variance)")
    parser.add_argument("--site-sampling", choices=("per-site", "proportional"),
                        help="per-site (default): a trial per site; proportional: one trial per kind x bit x seed whose "
                             "faults pick their sites in proportion to size (a whole-model rate in one trial)")


def _resource_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions share a GPU (default 0)")
    parser.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    parser.add_argument("--max-failures", type=int, help="retries of a trial whose worker crashed (default 2)")
    parser.add_argument("--address", help="Ray cluster address (default: a running cluster, else a local one)")
    parser.add_argument("--wave-size", type=int, help="trials per Tune run: what the driver and Tune hold at once "
                                                       "(default 4096; results do not depend on it)")


def _flags(args: argparse.Namespace, skip=("command", "spec", "directory", "directories", "device", "wave_size")) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None and k not in skip}


def spec_from_args(args: argparse.Namespace, env=os.environ) -> CampaignSpec:
    spec = spec_from_seed_env(env)
    if getattr(args, "spec", None):
        spec = spec_from_yaml(args.spec, spec)
    return spec_from_mapping(_flags(args), spec, source="flags")


def _run(spec: CampaignSpec, wave_size: int | None = None):
    """A campaign stopping per stratum runs in rounds (campaign.adaptive); any other in one go."""
    from campaign.runner import check_wave_size

    options = {"wave_size": check_wave_size(wave_size)} if wave_size is not None else {}
    if spec.margin is not None:
        from campaign.adaptive import run_margin_campaign

        return run_margin_campaign(spec, **options)
    if spec.allocate is not None:
        from campaign.adaptive import run_allocated_campaign

        return run_allocated_campaign(spec, **options)
    from campaign.runner import run_campaign

    return run_campaign(spec, **options)


def cmd_run(args) -> int:
    return _finish(_run(spec_from_args(args), getattr(args, "wave_size", None)))


PLAN_ONLY = ("margin", "confidence", "by", "prior", "budget", "calibrate_images", "slots", "trial_overhead_s")


def cmd_plan(args) -> int:
    from campaign.plan import check_plan_args, make_plan, parse_budget, plan_lines

    values = {k: v for k, v in vars(args).items() if k not in PLAN_ONLY}
    spec = spec_from_args(argparse.Namespace(**values))
    from campaign.generation import is_generation

    if is_generation(spec):
        raise SpecError("plan: sizes classification and teacher-forced campaigns; a generation campaign (prompts: data) "
                        "runs one fault per prompt and trial: size it with --images and --seeds")
    margin = args.margin if args.margin is not None else spec.margin or 0.01
    confidence = args.confidence if args.confidence is not None else spec.confidence if spec.margin else 0.99
    check_plan_args(margin, confidence, args.by, args.calibrate_images)
    parse_budget(args.budget)
    if args.slots is not None and args.slots < 1:
        raise SpecError(f"slots: must be a positive integer, got {args.slots}")
    if args.trial_overhead_s is not None and not 0 <= args.trial_overhead_s < 3600:
        raise SpecError(f"trial_overhead_s: seconds in [0, 3600), got {args.trial_overhead_s}")
    from campaign.plan import TRIAL_OVERHEAD_S

    plan = make_plan(spec, margin, confidence, args.by, args.prior, args.budget, args.calibrate_images, args.slots,
                     trial_overhead_s=TRIAL_OVERHEAD_S if args.trial_overhead_s is None else args.trial_overhead_s)
    print("\n".join(plan_lines(plan, f" of {spec.model}")))
    return 0


def cmd_resume(args) -> int:
    from campaign.runner import spec_from_directory

    overrides = _flags(args)
    return _finish(_run(spec_from_directory(args.directory, **overrides), args.wave_size))


def _finish(outcome) -> int:
    import analysis
    from analysis import stream
    from analysis.load import campaign_dirs

    print()
    pooled = stream.pooled(campaign_dirs(outcome.directory), {}, per_bit=False) if outcome.finished else None
    if pooled is not None:  # a plain campaign: its table from rows pooled a batch at a time (bounded memory)
        print("\n".join(analysis.seed_layer_lines(analysis.per_site(pooled.sites))))
    elif outcome.finished:
        trials = analysis.load(outcome.directory)
        lm = analysis.tokens.teacher_forced(trials)
        gen = analysis.generation.generation(trials)
        trials = trials.drop(index=lm.index.union(gen.index))
        protected = analysis.is_protected(trials).any()  # two lines per layer, as the seed's
        if not trials.empty:
            print("\n".join(analysis.seed_protection_lines(analysis.protection_table(trials)) if protected
                            else analysis.seed_layer_lines(analysis.per_site(trials))))
        if not lm.empty:  # a causal LM's teacher-forced trials: their own table
            print("\n".join(analysis.tokens.site_lines(analysis.tokens.per_site(lm))))
        if not gen.empty:  # generation trials: their own table
            print("\n".join(analysis.generation.site_lines(analysis.generation.per_site(gen))))
        for line in analysis.golden_warnings(trials):
            print(f"WARNING {line}", file=sys.stderr)
    if not outcome.launched:
        print(f"\nnothing left to run: {outcome.finished}/{outcome.total} trials were already finished; "
              f"results in {outcome.directory}")
    else:
        rate = outcome.injections / outcome.seconds if outcome.seconds else 0
        print(f"\n{outcome.finished}/{outcome.total} trials ({outcome.launched} run now) in {outcome.seconds:.1f} s "
              f"({outcome.injections:,} injections, {rate:,.0f}/s); results in {outcome.directory}")
    for line in outcome.errors[:5]:
        print(f"failed: {line}", file=sys.stderr)
    if not outcome.complete:
        print(f"incomplete: run `python -m campaign resume {outcome.directory}` to finish it", file=sys.stderr)
        return 1
    return 0


def _load_for_inspection(args, shape_only: bool = False):
    """(spec, data set name, data, model) for layers/eval; ``shape_only``: CIFAR is not read
    (a site table needs only the input shape), its data is one blank image."""
    from trainables.zoo import memory
    from trainables.zoo.data import CIFAR_SPECS, Dataset
    from trainables.zoo.models import check_model_name, default_dataset_for, load_model

    spec = spec_from_mapping(_flags(args), source="flags")
    if problems := format_problems(spec):
        raise SpecError("\n".join(problems))
    try:
        check_model_name(spec.model, hub_dir=spec.hub_dir, model_args=spec.model_args)  # an unknown model first
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    dataset = spec.dataset or default_dataset_for(spec.model)
    if dataset is None:
        raise SpecError(f"{spec.model} has no default data set: pass --dataset")
    try:
        if shape_only and dataset in CIFAR_SPECS:
            import torch

            data = Dataset(dataset, torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.int64),
                           CIFAR_SPECS[dataset].num_classes, synthetic=False)
        else:
            from campaign.spec import data_options

            data = memory.load_data(dataset, root=spec.data_root, download=spec.download, limit=spec.images,
                                    **data_options(spec))
        model = load_model(spec.model, num_classes=getattr(data, "model_classes", None), hub_dir=spec.hub_dir,
                           hub_ref=spec.hub_ref, weights=spec.weights, model_args=spec.model_args)
        model = quantized_model(spec, dataset, model)  # --quantize int8; else unchanged
    except (ValueError, FileNotFoundError) as exc:
        raise SpecError(str(exc)) from None
    return spec, dataset, data, model


def cmd_layers(args) -> int:
    from campaign.spec import check_plain_fields, classes_problem, is_causal_lm, lm_problems, shape_mismatch
    from trainables.inject.engine import MATH_MODES
    from trainables.inject import qparams
    from trainables.inject.sites import coverage_lines, param_table, select_campaign_sites, site_table, survey
    from trainables.inject.sites import parse_index_list, parse_type_list

    spec, dataset, data, model = _load_for_inspection(args, shape_only=True)
    from campaign import generation

    if "kv" in spec.sites or generation.is_generation(spec, dataset):  # the sites of a generating causal LM
        print("\n".join(generation.layers_lines(spec, dataset, data, model)))
        return 0
    bad_kinds = [p for p in check_plain_fields(spec) if p.startswith("sites:")]
    if bad_kinds:
        raise SpecError("\n".join(bad_kinds))
    dtype = MATH_MODES[effective_mode(spec)]
    floating = data.images.is_floating_point()
    lm = is_causal_lm(model)
    if lm and (problems := lm_problems(spec, model, data)):
        raise SpecError("\n".join(problems))
    try:
        found = survey(model if spec.quantize else model.to(dtype), data.input_shape, dtype, input_dtype=dtype if floating else data.images.dtype)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    except Exception as exc:  # the model's own forward refused the input
        raise SpecError(shape_mismatch(spec.model, dataset, data.input_shape, exc)) from None
    if not lm and (problem := classes_problem(spec.model, dataset, found.classes, data.num_classes)) is not None:
        raise SpecError(problem)
    selected, problems = select_campaign_sites(found, spec.sites, spec.layers, spec.layer_types, spec.params,
                                               spec.modules, spec.buffers)
    qsites = qparams.qparam_sites(model, found.sites)  # an int8 model's scales and zero points; [] otherwise
    if "qparam" in spec.sites:
        selected["qparam"], more = qparams.select_qparams(qsites, parse_index_list(spec.layers), parse_type_list(spec.layer_types))
        problems += more
    if problems:
        raise SpecError("\n".join(problems))
    leaves = [s for s in found.sites if not s.container]
    no_input = "" if floating else "; integer inputs: no input site, the first site is 1"
    no_input += "; a causal LM: teacher-forced trials, sites in decoder layer 1 and later reuse the layer prefix" if lm else ""
    print(f"{spec.model} on {dataset} input {list(data.input_shape)}: {len(leaves)} neuron sites, "
          f"{sum(s.is_weight_site for s in leaves)} weight sites, {len(found.params)} param sites"
          f"{no_input} (weight shape shown where the layer has one)")
    print(site_table(selected["neuron"] if spec.modules is not None else leaves))
    if "param" in spec.sites:
        print()
        print(param_table(found.params))
    if "qparam" in spec.sites:
        print()
        print(qparams.qparam_table(selected["qparam"]))
    print()
    print("selected: " + ", ".join(f"{len(chosen)} {kind}" for kind, chosen in selected.items()) + " sites")
    for line in coverage_lines(model, found, selected, show_containers=spec.modules is not None):
        print(line)
    if qsites:
        print(qparams.summary_line(qsites))
    return 0


def cmd_eval(args) -> int:
    from trainables.inject.engine import prepare

    device = _check_device(args.device)
    spec, dataset, data, model = _load_for_inspection(args)
    try:
        bench = prepare(model, (data.images, data.labels), effective_mode(spec), spec.batch_size,
                        "cpu" if spec.quantize and device is None else device, weight_format=spec.weight_format)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    except Exception as exc:  # the model's own forward refused the input
        from campaign.spec import shape_mismatch

        raise SpecError(shape_mismatch(spec.model, dataset, tuple(data.images.shape[1:]), exc)) from None
    correct = int(bench.golden_correct.sum())
    synthetic = " (synthetic data: meaningless)" if data.synthetic else ""
    print(f"clean accuracy of {spec.model} on {dataset} ({bench.num_images} images, {name_suffix(spec)}, {bench.device}): "
          f"{100 * correct / bench.num_images:.2f}% ({correct}/{bench.num_images}){synthetic}")
    return 0


def _check_device(device: str | None) -> str | None:
    """The --device of eval: cpu, cuda or cuda:N, and CUDA only where there is a GPU."""
    if device is None:
        return None
    import torch

    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise SpecError(f"device: {device!r}: use cpu, cuda or cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise SpecError(f"device: {device} requested, but this machine has no CUDA GPU")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise SpecError(f"device: {device} requested, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def cmd_report(args) -> int:
    from analysis.report import run

    try:
        print(run(args.directories, out_dir=args.out))
    except (ValueError, FileNotFoundError) as exc:
        raise SpecError(str(exc)) from None
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "resume": cmd_resume, "layers": cmd_layers, "eval": cmd_eval, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["run"])
    if args.command is None:
        parser.print_help()
        return 2
    stopped_by = []

    def on_stop(signum, frame):  # SIGTERM stops a run like Ctrl-C does; the request stays (campaign.interrupts)
        stopped_by.append(signum)
        interrupts.request()
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():  # elsewhere: leave signals alone
        interrupts.clear()
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_stop)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an inherited SIG_IGN stays
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_stop)
    from campaign.outages import EXIT_CODE, CampaignOutage

    try:
        return COMMANDS[args.command](args)
    except CampaignOutage as exc:  # the disk or store went out of service: the cause and the resume command
        print(exc.line(), file=sys.stderr, flush=True)
        return EXIT_CODE
    except (SpecError, ValueError, FileNotFoundError) as exc:  # bad input: one line per problem, no traceback
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a report --out that cannot be written
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        directory = getattr(exc, "directory", None)
        hint = f": run `python -m campaign resume {directory}` to finish the campaign" if directory else ""
        print(f"\ninterrupted{hint}", file=sys.stderr, flush=True)
        _quiet_shutdown()
        return 128 + (stopped_by[0] if stopped_by else signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if previous:
            interrupts.clear()  # the request was this command's


def _quiet_shutdown() -> None:
    """Stop what this driver started without Ray's shutdown chatter (workers' stack traces)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
