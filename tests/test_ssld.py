"""SSLD pieces (issue 13): the skl / js / kl losses against scipy, top-k selection on hand-made score matrices,
dedup (exact hashes and near duplicates in a real teacher's embedding space), unlabelled pools."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from hubtune.errors import ConfigError, EmptyInputError, InputError
from hubtune.recipes.ssld import dedup_pool, select_top_k
from hubtune.tuning.losses.distillation import (DistillationLoss, JSDivergenceLoss, KLDivergenceLoss,
                                                SymmetricKLLoss)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- losses vs scipy
def _scipy_loss(kind, s, t, T):
    """The batch-mean loss of student logits s and teacher logits t (float64 numpy), from scipy alone."""
    q, p = softmax(s / T, axis=1), softmax(t / T, axis=1)  # student, teacher
    if kind == "kl":
        per = rel_entr(p, q).sum(1)
    elif kind == "skl":
        per = 0.5 * (rel_entr(q, p).sum(1) + rel_entr(p, q).sum(1))
    else:
        per = np.array([jensenshannon(qi, pi) ** 2 for qi, pi in zip(q, p)])
    return float(per.mean() * T * T)


LOSSES = {"kl": KLDivergenceLoss, "skl": SymmetricKLLoss, "js": JSDivergenceLoss}


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_loss_values_and_gradients_match_scipy(kind, T):
    rng = np.random.default_rng(hash((kind, T)) % 2**32)
    s, t = rng.normal(0, 2, (5, 7)), rng.normal(0, 2, (5, 7))
    ys = torch.tensor(s, requires_grad=True)
    loss = LOSSES[kind](T)(ys, torch.tensor(t))
    assert float(loss.detach()) == pytest.approx(_scipy_loss(kind, s, t, T), rel=1e-10, abs=1e-12)
    loss.backward()
    # the gradient w.r.t. the student's logits by central differences of the scipy value
    eps, num = 1e-6, np.zeros_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sp, sm = s.copy(), s.copy()
            sp[i, j] += eps
            sm[i, j] -= eps
            num[i, j] = (_scipy_loss(kind, sp, t, T) - _scipy_loss(kind, sm, t, T)) / (2 * eps)
    np.testing.assert_allclose(ys.grad.numpy(), num, rtol=1e-5, atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=6, max_size=6), st.lists(st.floats(-8, 8), min_size=6, max_size=6))
def test_skl_is_at_least_twice_js_and_zero_only_at_equality(a, b):
    """J(p, q) = KL(p||q) + KL(q||p) >= 4 JS(p, q), so skl = J/2 >= 2 js; both vanish when p = q."""
    s, t = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    skl, js = float(SymmetricKLLoss(1.0)(s, t)), float(JSDivergenceLoss(1.0)(s, t))
    assert skl >= 2 * js - 1e-12
    assert float(SymmetricKLLoss(1.0)(s, s)) == pytest.approx(0.0, abs=1e-12)
    assert float(SymmetricKLLoss(1.0)(s, t)) == pytest.approx(float(SymmetricKLLoss(1.0)(t, s)), rel=1e-9, abs=1e-12)


def test_distillation_loss_skl_and_label_free():
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    d = DistillationLoss("skl", temperature=2.0, alpha_hard=0.0, alpha_soft=1.0)
    out = d(s, t)
    assert float(out["hard"]) == 0.0 and float(out["total"]) == pytest.approx(_scipy_loss("skl", s.numpy(),
                                                                                           t.numpy(), 2.0))
    with pytest.raises(InputError, match="skl"):
        DistillationLoss("jsd")


def test_kd_use_labels_false_ignores_targets():
    import timm

    from hubtune.tuning.methods.kd import KnowledgeDistillation

    torch.manual_seed(0)
    mk = lambda: timm.create_model("test_resnet", num_classes=3,  # noqa: E731
                                   pretrained_cfg_overlay={"input_size": (3, 16, 16), "crop_pct": 1.0})
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    m = KnowledgeDistillation(mk(), mk(), kind="skl", alpha_hard=0.7, alpha_soft=0.3, use_labels=False)
    a = {k: v.detach() for k, v in m.losses({"input": x, "target": y}).items()}
    b = {k: v.detach() for k, v in m.losses({"input": x}).items()}
    assert float(a["hard"]) == 0.0 and float(a["total"]) == pytest.approx(0.3 * float(a["soft"]))
    assert float(a["total"]) == pytest.approx(float(b["total"]))
    m2 = KnowledgeDistillation(mk(), mk(), kind="skl", alpha_hard=0.7, alpha_soft=0.3)
    assert float(m2.losses({"input": x, "target": y})["hard"].detach()) > 0


# ---------------------------------------------------------------------------------------------- selection
def _sel(P, k, policy, cand="all"):
    r = select_top_k(np.asarray(P, dtype=float), k, policy, cand)
    return r["rows"].tolist(), r["labels"].tolist(), r["counts"].tolist(), r["classes"]


def test_selection_ties_are_broken_by_pool_index_under_each_policy():
    P = [[.5, .5], [.5, .5], [.5, .5]]
    # first: pairs in order (row 0, c0) (row 0, c1) (row 1, c0) ...: rows 0, 1 fill class 0, row 2 goes to class 1
    assert _sel(P, 2, "first")[:3] == ([0, 1, 2], [0, 0, 1], [2, 1])
    # all: both classes take rows 0 and 1 (the lower indices); each trained once under the lower class
    assert _sel(P, 2, "all") == ([0, 1], [0, 0], [2, 2], [[0, 1], [0, 1]])
    # drop: rows 0 and 1 are in both top-2s, so both go; nothing is topped up
    assert _sel(P, 2, "drop")[:3] == ([], [], [0, 0])


def test_selection_each_policy_on_a_hand_made_matrix():
    P = [[.90, .05, .05],   # 0: clearly class 0
         [.60, .35, .05],   # 1: class 0, also 2nd best for class 1
         [.10, .80, .10],   # 2: class 1
         [.40, .10, .50],   # 3: class 2, 2nd for class 0
         [.05, .15, .80],   # 4: class 2
         [.30, .40, .30]]   # 5: unsure
    # top-2 per class, independently: c0 {0 (.9), 1 (.6)}, c1 {2 (.8), 5 (.4)}, c2 {4 (.8), 3 (.5)}
    assert _sel(P, 2, "all") == ([0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 1], [2, 2, 2], [[0], [0], [1], [2], [2], [1]])
    assert _sel(P, 2, "drop")[:3] == ([0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 1], [2, 2, 2])
    # top-3: c0 {0, 1, 3}, c1 {2, 5, 1}, c2 {4, 3, 5}: rows 1, 3, 5 are claimed twice
    assert _sel(P, 3, "all") == ([0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 1], [3, 3, 3],
                                 [[0], [0, 1], [1], [0, 2], [2], [1, 2]])
    assert _sel(P, 3, "drop")[:3] == ([0, 2, 4], [0, 1, 2], [1, 1, 1])
    # first, greedy by score: .9 (0->c0) .8 (2->c1) .8 (4->c2) .6 (1->c0) .5 (3->c2) .4 (3,c0: taken; 5->c1)
    # .4 (c0 has 2 < 3, but rows left are none) -> every row once
    assert _sel(P, 3, "first")[:3] == ([0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 1], [2, 2, 2])
    # first with k=1: 0->c0, 2->c1, 4->c2 and then every class is full
    assert _sel(P, 1, "first")[:3] == ([0, 2, 4], [0, 1, 2], [1, 1, 1])


def test_selection_k_larger_than_a_class():
    P = [[.9, .1], [.2, .8], [.7, .3]]
    # predicted candidates: class 0 has rows {0, 2}, class 1 {1}; k = 5 takes each class whole, no top-up
    for policy in ("first", "all", "drop"):
        assert _sel(P, 5, policy, "predicted")[:3] == ([0, 1, 2], [0, 1, 0], [2, 1])
    # all candidates: each class takes all 3 rows; first hands each row to its best class
    assert _sel(P, 5, "first")[:3] == ([0, 1, 2], [0, 1, 0], [2, 1])
    assert _sel(P, 5, "all")[:3] == ([0, 1, 2], [0, 1, 0], [3, 3])
    assert _sel(P, 5, "drop")[:3] == ([], [], [0, 0])


def test_selection_skips_removed_rows_and_checks_arguments():
    P = np.array([[.9, .1], [np.nan, np.nan], [.8, .2]])
    assert _sel(P, 2, "all")[0] == [0, 2]
    with pytest.raises(ConfigError, match="multi_assign"):
        select_top_k(P, 1, "some")
    with pytest.raises(ConfigError, match="per_class"):
        select_top_k(P, 0)
    with pytest.raises(ConfigError, match="candidates"):
        select_top_k(P, 1, "first", "top")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(2, 5), st.integers(1, 12), st.integers(0, 10**6))
def test_selection_first_is_disjoint_and_fills_each_class(n, C, k, seed):
    P = softmax(np.random.default_rng(seed).normal(size=(n, C)), axis=1)
    r = select_top_k(P, k, "first")
    assert len(set(r["rows"].tolist())) == len(r["rows"])            # each image once
    assert r["counts"].sum() == len(r["rows"]) and (r["counts"] <= k).all()
    assert len(r["rows"]) == min(n, k * C)                            # a class only stops short when none are left
    # brute force: the greedy over all (row, class) pairs sorted by (-p, row, class)
    taken, cnt, want = set(), [0] * C, {}
    for p, i, c in sorted((-P[i, c], i, c) for i in range(n) for c in range(C)):
        if i not in taken and cnt[c] < k:
            taken.add(i)
            cnt[c] += 1
            want[i] = c
    assert dict(zip(r["rows"].tolist(), r["labels"].tolist())) == want


# ---------------------------------------------------------------------------------------------- dedup
def test_dedup_pool_reasons_on_hand_made_hashes_and_features():
    f_eval = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]], dtype=float)
    pool_h = ["e1", "L0", "p", "p", "x", "y"]
    f_pool = np.array([[0, 1, 0], [5, 5, 5], [1, 1, 1], [1, 1, 1], [2.0, 0.01, 0], [1, 1, 0]], dtype=float)
    r = dedup_pool(pool_h, ["e0", "e1", "e2", "e3"], ["L0"], f_pool, f_eval, threshold=0.99)
    reasons = {x["pool_index"]: (x["reason"], x["match"]) for x in r["removed"]}
    assert reasons == {0: ("exact-eval", 1), 1: ("exact-labeled", 0), 3: ("exact-pool", 2), 4: ("near-eval", 0)}
    assert r["keep"].tolist() == [False, False, True, False, False, True]
    # brute force: the centred cosine of row 4 with eval row 0
    c = f_eval.mean(0)
    a, b = f_pool[4] - c, f_eval[0] - c
    assert r["cosine"][4] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert r["counts"] == {"exact-eval": 1, "near-eval": 1, "exact-labeled": 1, "exact-pool": 1, "pool": 6,
                           "kept": 2, "removed": 4}
    assert dedup_pool(pool_h, [], [], threshold=None)["counts"]["removed"] == 1
    with pytest.raises(ConfigError, match="dedup_threshold"):
        dedup_pool(pool_h, threshold=1.5)


def _perturbed(img: np.ndarray, kind: str) -> np.ndarray:
    from PIL import Image

    a = img.astype(np.int16)
    if kind == "brightness":
        a = a + 2
    elif kind == "contrast":
        a = np.round(a * 1.01)
    elif kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=98)
        a = np.asarray(Image.open(buf)).astype(np.int16)
    return np.clip(a, 0, 255).astype(np.uint8)


def test_dedup_finds_every_planted_copy_in_the_teachers_embedding_space_and_keeps_distinct_images():
    """A real teacher (packaged EfficientNet-Lite0, 32 px): the pool holds 60 distinct training images and
    perturbed copies of 24 evaluation images (exact, +2 brightness, x1.01 contrast, JPEG q98); every copy is
    removed and matched to its original, every distinct image kept."""
    from hubtune.data import ArrayDataset, create_dataset
    from hubtune.data.pool import create_pool, image_hash
    from hubtune.data.transforms import transform_for
    from hubtune.recipes.ssld import _features
    from hubtune.tuning.teachers import load_teacher

    test, train = create_dataset("fashion-mnist", "test"), create_dataset("fashion-mnist", "train")
    ev = np.stack([np.asarray(test.image(i)) for i in range(60)])
    distinct = np.stack([np.asarray(train.image(i)) for i in range(60)])
    kinds = ("exact", "brightness", "contrast", "jpeg")
    planted = [(6 * j + q, kinds[q % 4]) for j in range(6) for q in range(4)]  # eval rows 0..23, 4 kinds
    copies = np.stack([_perturbed(ev[i], kind) for i, kind in planted])
    pool_imgs = np.concatenate([distinct[:30], copies, distinct[30:]])
    pool = create_pool(ArrayDataset("pool", pool_imgs, np.zeros(len(pool_imgs), dtype=np.int64)))
    eval_ds = ArrayDataset("eval", ev, np.zeros(60, dtype=np.int64))
    hm, cfg = load_teacher("pkg:efficientnet_lite0?input_size=32&crop_pct=1.0")
    t = transform_for(cfg)
    pf, ef = _features(hm.module, pool, t, 64, None), _features(hm.module, eval_ds, t, 64, None)
    r = dedup_pool([pool.content_hash(i) for i in range(len(pool))], [image_hash(eval_ds.image(i))
                                                                       for i in range(60)], [], pf, ef, 0.97)
    removed = {x["pool_index"]: x for x in r["removed"]}
    want = {30 + j: planted[j][0] for j in range(len(planted))}
    assert sorted(removed) == sorted(want)                       # all copies, and nothing else
    assert all(removed[p]["match"] == i for p, i in want.items())  # each matched to its original
    assert all(removed[30 + j]["reason"] == ("exact-eval" if kind == "exact" else "near-eval")
               for j, (_, kind) in enumerate(planted))


# ---------------------------------------------------------------------------------------------- pools
def test_pools_from_each_source(tmp_path):
    from PIL import Image

    from hubtune.data import ArrayDataset, create_dataset
    from hubtune.data.pool import SelectionDataset, create_pool, image_hash

    (tmp_path / "a" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 255, (8, 8), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(arrs[0]).save(tmp_path / "a" / "x.png")
    Image.fromarray(arrs[1]).save(tmp_path / "a" / "deep" / "y.png")
    Image.fromarray(arrs[2]).save(tmp_path / "z.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = create_pool(f"images:{tmp_path}")
    # files in sorted order of their paths: a/deep/y.png, a/x.png, z.bmp
    assert len(folder) == 3 and [np.asarray(folder.image(i)).tolist() for i in range(3)] == \
        [arrs[1].tolist(), arrs[0].tolist(), arrs[2].tolist()]
    assert create_pool(tmp_path).fingerprint == folder.fingerprint
    digits = create_pool("digits", split="test")
    assert len(digits) == len(create_dataset("digits", "test"))
    tds = [torch.rand(3, 8, 8) for _ in range(4)]
    tp = create_pool([(x, "ignored") for x in tds])
    assert len(tp) == 4 and tp.image(0).size == (8, 8)
    assert create_pool([(x, 1) for x in tds]).fingerprint == tp.fingerprint  # labels do not matter
    assert create_pool([(x, 1) for x in tds[::-1]]).fingerprint != tp.fingerprint
    assert tp.content_hash(1) == image_hash(tp.image(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError, match="no image files"):
        create_pool(f"images:{tmp_path / 'empty'}")
    with pytest.raises(InputError, match="unknown pool"):
        create_pool("no-such-dataset")
    lab = ArrayDataset("lab", np.stack(arrs[:2]), [0, 1])
    sel = SelectionDataset(lab, folder, [2, 0], [1, 0])
    assert len(sel) == 4 and sel.labels.tolist() == [0, 1, 1, 0]
    assert np.asarray(sel.image(2)).tolist() == arrs[2].tolist() and np.asarray(sel.image(3)).tolist() == \
        arrs[1].tolist() and np.asarray(sel.image(0)).tolist() == arrs[0].tolist()
    assert SelectionDataset(lab, folder, [0, 2], [1, 0]).fingerprint != sel.fingerprint
