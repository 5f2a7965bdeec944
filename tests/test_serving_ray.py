"""Teachers on Ray Serve (hubtune.serving.deployment) on the session's real local Ray (loopback only).

One Serve instance for the module (starting one costs seconds), with a tiny timm teacher saved as a folder
(nothing downloaded); every application is deleted and Serve shut down afterwards.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pytest
import torch

from hubtune.errors import HubtuneError, InputError, TeacherServiceError

NAME = "tiny-a"


def _cli(argv) -> int:
    """``hubtune ARGV``'s exit status: through hubtune.cli.main once serve-teacher is registered there, else
    through a parser holding only this subcommand, handled as main handles errors."""
    from hubtune.cli import build_parser, main
    from hubtune.cli import serve_teacher

    sub_action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "serve-teacher" in sub_action.choices:
        return main(list(argv))
    parser = argparse.ArgumentParser(prog="hubtune")
    serve_teacher.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    try:
        return args.func(args)
    except HubtuneError as e:
        print(f"hubtune {args.command}: error: {e}")
        return 2


def _batch(n=3, seed=0, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def local_teacher(tiny_dir):
    from hubtune.serving.deployment import teacher_spec
    from hubtune.tuning.teachers import load_teacher

    spec = teacher_spec(tiny_dir)
    hm, cfg = load_teacher(spec)
    return spec, hm, cfg


@pytest.fixture(scope="module")
def served(ray_local, local_teacher):
    """The tiny teacher served as NAME with one replica; Serve torn down at the end of the module."""
    pytest.importorskip("ray.serve")
    from ray import serve

    from hubtune.serving import serve_teacher

    t0 = time.perf_counter()
    st = serve_teacher(local_teacher[0], name=NAME, replicas=1, max_batch=8, num_cpus=0.5)
    st.extra["deploy_seconds"] = time.perf_counter() - t0
    try:
        yield st
    finally:
        for app in list(serve.status().applications):
            serve.delete(app)
        serve.shutdown()


def _local_logits(hm, x):
    with torch.no_grad():
        return hm.module.eval()(x).numpy()


def test_served_logits_equal_local(served, local_teacher, ray_local):
    from ray import serve

    from hubtune.serving import RayServeTransport
    from hubtune.tuning.teachers import teacher_view_key

    spec, hm, cfg = local_teacher
    assert served.connection.started is False  # the session's Ray, not a new one
    assert served.info["identity"] == teacher_view_key(hm.identity, cfg)
    assert served.info["data_config"] == cfg and served.info["spec"] == spec
    assert served.info["num_classes"] == 10 and served.info["precision"] == "fp32"
    assert served.info["num_features"] == hm.module.num_features and served.info["model_identity"] == hm.identity
    tr = RayServeTransport(NAME)
    assert tr.name == NAME and tr.replicas() == 1
    xs = [_batch(n, seed=n) for n in (1, 3, 5, 2)]
    pending = [tr.submit(x) for x in xs]  # in flight together: the replica batches them
    for x, p in zip(xs, pending):
        ans = p.result(60)
        assert ans["logits"].dtype == np.float32 and ans["logits"].shape == (x.shape[0], 10)
        np.testing.assert_allclose(ans["logits"], _local_logits(hm, x), rtol=1e-4, atol=1e-5)
        assert ans["identity"] == served.info["identity"] and ans["replica"] == served.info["replica"]
    # no HTTP/gRPC proxy, and every Ray socket (Serve's controller and replica included) on loopback
    assert serve.status().proxies == {}
    ray_local.assert_loopback()


def test_bad_batch_is_a_service_error_not_a_replica_death(served):
    from hubtune.serving import RayServeTransport

    tr = RayServeTransport(NAME)
    with pytest.raises(TeacherServiceError, match="expects inputs of shape"):
        tr.submit(_batch(2, size=16)).result(60)


def test_replica_death_is_survived(served, local_teacher, tmp_path):
    from hubtune.serving import RayServeTransport, TeacherClient, serve_teacher, stop_teacher
    from hubtune.serving.deployment import EXIT_AFTER_ENV, EXIT_ONCE_ENV

    spec, hm, _ = local_teacher
    marker = tmp_path / "died"
    st = serve_teacher(spec, name="tiny-f", replicas=2, num_cpus=0.5,
                       env={EXIT_AFTER_ENV: "2", EXIT_ONCE_ENV: str(marker)})
    try:
        tr = RayServeTransport("tiny-f")
        assert tr.replicas() == 2
        client = TeacherClient(tr, timeout=60, retries=5, poll=0.2)
        for i in range(10):  # 10 > 2 + 2: one replica gets a third request and dies with it
            x = _batch(2, seed=100 + i)
            np.testing.assert_allclose(client(x).numpy(), _local_logits(hm, x), rtol=1e-4, atol=1e-5)
        assert marker.exists(), "no replica exited: the test hook did not fire"
        assert client.stats["failovers"] >= 1 and client.stats["answered"] == 10
    finally:
        stop_teacher(st.name)


class _Images(torch.utils.data.Dataset):
    """Seeded (image, label) pairs already in the tiny models' view (32 px): batches as the engine gets them."""

    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _kd_run(teacher, out, recorded=None, **kw):
    """One epoch of KD of a seeded tiny student from ``teacher``; the teacher logits each step used, in order."""
    from conftest import tiny_timm

    from hubtune.tuning.methods.kd import KnowledgeDistillation

    # a 7-class student re-headed to 10: its new head is drawn from the RNG, whatever the teacher is
    method = KnowledgeDistillation(tiny_timm(num_classes=7, seed=1), teacher, num_classes=10, **kw)
    return _fit_recording(method, out, recorded, lr=0.01)


def _fit_recording(method, out, recorded=None, lr=0.01):
    """One epoch of ``method`` on :class:`_Images`; each step's teacher output appended to ``recorded`` as
    ``(input, teacher output, whether it was requested ahead by a served teacher's pipeline)``."""
    from hubtune.tuning import Engine, TrainConfig
    from hubtune.tuning import teachers as T

    real = T.LiveTeacher.__call__

    def spy(self, batch):
        out_ = real(self, batch)
        if recorded is not None:
            recorded.append((batch["input"].clone(), out_.detach().clone(), "teacher_logits" in batch))
        return out_

    T.LiveTeacher.__call__ = spy
    try:
        Engine(TrainConfig(epochs=1, batch_size=8, lr=lr, seed=0, out_dir=str(out), progress=False)).fit(
            method, _Images())
    finally:
        T.LiveTeacher.__call__ = real
    return method


def test_kd_from_a_served_teacher_equals_kd_from_the_local_one(served, local_teacher, tmp_path):
    """--teacher serve:NAME: the same teacher outputs (to batching's rounding) and the same student, and the
    outputs came from the pipeline (requested ahead), not from per-step calls."""
    spec, hm, _ = local_teacher
    got_s, got_l = [], []
    m_s = _kd_run(f"serve:{NAME}", tmp_path / "s", got_s, serve_window=3)
    m_l = _kd_run(spec, tmp_path / "l", got_l)
    assert len(got_s) == len(got_l) == 6 and all(piped for _, _, piped in got_s)
    for (xs, ts, _), (xl, tl, _) in zip(got_s, got_l):
        torch.testing.assert_close(xs, xl)
        torch.testing.assert_close(ts, tl, rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(m_s.student.state_dict().items(), m_l.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)
    st = m_s.teacher.client.stats
    assert st["answered"] == 6 and st["failovers"] == 0 and st["identity"] == served.info["identity"]


def test_btuning_from_served_teachers_equals_btuning_from_local_ones(served, local_teacher, tmp_path):
    """btuning with --teacher serve:A,serve:B: the services answer penultimate features equal to the local
    models', the LogME weights come from the ranking entries of the models they serve, p(x) is requested ahead
    (pipelined), and the seeded run trains the same student as with the local teachers."""
    from conftest import tiny_timm

    import hubtune
    from hubtune.features import ExtractOptions
    from hubtune.serving import serve_teacher, stop_teacher
    from hubtune.tuning import save_timm_folder
    from hubtune.tuning import teachers as T
    from hubtune.tuning.methods.btuning import BTuning
    from hubtune.tuning.models import penultimate_features

    spec_a, hm, _ = local_teacher
    folder_b = tmp_path / "b"
    save_timm_folder(tiny_timm(seed=2), folder_b)
    rank_dir = tmp_path / "rank"
    rk = hubtune.rank([spec_a, f"local-dir:{folder_b}"], "digits", max_samples=60, out=rank_dir,
                      options=ExtractOptions(precision="fp32", cache_dir=str(tmp_path / "cache"), progress=False))
    st = serve_teacher(folder_b, name="tiny-b", num_cpus=0.5)
    try:
        by_spec = {spec_a: f"serve:{NAME}", st.info["spec"]: "serve:tiny-b"}
        services = ",".join(by_spec[c.spec] for c in rk.candidates)  # in ranked order: the local run's order

        x = _batch(3, seed=7)
        served_b = T.served_teacher("serve:tiny-b").module
        local_b = T.load_teacher(f"local-dir:{folder_b}")[0].module.eval()
        with torch.no_grad():
            torch.testing.assert_close(penultimate_features(served_b, x), penultimate_features(local_b, x),
                                       rtol=1e-4, atol=1e-5)

        def run(teachers, out, recorded):
            torch.manual_seed(0)
            # trade_off 1 (not 100): random tiny teachers' projections are large, and a diverging run would
            # amplify batching's 1e-6 rounding into different students
            m = BTuning.from_ranking(rank_dir, 2, 10, served=teachers, serve_window=3, trade_off=1.0)
            return _fit_recording(m, out, recorded, lr=0.001)

        got_s, got_l = [], []
        m_s = run(services, tmp_path / "s", got_s)
        m_l = run(None, tmp_path / "l", got_l)
        assert m_s.teacher_names == [by_spec[c.spec] for c in rk.candidates]
        for i in range(2):  # the services' projections are the ranking's, as the local teachers'
            torch.testing.assert_close(getattr(m_s.ensemble, f"proj{i}"), getattr(m_l.ensemble, f"proj{i}"))
        assert len(got_s) == len(got_l) == 6
        assert all(piped for _, _, piped in got_s) and not any(piped for _, _, piped in got_l)
        for (_, ps, _), (_, pl, _) in zip(got_s, got_l):
            torch.testing.assert_close(ps, pl, rtol=1e-4, atol=1e-5)
        for (k, a), b in zip(m_s.student.state_dict().items(), m_l.student.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)
        for t in m_s.ensemble.teachers:
            assert t.features_client.stats["answered"] == 6 and t.client.stats["answered"] == 0
        # the command line: --teacher serve:A,serve:B with --ranking
        from hubtune.cli import main

        out = tmp_path / "cli"
        assert main(["tune", "--method", "btuning", "--ranking", str(rank_dir), "--teacher", services,
                     "--dataset", "digits", "--max-samples", "60", "--epochs", "1", "--batch-size", "30",
                     "--lr", "0.001", "--method-arg", "trade_off=1", "--out", str(out)]) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["method_hparams"]["teachers"] == services.split(",") and "train_mse" in rep["history"][-1]
    finally:
        stop_teacher("tiny-b")


def test_ssld_from_a_served_teacher_equals_ssld_from_the_local_one(served, local_teacher, tmp_path):
    """hubtune.ssld(teacher="serve:NAME"): pool scores (logits) and the dedup embedding (features) come from the
    service, the distillation from it, pipelined; the stages' files and the final model equal a local run's."""
    from PIL import Image

    import hubtune
    from hubtune.data import create_dataset

    spec, hm, _ = local_teacher
    student = tmp_path / "student"
    from conftest import tiny_timm

    from hubtune.tuning import save_timm_folder

    save_timm_folder(tiny_timm(seed=3), student)
    ds = create_dataset("digits", "train")
    (tmp_path / "pool").mkdir()
    for i in range(40):
        Image.fromarray(np.asarray(ds.image(300 + i))).save(tmp_path / "pool" / f"{i:03d}.png")

    def run(teacher, out):
        return hubtune.ssld(teacher=teacher, student=f"local-dir:{student}", dataset="digits", max_samples=40,
                            unlabeled=f"images:{tmp_path / 'pool'}", per_class=2, distill_epochs=1,
                            finetune_epochs=1, batch_size=16, lr=0.01, augment=False, out=out)

    run(f"serve:{NAME}", tmp_path / "s")
    run(spec, tmp_path / "l")
    sel = [json.loads((d / "selection" / "selection.json").read_text()) for d in (tmp_path / "s", tmp_path / "l")]
    assert sel[0]["entries"] == sel[1]["entries"] and sel[0]["counts"] == sel[1]["counts"]
    dd = [json.loads((d / "dedup" / "report.json").read_text()) for d in (tmp_path / "s", tmp_path / "l")]
    assert [r["pool_index"] for r in dd[0]["removed"]] == [r["pool_index"] for r in dd[1]["removed"]]
    from safetensors.torch import load_file

    a, b = (load_file(d / "final" / "model.safetensors") for d in (tmp_path / "s", tmp_path / "l"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


def test_kd_survives_a_replica_death_mid_epoch(served, local_teacher, tmp_path):
    """Two replicas, one exits after 2 requests: the epoch completes, every batch got its teacher output once,
    in order, equal to the local teacher's."""
    from hubtune.serving import serve_teacher, stop_teacher
    from hubtune.serving.deployment import EXIT_AFTER_ENV, EXIT_ONCE_ENV

    spec, hm, _ = local_teacher
    marker = tmp_path / "died"
    st = serve_teacher(spec, name="tiny-k", replicas=2, num_cpus=0.5,
                       env={EXIT_AFTER_ENV: "2", EXIT_ONCE_ENV: str(marker)})
    try:
        got = []
        m = _kd_run("serve:tiny-k", tmp_path / "k", got, serve_window=2, serve_timeout=60.0)
        assert marker.exists(), "no replica exited: the test hook did not fire"
        assert len(got) == 6 and all(piped for _, _, piped in got)
        for x, t, _ in got:
            np.testing.assert_allclose(t.numpy(), _local_logits(hm, x), rtol=1e-4, atol=1e-5)
        stats = m.teacher.client.stats
        assert stats["failovers"] >= 1 and stats["answered"] == 6
    finally:
        stop_teacher(st.name)


def test_scale_mid_run_then_to_zero_applies_the_stall_policy(served, local_teacher):
    """A client pipelining batches: scaled 1 -> 2 while it runs, both replicas answer; scaled to 0, the 'fail'
    policy raises a TeacherServiceError that names the service and the cure (no hang)."""
    from hubtune.serving import RayServeTransport, TeacherClient, serve_teacher, scale_teacher, stop_teacher

    spec, hm, _ = local_teacher
    st = serve_teacher(spec, name="tiny-s", replicas=1, num_cpus=0.5)
    try:
        client = TeacherClient(RayServeTransport("tiny-s"), window=4, timeout=5.0, on_stall="fail", poll=0.2)
        seen = set()

        def batches():
            for i in range(200):
                if i == 4:
                    scale_teacher("tiny-s", 2, timeout_s=60)
                if len(seen) == 2:
                    return
                yield {"input": _batch(2, seed=i)}

        for b, logits in client.pipeline(batches()):
            np.testing.assert_allclose(logits.numpy(), _local_logits(hm, b["input"]), rtol=1e-4, atol=1e-5)
            seen = set(client.stats["replicas_seen"])
        assert len(seen) == 2, f"after scaling to 2 only {seen} answered"
        from hubtune.tuning.models import penultimate_features
        from hubtune.tuning.teachers import served_teacher

        fallback = served_teacher("serve:tiny-s", timeout=1.0, on_stall="local").module  # made while it answers
        scale_teacher("tiny-s", 0, timeout_s=60)
        t0 = time.perf_counter()
        with pytest.raises(TeacherServiceError, match=r"tiny-s.*(?s:.*)--scale"):
            client(_batch(1))
        assert time.perf_counter() - t0 < 30
        # 'local': the stalled batches are computed with the same teacher loaded here, logits and features
        x = _batch(2, seed=99)
        np.testing.assert_allclose(fallback(x).numpy(), _local_logits(hm, x), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(penultimate_features(fallback, x), penultimate_features(hm.module.eval(), x))
        assert fallback.client.stats["local"] == 1 and fallback.features_client.stats["local"] == 1
        assert list(fallback.state_dict()) == ["identity_bytes"]  # the local copy is no part of its state
    finally:
        stop_teacher(st.name)


def test_cli_serves_a_tuned_folder(served, tiny_dir, capsys):
    from hubtune.serving import RayServeTransport, stop_teacher

    assert _cli(["serve-teacher", str(tiny_dir), "--name", "tiny-c", "--num-cpus", "0.5", "--max-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert f"serving teacher 'tiny-c' (local-dir:{tiny_dir})" in out and "serve:tiny-c" in out
    assert RayServeTransport("tiny-c").info()["max_batch"] == 4
    stop_teacher("tiny-c")


def test_scale_up_down_to_zero_list_and_stop(served, ray_local, capsys):
    from hubtune.serving import RayServeTransport, list_teachers, scale_teacher

    tr = RayServeTransport(NAME)
    assert scale_teacher(NAME, 2, timeout_s=60) == 2 and tr.replicas() == 2
    seen = set()
    for _ in range(10):  # requests in flight together spread over both replicas
        seen |= {p.result(60)["replica"] for p in [tr.submit(_batch(1, seed=k)) for k in range(6)]}
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"only replicas {seen} answered"
    ray_local.assert_loopback()  # both replicas' servers on 127.0.0.1

    assert _cli(["serve-teacher", "--scale", NAME, "0"]) == 0 and tr.replicas() == 0  # 0 is allowed
    assert "0 replicas running" in capsys.readouterr().out
    pending = tr.submit(_batch(1))
    with pytest.raises(TimeoutError):  # queued: no replica to answer it
        pending.result(0.5)
    pending.cancel()
    with pytest.raises(TeacherServiceError, match="0 replicas running"):
        tr.info(timeout=0.5)
    assert list_teachers() == [{"name": NAME, "status": "RUNNING", "replicas": 0, "message": ""}]
    assert _cli(["serve-teacher", "--list"]) == 0
    assert f"{NAME}\tRUNNING\t0 replicas" in capsys.readouterr().out
    assert _cli(["serve-teacher", "--stop", NAME]) == 0
    assert list_teachers() == []
    with pytest.raises(TeacherServiceError, match=f"'{NAME}'.*running teachers: none"):
        RayServeTransport(NAME)
    assert _cli(["serve-teacher", "--stop", NAME]) == 2
    out = capsys.readouterr()
    assert "no teacher service named" in out.out + out.err


def test_missing_service_names_it_and_lists_running(served):
    from hubtune.serving import RayServeTransport, scale_teacher

    with pytest.raises(TeacherServiceError, match="'nope'.*running teachers: "):
        RayServeTransport("nope")
    with pytest.raises(TeacherServiceError, match="'nope'"):
        scale_teacher("nope", 1)


@pytest.mark.parametrize("argv, msg", [
    ([], "give the teacher to serve"),
    (["resnet18", "--replicas", "0"], "--replicas '0' is invalid"),
    (["resnet18", "--max-batch", "x"], "--max-batch 'x' is invalid"),
    (["--scale", "a", "-1"], "--scale N '-1' is invalid"),
    (["--list", "--stop", "a"], "cannot be combined"),
    (["resnet18", "--list"], "takes no SPEC"),
])
def test_cli_bad_input_exits_2(argv, msg, capsys):
    assert _cli(["serve-teacher", *argv]) == 2  # checked before Ray is imported or joined
    out = capsys.readouterr()
    assert msg in out.out + out.err and "Traceback" not in out.out + out.err


def test_python_api_bad_input():
    pytest.importorskip("ray.serve")
    from hubtune.serving import serve_teacher

    with pytest.raises(InputError, match="replicas=0"):
        serve_teacher("resnet18", replicas=0)
    with pytest.raises(InputError, match="service name"):
        serve_teacher("resnet18", name="bad name!")
    with pytest.raises(InputError, match="not a folder"):
        serve_teacher("./no/such/folder")
