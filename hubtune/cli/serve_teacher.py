"""`hubtune serve-teacher`: run a teacher as a Ray Serve application that students distill from."""
from __future__ import annotations

from ..errors import InputError

_NEEDS_CLUSTER = (
    "hubtune serve-teacher needs a running Ray cluster, because a teacher deployed on a private Ray instance "
    "would stop when this command returns. Start one with `ray start --head` (students on it then pass "
    "--ray-address auto), or give its address with --ray-address HOST:PORT")


def _connect(address: str):
    from .._ray import connect

    try:
        return connect(address)
    except InputError as exc:
        raise InputError(f"{_NEEDS_CLUSTER} ({exc})") from None


def _count(text: str, what: str, low: int) -> int:
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = None
    if n is None or n < low:
        raise InputError(f"{what} {text!r} is invalid: give a whole number >= {low}")
    return n


def _cmd_serve_teacher(args) -> int:
    actions = [a for a in ("list", "scale", "stop") if getattr(args, a)]
    if len(actions) > 1:
        raise InputError(f"--{actions[0]} and --{actions[1]} cannot be combined: give one action")
    if actions and args.spec:
        raise InputError(f"--{actions[0]} takes no SPEC (got {args.spec!r}): deploy and manage in two commands")
    if not actions and not args.spec:
        raise InputError("give the teacher to serve (a hub spec or a `hubtune tune --out` folder), or one of "
                         "--list, --scale NAME N, --stop NAME")
    address = args.ray_address or "auto"
    if actions == ["scale"]:
        name, n = args.scale[0], _count(args.scale[1], "--scale N", 0)
    elif not actions:  # check every number before Ray starts
        _count(args.replicas, "--replicas", 1)
        _count(args.max_batch, "--max-batch", 1)
        for what, v in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)):
            if not v >= 0:
                raise InputError(f"{what} {v!r} is invalid: give a number >= 0")

    from .._ray import import_ray

    import_ray()  # MissingExtraError naming hubtune[ray] when Ray is not installed
    from ..serving import deployment as dep  # the same when Ray Serve's own dependencies are missing

    conn = _connect(address)
    if actions == ["list"]:
        teachers = dep.list_teachers()
        if not teachers:
            print(f"no teacher services on the Ray cluster at {conn.address}")
        for t in teachers:
            print(f"{t['name']}\t{t['status']}\t{t['replicas']} replicas" + (f"\t{t['message']}" if t["message"]
                                                                              else ""))
        return 0
    if actions == ["scale"]:
        running = dep.scale_teacher(name, n, timeout_s=args.timeout)
        print(f"teacher service {name!r}: {running} replicas running (asked for {n})")
        return 0
    if actions == ["stop"]:
        dep.stop_teacher(args.stop)
        print(f"stopped teacher service {args.stop!r}")
        return 0
    served = dep.serve_teacher(args.spec, name=args.name, replicas=int(args.replicas),
                               max_batch=int(args.max_batch), num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                               precision=args.precision)
    info = served.info
    print(f"serving teacher {served.name!r} ({info['spec']}) with {served.replicas} replica(s) on the Ray cluster "
          f"at {conn.address}: identity {info['identity'][:16]}, {info['num_classes']} classes, input "
          f"{tuple(info['data_config']['input_size']) if info.get('data_config') else 'as given'}, "
          f"{info['device']} {info['precision']}")
    print(f"students on this cluster reach it as serve:{served.name}; scale it with `hubtune serve-teacher --scale "
          f"{served.name} N`, stop it with `hubtune serve-teacher --stop {served.name}`")
    return 0


def add_parser(sub, lazy: bool = False) -> None:
    st = sub.add_parser(
        "serve-teacher", help="serve a teacher on Ray Serve for students to distill from; list, scale, stop",
        description="Deploy a teacher (a hub spec, or the folder `hubtune tune --out` wrote) as a Ray Serve "
                    "application on a running Ray cluster, where it stays after this command returns: start one "
                    "with `ray start --head` (or set RAY_ADDRESS). Each replica loads the teacher once and "
                    "answers batches already in the teacher's input view, merging up to --max-batch requests per "
                    "forward pass (fp32 on CPU, bf16 autocast on a GPU with bf16). No HTTP proxy is started: "
                    "students reach it through Serve handles as serve:NAME. --scale NAME 0 is allowed (students "
                    "then apply their stall policy). From Python, hubtune.serving.serve_teacher(spec) without an "
                    "address uses a private local Ray on 127.0.0.1 that ends with the process. Needs "
                    "pip install 'hubtune[ray]'.")
    st.add_argument("spec", nargs="?", metavar="SPEC|TUNED_DIR", help="the teacher: a hub spec or a tuned folder")
    st.add_argument("--name", help="the service name (default: the model's or folder's name)")
    st.add_argument("--replicas", default="1", metavar="N", help="replicas to start (default 1)")
    st.add_argument("--max-batch", default="32", metavar="B",
                    help="requests merged into one forward pass by each replica (default 32)")
    st.add_argument("--num-cpus", type=float, default=1, help="CPUs each replica holds (default 1)")
    st.add_argument("--num-gpus", type=float, default=0, help="GPUs each replica holds (default 0)")
    st.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: bf16 autocast on a CUDA GPU with bf16, else fp32")
    st.add_argument("--ray-address", metavar="auto|ADDRESS",
                    help="the Ray cluster: 'auto' (RAY_ADDRESS, then the local `ray start`; the default) or "
                         "HOST:PORT")
    st.add_argument("--list", action="store_true", help="list the teacher services on the cluster")
    st.add_argument("--scale", nargs=2, metavar=("NAME", "N"), help="set the replicas of a service (0 allowed)")
    st.add_argument("--stop", metavar="NAME", help="stop a service")
    st.add_argument("--timeout", type=float, default=120.0,
                    help="with --scale: seconds to wait for the replicas (default 120)")
    st.set_defaults(func=_cmd_serve_teacher)
