"""`hubtune ssld`: PaddleClas's SSLD recipe, stage by stage (see :mod:`hubtune.recipes.ssld`)."""
from __future__ import annotations

import json

from ..errors import InputError

MULTI_ASSIGN = ("first", "all", "drop")   # hubtune.recipes.ssld.MULTI_ASSIGN (not imported: torch stays unloaded)
LOSSES = ("skl", "js", "kl")


def _threshold(text: str):
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--dedup-threshold {text!r} is invalid: give a cosine such as 0.95, or none (exact "
                         "duplicates only)") from None


def _cmd_ssld(args) -> int:
    from ..recipes.ssld import ssld

    if args.no_augment and args.auto_augment is not None:
        raise InputError("--no-augment contradicts --auto-augment; drop one")
    augment = False if args.no_augment else ({"auto_augment": args.auto_augment} if args.auto_augment else None)
    against = args.dedup_against
    if against is not None and against.lower() == "none":
        against = False
    rep = ssld(teacher=args.teacher, student=args.student, dataset=args.dataset, unlabeled=args.unlabeled,
               out=args.out, per_class=args.per_class, multi_assign=args.multi_assign, candidates=args.candidates,
               dedup_against=against, dedup_threshold=_threshold(args.dedup_threshold), loss=args.loss,
               temperature=args.temperature, teacher_bn=args.teacher_bn, distill_epochs=args.distill_epochs,
               finetune_epochs=args.finetune_epochs, eval_dataset=args.eval_dataset, max_samples=args.max_samples,
               data_dir=args.data_dir, pool_split=args.pool_split, batch_size=args.batch_size, lr=args.lr,
               finetune_lr=args.finetune_lr, seed=args.seed, augment=augment, cache_teacher=args.cache_teacher,
               student_pretrained=not args.scratch, device=args.device, resume=args.resume,
               overwrite=args.overwrite, verbose=not args.quiet)
    short = {k: rep.get(k) for k in ("n_labeled", "n_pool", "n_selected", "dedup", "distill_eval_acc",
                                     "final_eval_acc", "model")}
    print(json.dumps(short, indent=1))
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    p = sub.add_parser(
        "ssld", help="SSLD: distil on teacher-selected unlabelled data, then fine-tune",
        description="PaddleClas's SSLD recipe in five resumable stages, each writing files under --out: scores/ "
                    "(the teacher's logits over the pool, through the teacher cache), dedup/ (pool images removed as "
                    "exact or near duplicates of the evaluation set, one entry each), selection/ (top-k per class, "
                    "per-class counts), distill/ (label-free kd on labelled + selected images) and final/ (a fine-tune "
                    "on the labelled set). --resume continues an interrupted run; a stage whose inputs are unchanged "
                    "is skipped, so a stage's files may be inspected or replaced by hand between runs.")
    p.add_argument("--teacher", required=True, help="as `hubtune tune --method kd --teacher`: a hub spec, "
                                                    "local-dir:PATH of a tuned folder, or serve:NAME")
    p.add_argument("--student", required=True, help="the student's spec (e.g. resnet18, local-dir:PATH)")
    p.add_argument("--scratch", action="store_true", help="build the student without pretrained weights")
    p.add_argument("--dataset", required=True, help="the labelled set: registered dataset name or imagefolder:PATH")
    p.add_argument("--unlabeled", required=True, help="the pool: a registered dataset (labels ignored), "
                                                      "images:PATH (a folder of images, no class folders)")
    p.add_argument("--pool-split", default="train", help="the split of a registered pool dataset (default train)")
    p.add_argument("--eval-dataset", help="evaluate on this dataset's test split (default: --dataset's)")
    p.add_argument("--max-samples", type=int, help="labelled images kept (stratified), as tune --max-samples")
    p.add_argument("--per-class", type=int, help="k, pool images selected per class (default: pool size // classes)")
    p.add_argument("--multi-assign", choices=MULTI_ASSIGN, default="first",
                   help="an image in the top-k of several classes: first (greedy by score, disjoint; default), "
                        "all (kept once, counted in each), drop (left out)")
    p.add_argument("--candidates", choices=("all", "predicted"), default="all",
                   help="a class ranks every pool image (all) or only those the teacher predicts as it (predicted)")
    p.add_argument("--dedup-against", help="dataset whose test split the pool is cleared of (default: the "
                                           "evaluation set; none: no such dedup)")
    p.add_argument("--dedup-threshold", default="0.95",
                   help="cosine of centred teacher embeddings at or above which a pool image is a near duplicate "
                        "(default 0.95; none: exact duplicates only)")
    p.add_argument("--loss", choices=LOSSES, default="skl",
                   help="skl: PaddleClas's symmetric KL (SSLD's 'JS', default); js: the true Jensen-Shannon; kl")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the loss (default 1)")
    p.add_argument("--teacher-bn", choices=("eval", "train"), default="eval",
                   help="the teacher's BatchNorm during distillation: eval (running statistics, default) or train "
                        "(batch statistics, as SSLD)")
    p.add_argument("--cache-teacher", action="store_true",
                   help="cache the teacher's outputs for the augmented training images first (not with "
                        "--teacher-bn train)")
    p.add_argument("--distill-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=2, help="0: no final fine-tune")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="distillation learning rate")
    p.add_argument("--finetune-lr", type=float, help="default: --lr / 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="train on the evaluation transform")
    p.add_argument("--auto-augment", metavar="POLICY", help="a timm auto-augment policy string")
    p.add_argument("--data-dir", help="where dataset files are looked for (default $HUBTUNE_DATA_DIR)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per stage)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_ssld)
