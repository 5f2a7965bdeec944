"""`hubtune tune`: train with a registered method."""
from __future__ import annotations

from ..errors import InputError

# CLI option -> tune() setting; every one may also be set in --config FILE.yaml (the command line wins).
TUNE_OPTIONS = ("method", "model", "ranking", "top_k", "teacher", "dataset", "target_dataset", "eval_dataset",
                "num_classes", "epochs", "batch_size", "lr", "max_samples", "data_dir", "out", "resume",
                "device", "precision", "optimizer", "seed")


def _registered_methods() -> list[str]:
    from ..tuning.api import _ensure_registered
    from ..tuning.method import METHODS

    _ensure_registered()
    return METHODS.names()


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
        args.model = cfg["model"] = [m.strip() for item in args.models for m in item.split(",") if m.strip()]
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
    print(f"tuned {report.get('model')} with {report['method']} for {len(report.get('history', []))} epochs: {shown}")
    print(f"wrote {cfg['out']}/model.safetensors, config.json, report.json, metrics.jsonl, checkpoint.pt")
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    methods = [] if lazy else _registered_methods()
    tu = sub.add_parser(
        "tune", help="tune a model with a registered method (" + ", ".join(methods) + ")",
        description="Train with one registered method on a dataset and write the tuned model (timm folder: "
                    "model.safetensors + config.json, loadable as local-dir:OUT), report.json, metrics.jsonl and "
                    f"a resumable checkpoint.pt to OUT. Methods: {', '.join(methods)}. dann/cdan need "
                    "--target-dataset (unlabelled train split; evaluated on its test split). btuning, zootuning "
                    "and hubpathway take their models from --ranking DIR --top-k K (or --models A,B,C; btuning "
                    "needs the ranking's LogME weights). Every option can "
                    "be set in --config FILE.yaml (keys as the options, with '_' for '-', plus any TrainConfig "
                    "field and 'method_args:'); the command line overrides the file.")
    tu.add_argument("--method", help=f"one of: {', '.join(methods)}")
    tu.add_argument("--model", help="model spec (e.g. resnet18, local-dir:PATH, hf-hub:ORG/NAME)")
    tu.add_argument("--models", action="append", metavar="A,B,...",
                    help="zootuning/hubpathway: the models, comma-separated (instead of --ranking)")
    tu.add_argument("--ranking", help="a `hubtune rank --out` folder: tune its best model (btuning: its top-K "
                                      "are the teachers; zootuning/hubpathway: its top-K are the models)")
    tu.add_argument("--top-k", type=int, help="with --ranking: the top K (kd: the best is tuned, the next are "
                                              "teachers; btuning/zootuning/hubpathway: default 2)")
    tu.add_argument("--teacher", help="teacher spec, for distillation methods")
    tu.add_argument("--dataset", help="registered dataset name or imagefolder:PATH (train split trains)")
    tu.add_argument("--target-dataset", help="dann/cdan: the target domain's dataset")
    tu.add_argument("--eval-dataset", help="evaluate on this dataset's test split instead")
    tu.add_argument("--num-classes", type=int, help="default: the dataset's number of classes")
    tu.add_argument("--epochs", type=int)
    tu.add_argument("--batch-size", type=int)
    tu.add_argument("--lr", type=float)
    tu.add_argument("--optimizer", help="sgd or adamw")
    tu.add_argument("--seed", type=int)
    tu.add_argument("--max-samples", type=int, help="stratified subsample of each split to this many images")
    tu.add_argument("--data-dir", help="where dataset files are looked for (default $HUBTUNE_DATA_DIR)")
    tu.add_argument("--out", help="output folder")
    tu.add_argument("--config", help="YAML file of settings (the command line overrides it)")
    tu.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt")
    tu.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    tu.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    tu.add_argument("--method-arg", action="append", metavar="NAME=VALUE",
                    help="a method keyword argument (repeatable), e.g. --method-arg trade_off=0.5")
    tu.set_defaults(func=_cmd_tune)
