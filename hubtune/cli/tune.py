"""`hubtune tune`: train with a registered method."""
from __future__ import annotations

from ..errors import InputError

# CLI option -> tune() setting; every one may also be set in --config FILE.yaml (the command line wins).
TUNE_OPTIONS = ("method", "model", "ranking", "top_k", "teacher", "dataset", "target_dataset", "eval_dataset",
                "num_classes", "epochs", "batch_size", "lr", "max_samples", "data_dir", "out", "resume",
                "overwrite", "device", "precision", "optimizer", "seed", "task")
# CLI option -> hubtune.data.augment.AugmentConfig option
AUGMENT_OPTIONS = {"auto_augment": "auto_augment", "mixup": "mixup", "cutmix": "cutmix",
                   "smoothing": "label_smoothing"}


def _registered_methods() -> list[str]:
    from ..tuning.method import METHODS

    return METHODS.names()


def methods_help() -> str:
    """One block per registered method: what it takes (from its declaration) and its settings, for the
    epilog of ``hubtune tune --help``."""
    import textwrap

    from ..tuning.method import METHODS

    lines = ["method settings (--method-arg NAME=VALUE, repeatable, the value read as YAML; or method_args: in "
             "--config):"]
    for name in METHODS.names():
        cls = METHODS.get(name)
        takes = ["--target-dataset" if cls.inputs == "paired" else None,
                 "--ranking --top-k or --models" if cls.models == "many" else None,
                 "--teacher" if cls.teachers else None]
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        head = f"  {name}" + (f" ({', '.join(t for t in takes if t)})" if any(takes) else "")
        line = f"{head}: {doc}" if doc else head
        lines.append(line if len(line) <= 118 else line[:115] + "...")
        for sname, setting in cls.all_settings().items():
            lines.extend(textwrap.wrap(setting.describe(sname), 116, initial_indent="      ",
                                       subsequent_indent="        "))
    return "\n".join(lines)


def _cmd_tune(args) -> int:
    from ..tuning.api import TRAIN_KEYS, load_tune_config, tune

    cfg = load_tune_config(args.config)
    for key in TUNE_OPTIONS:  # the command line overrides the config file
        value = getattr(args, key, None)
        if value is not None and value is not False:
            cfg[key] = value
    if args.models:
        if args.model is not None:
            raise InputError("give --model or --models, not both")
        from ..hub.spec import split_specs

        args.model = cfg["model"] = [m for item in args.models for m in split_specs(item)]
    if args.model is not None and args.ranking is None:  # a model chosen here replaces the file's choice
        cfg.pop("ranking", None)
    if args.ranking is not None and args.model is None:
        cfg.pop("model", None)
    if args.method_arg:
        margs = dict(cfg.get("method_args") or {})
        for item in args.method_arg:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise InputError(f"--method-arg {item!r} must be NAME=VALUE (the value is read as YAML)")
            import yaml

            margs[name.replace("-", "_")] = yaml.safe_load(value)
        cfg["method_args"] = margs
    aug = cfg.get("augment")
    if args.no_augment:
        aug = False
    opts = {dst: getattr(args, src) for src, dst in AUGMENT_OPTIONS.items() if getattr(args, src) is not None}
    if opts:
        if aug is False:
            raise InputError(f"--no-augment (or 'augment: false') contradicts "
                             f"{', '.join('--' + k.replace('_', '-') for k in AUGMENT_OPTIONS if getattr(args, k) is not None)}; "
                             "drop one")
        aug = dict(aug if isinstance(aug, dict) else {}, **opts)
    if aug is not None:
        cfg["augment"] = aug
    if args.quiet:
        cfg["verbose"] = False
    elif "verbose" not in cfg:
        cfg["verbose"] = True
    if not cfg.get("method"):
        raise InputError(f"--method is required (or 'method:' in --config); choose one of: "
                         f"{', '.join(_registered_methods())}")
    if not cfg.get("out"):
        raise InputError("--out DIR is required (or 'out:' in --config): the tuned model and report go there")
    train = {k: cfg.pop(k) for k in list(cfg) if k in TRAIN_KEYS}
    method = cfg.pop("method")
    report = tune(method, config=cfg, train=train)
    final = report.get("final", {})
    shown = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float) and k != "seconds")
    if not args.quiet:
        print(f"tuned {report.get('model')} with {report['method']} for {len(report.get('history', []))} epochs: {shown}")
    if not args.quiet:
        panel = ", target_panel.png" if report.get("panel") else ""
        print(f"wrote {cfg['out']}/model.safetensors, config.json, report.json, metrics.jsonl, checkpoint.pt{panel}")
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    import argparse
    import textwrap

    methods = [] if lazy else _registered_methods()
    tu = sub.add_parser(
        "tune", help="tune a model with a registered method (" + ", ".join(methods) + ")",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=None if lazy else methods_help(),
        description=textwrap.fill("Train with one registered method on a dataset and write the tuned model (timm folder: "
                    "model.safetensors + config.json, loadable as local-dir:OUT), report.json, metrics.jsonl and "
                    f"a resumable checkpoint.pt to OUT. Methods: {', '.join(methods)} (below: what each takes and "
                    "its settings). A paired method needs --target-dataset (unlabelled train split; evaluated on "
                    "its test split); a method of several models takes them from --ranking DIR --top-k K (or "
                    "--models A,B,C). Every option can "
                    "be set in --config FILE.yaml (keys as the options, with '_' for '-', plus any TrainConfig "
                    "field and 'method_args:'); the command line overrides the file. New methods: a file in "
                    "hubtune/tuning/methods/, a module named in HUBTUNE_PLUGINS, or a 'hubtune.methods' entry point.",
                    118))
    tu.add_argument("--method", help=f"one of: {', '.join(methods)}")
    tu.add_argument("--task", choices=("classification", "segmentation"),
                    help="default: the method's. segmentation: --dataset/--target-dataset are segmentation datasets "
                         "(synth2d-source, synth2d-target, segfolder:PATH with images/ and masks/), --model a "
                         "network (basicunet, dynunet, local-dir:PATH), evaluation by Dice and HD95; "
                         "'--method finetune' means seg-finetune")
    tu.add_argument("--model", help="model spec (e.g. resnet18, local-dir:PATH, hf-hub:ORG/NAME)")
    tu.add_argument("--models", action="append", metavar="A,B,...",
                    help="zootuning/hubpathway: the models, comma-separated (instead of --ranking)")
    tu.add_argument("--ranking", help="a `hubtune rank --out` folder: tune its best model (btuning: its top-K "
                                      "are the teachers; zootuning/hubpathway: its top-K are the models)")
    tu.add_argument("--top-k", type=int, help="with --ranking: the top K (btuning/zootuning/hubpathway: default 2)")
    tu.add_argument("--teacher", help="kd: the teacher, a model tuned on this dataset (local-dir:PATH), or "
                                      "serve:NAME, a teacher served by `hubtune serve-teacher`; with "
                                      "--ranking and no --teacher, the ranking's top-1 is fine-tuned into OUT/teacher "
                                      "first (reused when complete) and the student is --model or the best-ranked "
                                      "other model (within --method-arg max_student_params=N). btuning with "
                                      "--ranking: serve:A,serve:B, services of ranked models, as the teachers")
    tu.add_argument("--dataset", help="registered dataset name or imagefolder:PATH (train split trains)")
    tu.add_argument("--target-dataset", help="dann/cdan/seg-adversarial: the target domain's dataset")
    tu.add_argument("--eval-dataset", help="evaluate on this dataset's test split instead (an image folder: the whole "
                                           "folder; without it an --dataset image folder holds out a seeded "
                                           "stratified 20%% for evaluation)")
    tu.add_argument("--num-classes", type=int, help="default: the dataset's number of classes")
    tu.add_argument("--epochs", type=int)
    tu.add_argument("--batch-size", type=int)
    tu.add_argument("--lr", type=float)
    tu.add_argument("--optimizer", help="sgd or adamw")
    tu.add_argument("--seed", type=int, help="seeds everything random: new heads, data order, augmentation (default 0)")
    tu.add_argument("--max-samples", type=int,
                    help="stratified subsample of the training set to this many images (>= 1; evaluation uses "
                         "the whole evaluation set)")
    tu.add_argument("--data-dir", help="where dataset files are looked for (default $HUBTUNE_DATA_DIR)")
    tu.add_argument("--out", help="output folder")
    tu.add_argument("--config", help="YAML file of settings (the command line overrides it)")
    tu.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt")
    tu.add_argument("--overwrite", action="store_true", default=None,
                    help="replace the run in OUT (only hubtune's files: checkpoint.pt, model.safetensors, "
                         "config.json, report.json, metrics.jsonl); without it (or --resume) a folder that holds "
                         "a run is refused")
    tu.add_argument("--quiet", action="store_true", help="no per-epoch lines on stdout (metrics.jsonl has them)")
    tu.add_argument("--no-augment", action="store_true",
                    help="train on the evaluation transform (default: timm's training transform from the model's "
                         "data config: random resized crop, flip, colour jitter; seeded per sample and epoch)")
    tu.add_argument("--auto-augment", metavar="POLICY",
                    help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w3")
    tu.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup Beta alpha (timm recipes: 0.8; 0 = off)")
    tu.add_argument("--cutmix", type=float, metavar="ALPHA", help="cutmix Beta alpha (timm recipes: 1.0; 0 = off)")
    tu.add_argument("--smoothing", type=float, help="label smoothing (timm recipes: 0.1)")
    tu.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    tu.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    tu.add_argument("--method-arg", action="append", metavar="NAME=VALUE",
                    help="a method setting (repeatable), e.g. --method-arg trade_off=0.5; each method's are listed below")
    tu.set_defaults(func=_cmd_tune)
