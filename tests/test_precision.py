"""Precision policies (hubtune.features.precision): tie groups, the split forward passes, structure detection,
the probe error."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hubtune.errors import InputError
from hubtune.features import precision as P
from hubtune.features.precision import (
    PRECISIONS, find_stem_end, find_tail, make_forward, probe_error, resolve_precision, tie_groups, tie_labels,
)
from hubtune.hub.candidate import Candidate

timm = pytest.importorskip("timm")
needs_bf16 = pytest.mark.skipif(not P.bf16_supported("cpu"), reason="this CPU has no bf16 support in oneDNN")


# --------------------------------------------------------------------------------------------- tie groups
def test_tie_groups_hand_checked():
    # 1.0 and 0.9 are 0.1 apart <= 0.06 + 0.06; 0.5 is far below
    assert tie_groups({"a": 1.0, "b": 0.9, "c": 0.5}, {"a": 0.06, "b": 0.06, "c": 0.06}) == [["a", "b"], ["c"]]
    # nothing overlaps: every candidate alone, best first
    assert tie_groups({"a": 0.1, "b": 0.3, "c": 0.2}, {"a": 0.01, "b": 0.01, "c": 0.01}) == [["b"], ["c"], ["a"]]
    # equality counts as a tie (|s_i - s_j| <= e_i + e_j), also with zero errors and equal scores
    assert tie_groups({"a": 1.0, "b": 0.5}, {"a": 0.25, "b": 0.25}) == [["a", "b"]]
    assert tie_groups({"a": 0.5, "b": 0.5, "c": 0.4}, {"a": 0, "b": 0, "c": 0}) == [["a", "b"], ["c"]]
    # chaining: a~b and b~c, so one group although a and c alone are 0.2 > 0.1 apart
    assert tie_groups({"a": 1.0, "b": 0.9, "c": 0.8}, {"a": 0.05, "b": 0.05, "c": 0.05}) == [["a", "b", "c"]]
    # a wide interval ties non-neighbours: c (0.85 ± 0.2) reaches a (1.0) even though a and b are not tied;
    # chaining neighbours in score order only would split a from {b, c}
    assert tie_groups({"a": 1.0, "b": 0.9, "c": 0.85}, {"a": 0.0, "b": 0.0, "c": 0.2}) == [["a", "b", "c"]]
    # an unknown error (inf) ties with everything
    assert tie_groups({"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 0.0, "b": math.inf, "c": 0.0}) == [["a", "b", "c"]]
    assert tie_groups({}, {}) == []
    assert tie_groups({"a": -0.2}, {"a": 0.0}) == [["a"]]


def test_tie_labels_give_the_rank_span():
    scores = {"lite0": 0.30, "lite1": 0.2955, "lite2": 0.2940, "other": 0.10}
    errors = {"lite0": 0.002, "lite1": 0.001, "lite2": 0.001, "other": 0.002}
    # lite0 - lite1 = 0.0045 > 0.003: apart; lite1 - lite2 = 0.0015 <= 0.002: tied
    assert tie_groups(scores, errors) == [["lite0"], ["lite1", "lite2"], ["other"]]
    assert tie_labels(scores, errors) == {"lite0": "1", "lite1": "2-3", "lite2": "2-3", "other": "4"}


def test_tie_groups_refuse_bad_input():
    with pytest.raises(InputError, match="no precision error for b"):
        tie_groups({"a": 1.0, "b": 2.0}, {"a": 0.1})
    with pytest.raises(InputError, match="score of a"):
        tie_groups({"a": float("nan")}, {"a": 0.1})
    with pytest.raises(InputError, match=">= 0"):
        tie_groups({"a": 1.0}, {"a": -0.1})
    with pytest.raises(InputError, match=">= 0"):
        tie_groups({"a": 1.0}, {"a": float("nan")})


def _tied(s, e, i, j):  # the relation, as intervals [s - e, s + e] that touch
    return s[i] - e[i] <= s[j] + e[j] and s[j] - e[j] <= s[i] + e[i]


cases = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-5, 5, allow_nan=False, allow_infinity=False), min_size=n, max_size=n),
    st.lists(st.one_of(st.floats(0, 1, allow_nan=False), st.sampled_from([0.0, 0.5])), min_size=n, max_size=n)))


@settings(max_examples=300, deadline=None)
@given(cases)
def test_tie_groups_properties(case):
    vals, errs = case
    s = {f"m{i}": v for i, v in enumerate(vals)}
    e = {f"m{i}": v for i, v in enumerate(errs)}
    groups = tie_groups(s, e)
    flat = [k for g in groups for k in g]
    assert sorted(flat) == sorted(s) and len(flat) == len(s)  # a partition
    assert all(s[a] >= s[b] for a, b in zip(flat, flat[1:]))  # best first, groups are runs of the order
    gid = {k: i for i, g in enumerate(groups) for k in g}
    for a in s:
        for b in s:
            if gid[a] < gid[b]:  # different groups: not tied, and strictly ordered by score
                assert not _tied(s, e, a, b)
                assert s[a] - e[a] > s[b] + e[b] and s[a] > s[b]
    for g in groups:  # each group is connected by the relation
        seen, todo = {g[0]}, [g[0]]
        while todo:
            a = todo.pop()
            for b in g:
                if b not in seen and _tied(s, e, a, b):
                    seen.add(b)
                    todo.append(b)
        assert seen == set(g)
    labels = tie_labels(s, e)
    assert set(labels) == set(s)


# ------------------------------------------------------------------------------------------------ policy
def test_resolve_precision(monkeypatch):
    assert PRECISIONS[0] == "auto" and {"fp32", "bf16", "bf16-trunk", "bf16-mid"} <= set(PRECISIONS)
    with pytest.raises(InputError, match="precision='fp16'"):
        resolve_precision("fp16", "cpu")
    assert resolve_precision("fp32", "cpu") == "fp32"
    monkeypatch.setattr(P, "bf16_supported", lambda device: True)
    monkeypatch.setattr(P, "cpu_has_amx", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"          # avx512_bf16 without AMX: bf16 does not pay
    assert resolve_precision("bf16-trunk", "cpu") == "bf16-trunk"
    monkeypatch.setattr(P, "cpu_has_amx", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16-mid"
    assert resolve_precision("auto", "cuda") == "bf16-mid"
    monkeypatch.setattr(P, "bf16_supported", lambda device: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(InputError, match="needs bf16 support"):
        resolve_precision("bf16", "cpu")


def test_no_tf32_is_scoped_to_cuda_calls():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with P._no_tf32("cpu"):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with P._no_tf32("cuda"):  # only flips the flags: runs without a GPU
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError), P._no_tf32("cuda"):
            raise RuntimeError("restored on error too")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


# --------------------------------------------------------------------------------------------- structure
def _model(arch, **kw):
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **kw).eval()


@pytest.mark.parametrize("arch, kw, stage, block, stem", [
    ("efficientnet_lite0", {}, "blocks.6", "blocks.6.0", "blocks.2"),
    ("resnet18", {}, "layer4", "layer4.1", "layer2"),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 3}, "blocks.2", "blocks.2", None),  # stride 16
    ("mobilenetv3_small_100", {}, "blocks.5", "blocks.5.0", "blocks.1"),
    ("convnext_atto", {}, "stages.3", "stages.3", "stages.1"),
])
def test_find_tail_and_stem(arch, kw, stage, block, stem, one_thread):
    m = _model(arch, num_classes=10, **kw)
    assert find_tail(m)[0] == stage
    assert find_tail(m)[1] is m.get_submodule(stage)
    assert find_tail(m, "block")[0] == block
    assert find_tail(m, "head") is None
    got = find_stem_end(m)
    assert (got[0] if got else None) == stem


class _Bare(torch.nn.Module):
    """A model of unknown structure: forward_features/forward_head, no feature_info, no known attributes."""

    def __init__(self, direct_tail=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.body = torch.nn.Conv2d(8, 8, 3)
        self.fc = torch.nn.Linear(8, 4)
        self.direct_tail = direct_tail
        self.num_features, self.num_classes = 8, 4

    def forward_features(self, x):
        x = self.conv(x).relu()
        return (self.body.forward(x) if self.direct_tail else self.body(x)).relu()

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc


def _cand(module, num_classes=None):
    nc = module.num_classes if num_classes is None else num_classes
    return Candidate(spec="test", module=module, data_config={}, num_features=module.num_features,
                     num_classes=nc, identity="x", num_params=0)


def test_unknown_structure_falls_back_to_a_float32_head():
    m = _Bare().eval()
    assert find_tail(m) is None and find_stem_end(m) is None
    m.layers = torch.nn.ModuleList([m.body])  # an attribute the fallback knows
    assert find_tail(m)[0] == "layers.0"
    del m.layers
    if not P.bf16_supported("cpu"):
        return
    fwd = make_forward(_cand(m), "bf16-trunk")
    assert fwd.tail == "head" and fwd.tail_module is None
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        f, lg = fwd(x)
        f32, l32 = _cand(m).forward(x)
    assert f.dtype == lg.dtype == torch.float32 and f.shape == (2, 8) and lg.shape == (2, 4)
    assert torch.allclose(f, f32, rtol=0.05, atol=0.05)


@needs_bf16
def test_a_tail_not_called_through_call_warns_and_still_works():
    m = _Bare(direct_tail=True).eval()
    m.layers = torch.nn.ModuleList([m.conv, m.body])  # the tail is `body`, called as body.forward(x)
    fwd = make_forward(_cand(m), "bf16-trunk")
    assert fwd.tail == "layers.1"
    with torch.inference_mode(), pytest.warns(UserWarning, match="was not called through __call__"):
        f, _ = fwd(torch.randn(2, 3, 12, 12))
    assert fwd.tail_fired is False and f.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ forward
def test_fp32_equals_candidate_forward_exactly(one_thread):
    m = _model("resnet18", num_classes=10)
    cand = _cand(m)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        f0, l0 = cand.forward(x)
        f1, l1 = make_forward(cand, "fp32")(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast does not leak in
            f2, l2 = make_forward(cand, "fp32")(x)
    assert torch.equal(f0, f1) and torch.equal(l0, l1)
    assert torch.equal(f0, f2) and torch.equal(l0, l2)
    headless = _cand(m, num_classes=0)
    with torch.inference_mode():
        f3, l3 = make_forward(headless, "fp32")(x)
    assert l3 is None and torch.equal(f3, f0)


@needs_bf16
def test_bf16_equals_the_extractor_autocast(one_thread):
    m = _model("resnet18", num_classes=10)
    cand = _cand(m)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f0, l0 = cand.forward(x)
        f1, l1 = make_forward(cand, "bf16")(x)
    assert torch.equal(f0.float(), f1) and torch.equal(l0.float(), l1)


def _dtypes(m, names, fwd, x):
    """Output dtype of each named module during one call of ``fwd``."""
    got, hs = {}, []
    for n in names:
        hs.append(m.get_submodule(n).register_forward_hook(
            lambda mod, a, o, n=n: got.__setitem__(n, o.dtype)))
    try:
        with torch.inference_mode():
            fwd(x)
    finally:
        for h in hs:
            h.remove()
    return got


@needs_bf16
def test_split_policies_run_the_right_parts_in_float32(one_thread):
    m = _model("resnet18", num_classes=10)
    cand = _cand(m)
    x = torch.randn(2, 3, 64, 64)
    names = ["conv1", "layer2.1.conv2", "layer3.1.conv2", "layer4.0.conv1", "layer4.1.conv2", "fc"]
    f32, bf = torch.float32, torch.bfloat16
    assert _dtypes(m, names, make_forward(cand, "bf16"), x) == dict(zip(names, [bf, bf, bf, bf, bf, bf]))
    trunk = make_forward(cand, "bf16-trunk")
    assert _dtypes(m, names, trunk, x) == dict(zip(names, [bf, bf, bf, f32, f32, f32]))
    assert trunk.tail == "layer4" and trunk.tail_fired is True
    block = make_forward(cand, "bf16-trunk", tail="block")
    assert _dtypes(m, names, block, x) == dict(zip(names, [bf, bf, bf, bf, f32, f32]))
    mid = make_forward(cand, "bf16-mid")
    assert (mid.start, mid.tail) == ("layer2", "layer4")
    assert _dtypes(m, names, mid, x) == dict(zip(names, [f32, f32, bf, f32, f32, f32]))
    head = make_forward(cand, "bf16-trunk", tail="head")
    assert _dtypes(m, names, head, x) == dict(zip(names, [bf, bf, bf, bf, bf, f32]))
    # nothing is left behind: no hooks, autocast off again (and still on inside an outer region)
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())
    assert not torch.is_autocast_enabled("cpu")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        mid(x)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@needs_bf16
def test_a_failing_pass_leaves_no_hook_and_no_autocast(one_thread):
    m = _model("resnet18", num_classes=10)
    cand = _cand(m)

    def boom(mod, args):
        raise RuntimeError("boom")

    h = m.layer3.register_forward_pre_hook(boom)
    try:
        for p in ("bf16-trunk", "bf16-mid"):
            with torch.inference_mode(), pytest.raises(RuntimeError, match="boom"):
                make_forward(cand, p)(torch.randn(1, 3, 64, 64))
            assert not torch.is_autocast_enabled("cpu")
            assert list(m.layer4._forward_pre_hooks) == [] and list(m.layer2._forward_hooks) == []
    finally:
        h.remove()


def _errors(cand, x):
    with torch.inference_mode():
        ref, _ = make_forward(cand, "fp32")(x)
        out = {}
        for p in ("bf16", "bf16-trunk", "bf16-mid"):
            f, _ = make_forward(cand, p)(x)
            out[p] = (float((f - ref).norm() / ref.norm()), float((f - ref).abs().max()))
    return out


@needs_bf16
def test_split_policies_are_closer_to_fp32_than_full_bf16(one_thread):
    # random-init ResNet-18 at 64 px: the float32 tail removes the final bf16 roundings (about a quarter of
    # the relative error and a third of the max abs error here); bf16-mid removes more.
    cand = _cand(_model("resnet18", num_classes=10))
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    err = _errors(cand, x)
    for p in ("bf16-trunk", "bf16-mid"):
        assert err[p][0] < 0.9 * err["bf16"][0], err
        assert err[p][1] < err["bf16"][1], err
    assert err["bf16"][0] < 0.02  # and all of them are bf16-sized errors, not a broken pass


# -------------------------------------------------------------------------------------------- probe error
@needs_bf16
def test_probe_error(one_thread):
    cand = _cand(_model("resnet18", num_classes=10))
    g = torch.Generator().manual_seed(3)
    y = np.arange(48) % 3
    x = 0.5 * torch.randn(48, 3, 32, 32, generator=g)
    x[torch.arange(48), torch.as_tensor(y)] += 1.0
    zero = probe_error(cand, x, y, "fp32", metrics=("logme", "leep"))
    assert zero.diff == zero.error == {"logme": 0.0, "leep": 0.0}
    pe = probe_error(cand, x, y, "bf16", metrics=("logme", "leep"), batch_size=16)
    assert pe.precision == "bf16" and pe.rows == 48
    for m in ("logme", "leep"):
        assert set(pe.diffs[m]) == {"all", "first_half", "second_half"}
        assert pe.diffs[m]["all"] == pytest.approx(pe.score[m] - pe.score_fp32[m])
        assert pe.diff[m] == max(abs(v) for v in pe.diffs[m].values()) >= abs(pe.score[m] - pe.score_fp32[m]) - 1e-12
        assert pe.error[m] == pytest.approx(P.PROBE_SAFETY * pe.diff[m])
        assert np.isfinite(pe.diff[m]) and pe.diff[m] < 0.05
    # the rows the extractor already has in bf16 can be passed in: same answer without the bf16 pass
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        f, lg = cand.forward(x.contiguous(memory_format=torch.channels_last))
    again = probe_error(cand, x, y, "bf16", metrics=("logme", "leep"), low=(f.float().numpy(), lg.float().numpy()))
    assert again.score_fp32 == pytest.approx(pe.score_fp32, rel=1e-6, abs=1e-9)
    with pytest.raises(InputError, match="48 images but 47 labels"):
        probe_error(cand, x, y[:47], "bf16")
    headless = _cand(cand.module, num_classes=0)
    with pytest.raises(InputError, match="no classifier head"):
        probe_error(headless, x, y, "bf16", metrics=("leep",))


def test_probe_diffs_on_given_rows():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    f = rng.standard_normal((40, 6)) + np.eye(6)[y] * 2
    lg = rng.standard_normal((40, 5))
    same = P.probe_diffs(("logme", "leep"), (f, lg), (f, lg), y)
    assert same == {m: {"all": 0.0, "first_half": 0.0, "second_half": 0.0} for m in ("logme", "leep")}
    noisy = P.probe_diffs(("logme",), (f + 0.1 * rng.standard_normal(f.shape), None), (f, None), y)
    assert all(v != 0.0 for v in noisy["logme"].values())
    # a half with a single class cannot be scored: it is left out, the whole probe still is
    y2 = np.r_[np.zeros(20, int), np.arange(20) % 2]
    part = P.probe_diffs(("logme",), (f, None), (f, None), y2)
    assert set(part["logme"]) == {"all", "second_half"}
