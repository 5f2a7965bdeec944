"""`hubtune cache-teacher`: write a teacher's outputs (E epochs of them) for kd / btuning to read."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def _augment(args):
    """The AugmentConfig `hubtune tune` would use with the same options."""
    from ..tuning.api import augment_config

    if args.no_augment:
        if args.auto_augment is not None:
            raise InputError("--no-augment contradicts --auto-augment; drop one")
        return augment_config(False)
    return augment_config({"auto_augment": args.auto_augment} if args.auto_augment is not None else None)


def _training_set(args, data_config, aug):
    """The training images exactly as `hubtune tune` builds them for a model of ``data_config``: the same
    subsample, order, held-out split, training transform and augmentation seed (``data_config`` None: only
    the ImageDataset)."""
    from ..data.augment import train_transform_for
    from ..tuning.api import train_dataset

    transform = None if data_config is None else train_transform_for(data_config, aug)
    return train_dataset(args.dataset, transform, data_dir=args.data_dir, max_samples=args.max_samples,
                         seed=args.seed, split=args.split, eval_dataset=args.eval_dataset)


def _cmd_cache_teacher(args) -> int:
    from ..features.cache import default_cache_dir
    from ..tuning.models import load_model
    from ..tuning.teachers import cache_teacher_outputs

    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs {args.epochs} is invalid: give the number of epochs `hubtune tune` will run (>= 1)")
    aug = _augment(args)
    epochs = (args.epochs or 1) if aug.enabled else 1  # un-augmented images are the same every epoch
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "teachers"
    if args.ranking:  # btuning: the LogME-weighted projection of the top-K, keyed by the whole ensemble
        from ..tuning.methods.btuning import BTuning

        src, _ = _training_set(args, None, aug)
        m = BTuning.from_ranking(args.ranking, args.top_k or 2, src.num_classes, student=args.model, dataset=src)
        _, ds = _training_set(args, m.data_config, aug)
        path = cache_teacher_outputs(m.ensemble.to(args.device or "cpu"), ds, cache_dir=cache_dir,
                                     batch_size=args.batch_size, device=args.device, epochs=epochs)
        print(path)
        return 0
    if not args.teacher:
        raise InputError("give --teacher SPEC (kd) or --ranking DIR --top-k K (btuning)")
    teacher = load_model(args.teacher, role="teacher")  # the Candidate's identity keys the cache, as kd's does
    if args.device:
        teacher.module.to(args.device)
    # the images `hubtune tune` trains on are prepared for the student (--model, else the teacher); the teacher
    # sees them through its own view (InputAdapter), exactly as KnowledgeDistillation feeds it
    student_config = load_model(args.model, pretrained=False, role="model").data_config if args.model \
        else teacher.data_config
    _, ds = _training_set(args, student_config, aug)
    path = cache_teacher_outputs(teacher, ds, cache_dir=cache_dir, batch_size=args.batch_size, device=args.device,
                                 epochs=epochs, input_config=student_config)
    print(path)
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    ct = sub.add_parser(
        "cache-teacher", help="write a teacher's outputs for `hubtune tune --method kd|btuning` to read",
        description="Run the teacher once (eval, fp32, through its own input view) over the training images as "
                    "`hubtune tune` builds them (same --dataset/--max-samples/--seed/--eval-dataset, same "
                    "augmentation, deterministic per sample and epoch) for --epochs epochs, and write its logits "
                    "where KnowledgeDistillation(cache_teacher=True, cache_dir=DIR) reads them; prints the path. "
                    "Then: hubtune tune --method kd ... --method-arg cache_teacher=true --method-arg cache_dir=DIR "
                    "(with the same augmentation options and at most --epochs epochs).")
    ct.add_argument("--teacher", help="kd: the teacher spec (e.g. local-dir:PATH)")
    ct.add_argument("--ranking", help="btuning: a `hubtune rank --out` folder; caches the LogME-weighted "
                                      "projection of its top K (then --method-arg cache_teacher=true)")
    ct.add_argument("--top-k", type=int, help="btuning: how many teachers (default 2)")
    ct.add_argument("--model", help="the student spec: the images are prepared for it, as tune does (default: "
                                    "the teacher, for btuning the ranking's best; give it as tune's --model)")
    ct.add_argument("--dataset", required=True, help="registered dataset name or imagefolder:PATH")
    ct.add_argument("--eval-dataset", help="as tune --eval-dataset (decides the held-out share of an image folder)")
    ct.add_argument("--split", default="train")
    ct.add_argument("--max-samples", type=int, help="stratified subsample, as tune --max-samples")
    ct.add_argument("--seed", type=int, default=0, help="subsample and augmentation seed, as tune --seed (default 0)")
    ct.add_argument("--epochs", type=int, help="how many augmented epochs to cache: at least tune's --epochs "
                                               "(default 1; un-augmented images are cached once and replayed)")
    ct.add_argument("--no-augment", action="store_true", help="as tune --no-augment: cache the evaluation view")
    ct.add_argument("--auto-augment", metavar="POLICY", help="as tune --auto-augment (a timm policy string)")
    ct.add_argument("--data-dir", help="where dataset files are looked for (default $HUBTUNE_DATA_DIR)")
    ct.add_argument("--cache-dir", help="default: $HUBTUNE_CACHE/teachers (~/.cache/hubtune/teachers)")
    ct.add_argument("--batch-size", type=int, default=64)
    ct.add_argument("--device", help="cpu, cuda, cuda:N (default: the teacher's device)")
    ct.set_defaults(func=_cmd_cache_teacher)
