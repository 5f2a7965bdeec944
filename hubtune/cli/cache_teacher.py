"""`hubtune cache-teacher`: write a teacher's outputs for kd / btuning to read."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

def _cmd_cache_teacher(args) -> int:
    from ..features.cache import default_cache_dir
    from ..tuning.api import model_and_transform, train_dataset
    from ..hub import load_candidate
    from ..tuning.kd import cache_teacher_outputs, teacher_cache_path

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "teachers"
    if args.ranking:  # btuning: the LogME-weighted projection of the top-K, keyed by the whole ensemble
        from ..data import transform_for
        from ..tuning.api import TransformedDataset
        from ..tuning.btuning import BTuning
        from ..tuning.kd import module_identity

        src, _ = train_dataset(args.dataset, None, data_dir=args.data_dir, max_samples=args.max_samples,
                               seed=args.seed, split=args.split)
        m = BTuning.from_ranking(args.ranking, args.top_k or 2, src.num_classes, student=args.model)
        ds = TransformedDataset(src, transform_for(m.data_config))
        path = teacher_cache_path(cache_dir, module_identity(m.ensemble))
        cache_teacher_outputs(m.ensemble.to(args.device or "cpu"), ds, path, batch_size=args.batch_size,
                              device=args.device)
        print(path)
        return 0
    if not args.teacher:
        raise InputError("give --teacher SPEC (kd) or --ranking DIR --top-k K (btuning)")
    teacher = load_candidate(args.teacher)  # the Candidate: its identity keys the cache, as kd's does
    if args.device:
        teacher.module.to(args.device)
    # the images `hubtune tune` trains on: the student's transform (--model), else the teacher's
    _, transform, _ = model_and_transform(args.model or args.teacher)
    _, ds = train_dataset(args.dataset, transform, data_dir=args.data_dir, max_samples=args.max_samples,
                          seed=args.seed, split=args.split)
    path = teacher_cache_path(cache_dir, teacher.identity)
    cache_teacher_outputs(teacher, ds, path, batch_size=args.batch_size, device=args.device)
    print(path)
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    ct = sub.add_parser(
        "cache-teacher", help="write a teacher's outputs for `hubtune tune --method kd|btuning` to read",
        description="Run the teacher once (eval, fp32) over the un-augmented training images (the same images, "
                    "order and transform as `hubtune tune` with the same --dataset/--max-samples/--seed) and "
                    "write its logits where KnowledgeDistillation(cache_teacher=True, cache_dir=DIR) reads them; "
                    "prints the path. Then: hubtune tune --method kd ... --method-arg cache_teacher=true "
                    "--method-arg cache_dir=DIR.")
    ct.add_argument("--teacher", help="kd: the teacher spec (e.g. local-dir:PATH)")
    ct.add_argument("--ranking", help="btuning: a `hubtune rank --out` folder; caches the LogME-weighted "
                                      "projection of its top K (then --method-arg cache_teacher=true)")
    ct.add_argument("--top-k", type=int, help="btuning: how many teachers (default 2)")
    ct.add_argument("--model", help="the student spec: its transform is the one tune uses (default: the "
                                    "teacher's, for btuning the ranking's best; give it as tune's --model)")
    ct.add_argument("--dataset", required=True, help="registered dataset name or imagefolder:PATH")
    ct.add_argument("--split", default="train")
    ct.add_argument("--max-samples", type=int, help="stratified subsample, as tune --max-samples")
    ct.add_argument("--seed", type=int, default=0, help="subsample seed, as tune --seed (default 0)")
    ct.add_argument("--data-dir", help="where dataset files are looked for (default $HUBTUNE_DATA_DIR)")
    ct.add_argument("--cache-dir", help="default: $HUBTUNE_CACHE/teachers (~/.cache/hubtune/teachers)")
    ct.add_argument("--batch-size", type=int, default=64)
    ct.add_argument("--device", help="cpu, cuda, cuda:N (default: the teacher's device)")
    ct.set_defaults(func=_cmd_cache_teacher)
