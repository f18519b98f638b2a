"""metrics: the challenge's F1 rule on literal cases, against stardist's matching, on folders."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from cellseg_lite import CellSegError, metrics, synthetic


def _boxes(shape, *boxes) -> np.ndarray:
    """A label image with cell ``k`` (1-based) filling ``boxes[k - 1] = (top, bottom, left, right)``."""
    labels = np.zeros(shape, np.int32)
    for k, (top, bottom, left, right) in enumerate(boxes, start=1):
        labels[top:bottom, left:right] = k
    return labels


def _counts(m: metrics.Matching) -> tuple[int, int, int, int, int]:
    return m.n_true, m.n_pred, m.tp, m.fp, m.fn


# --------------------------------------------------------------------------- literal cases


def test_perfect_match_with_other_ids():
    y_true = _boxes((40, 40), (5, 15, 5, 15), (20, 30, 5, 12), (8, 30, 20, 35))
    y_pred = np.choose(y_true, [0, 70, 3, 12])  # same cells, other ids
    m = metrics.match(y_true, y_pred)
    assert _counts(m) == (3, 3, 3, 0, 0)
    assert (m.precision, m.recall, m.f1, m.mean_matched_iou) == (1.0, 1.0, 1.0, 1.0)


def test_empty_prediction():
    y_true = _boxes((30, 30), (5, 15, 5, 15), (18, 25, 18, 25))
    m = metrics.match(y_true, np.zeros_like(y_true))
    assert _counts(m) == (2, 0, 0, 0, 2)
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)


def test_empty_ground_truth():
    y_pred = _boxes((30, 30), (5, 15, 5, 15))
    m = metrics.match(np.zeros_like(y_pred), y_pred)
    assert _counts(m) == (0, 1, 0, 1, 0)
    assert m.f1 == 0.0


def test_both_empty_scores_zero_like_the_challenge():
    empty = np.zeros((16, 16), np.uint16)
    m = metrics.match(empty, empty)
    assert _counts(m) == (0, 0, 0, 0, 0)
    assert (m.precision, m.recall, m.f1, m.mean_matched_iou) == (0.0, 0.0, 0.0, 0.0)
    assert metrics.f1_score(empty, empty) == 0.0


def test_split_cell():
    y_true = _boxes((30, 30), (5, 15, 5, 15))
    y_pred = _boxes((30, 30), (5, 15, 5, 11), (5, 15, 11, 15))  # IoU 0.6 and 0.4
    m = metrics.match(y_true, y_pred)
    assert _counts(m) == (1, 2, 1, 1, 0)
    assert m.f1 == pytest.approx(2 / 3, abs=1e-15)
    assert m.mean_matched_iou == pytest.approx(0.6, abs=1e-15)


def test_merged_pair():
    y_true = _boxes((30, 30), (5, 15, 5, 11), (5, 15, 11, 15))
    y_pred = _boxes((30, 30), (5, 15, 5, 15))
    m = metrics.match(y_true, y_pred)
    assert _counts(m) == (2, 1, 1, 0, 1)
    assert (m.precision, m.recall) == (1.0, 0.5)


@pytest.mark.parametrize(
    ("width", "expected_tp"),
    [(31, 1), (30, 1), (29, 0)],  # IoU 21/41 > 0.5, 20/40 = 0.5 (counts), 19/39 < 0.5
)
def test_shifted_cell_around_half(width, expected_tp):
    y_true = _boxes((20, 60), (5, 10, 5, 5 + width))
    y_pred = _boxes((20, 60), (5, 10, 15, 15 + width))  # shifted by 10 pixels
    m = metrics.match(y_true, y_pred)
    assert m.tp == expected_tp
    if expected_tp:
        assert m.mean_matched_iou == (width - 10) / (width + 10)


@pytest.mark.parametrize("transpose", [False, True])
def test_exact_half_ties_stay_one_to_one(transpose):
    # a cell cut into two exact halves (both IoU 0.5) and two exact halves merged:
    # each pair reaches the threshold, but a cell may be matched once only
    y_true = _boxes((40, 40), (4, 14, 4, 14), (20, 30, 4, 9), (20, 30, 9, 14), (4, 14, 20, 30))
    y_pred = _boxes((40, 40), (4, 14, 4, 9), (4, 14, 9, 14), (20, 30, 4, 14), (4, 14, 20, 30))
    if transpose:
        y_true, y_pred = y_true.T, y_pred.T
    m = metrics.match(y_true, y_pred)
    assert _counts(m) == (4, 4, 3, 1, 1)
    assert m.mean_matched_iou == pytest.approx((0.5 + 0.5 + 1.0) / 3, abs=1e-15)


def _low_threshold_puzzle() -> tuple[np.ndarray, np.ndarray]:
    """On a line: true [0, 20) and [20, 30), predicted [5, 25) and [0, 5).

    IoU(t1, p1) = 0.6 is the best pair, but taking it leaves t2 and p2 without a
    partner; at t = 0.15 the rule prefers two matches, t1-p2 (0.25) and t2-p1 (0.2).
    """
    y_true = _boxes((5, 40), (1, 4, 0, 20), (1, 4, 20, 30))
    y_pred = _boxes((5, 40), (1, 4, 5, 25), (1, 4, 0, 5))
    return y_true, y_pred


def test_low_threshold_maximises_matches_before_iou():
    y_true, y_pred = _low_threshold_puzzle()
    m = metrics.match(y_true, y_pred, 0.15, drop_boundary=False)
    assert m.tp == 2
    assert m.mean_matched_iou == pytest.approx(0.225, abs=1e-15)
    m = metrics.match(y_true, y_pred, 0.3, drop_boundary=False)
    assert m.tp == 1 and m.mean_matched_iou == pytest.approx(0.6, abs=1e-15)


def test_iou_exactly_at_threshold_counts():
    # IoU 14/20 = 0.7 exactly; the challenge computes IoU in float64 and counts it
    # (stardist's matching rounds IoU to float32, 0.69999999, and does not)
    y_true = _boxes((10, 40), (2, 7, 5, 22))
    y_pred = _boxes((10, 40), (2, 7, 8, 25))
    assert metrics.match(y_true, y_pred, 0.7).tp == 1
    assert metrics.match(y_true, y_pred, np.nextafter(0.7, 1)).tp == 0


def test_f1_score_is_a_float_and_matching_prints_compactly():
    y_true = _boxes((30, 30), (5, 15, 5, 15))
    y_pred = _boxes((30, 30), (5, 15, 5, 11), (5, 15, 11, 15))
    score = metrics.f1_score(y_true, y_pred)
    assert type(score) is float and score == metrics.match(y_true, y_pred).f1
    assert repr(metrics.match(y_true, y_pred)) == (
        "Matching(iou_threshold=0.5, n_true=1, n_pred=2, tp=1, fp=1, fn=0, precision=0.5000, "
        "recall=1.0000, f1=0.6667, mean_matched_iou=0.6000)"
    )


def test_labels_of_any_integer_type_and_huge_ids():
    y_true = _boxes((30, 30), (5, 15, 5, 15), (18, 25, 18, 25), (0, 4, 20, 24))
    y_pred = _boxes((30, 30), (6, 15, 5, 15), (18, 25, 19, 25), (0, 4, 20, 24))
    expected = metrics.match(y_true, y_pred)
    assert expected.n_true == 2  # the third cell touches the edge
    huge = np.where(y_true > 0, y_true + 2_000_000_000, 0)  # ids far above the pixel count
    assert metrics.match(huge, y_pred) == expected
    assert metrics.match(huge, y_pred, drop_boundary=False) == metrics.match(
        y_true, y_pred, drop_boundary=False
    )
    assert metrics.match(y_true.astype(np.uint8), y_pred.astype(np.float64)) == expected
    assert metrics.match(y_true > 0, y_pred > 0, drop_boundary=False).tp == 1  # one mask each


# --------------------------------------------------------------------------- boundary rule


@pytest.mark.parametrize("side", ["top", "bottom", "left", "right"])
@pytest.mark.parametrize(
    ("gap", "width", "removed"),
    [(0, 2, True), (1, 2, True), (2, 2, False), (3, 2, False), (2, 3, True), (3, 3, False)],
)
def test_boundary_cells_by_distance_to_the_edge(side, gap, width, removed):
    labels = np.zeros((20, 24), np.int32)
    labels[gap : gap + 4, 8:12] = 7  # ``gap`` background pixels between the cell and the top edge
    labels[10:14, 10:14] = 9  # always inside
    labels = {
        "top": labels,
        "bottom": labels[::-1],
        "left": labels.T,
        "right": labels.T[:, ::-1],
    }[side]
    out = metrics.remove_boundary_cells(labels, width)
    assert out.dtype == np.int32 and out.shape == labels.shape
    assert np.array_equal(out > 0, (labels == 9) | ((labels == 7) & (not removed)))
    assert set(np.unique(out)) == ({0, 1} if removed else {0, 1, 2})  # relabelled 1..n
    if width == metrics.BOUNDARY_WIDTH:
        assert metrics.match(labels, labels).n_true == (1 if removed else 2)


def test_boundary_removal_takes_every_piece_of_an_id():
    labels = np.zeros((20, 20), np.int32)
    labels[0:3, 5:8] = 4  # touches the edge
    labels[10:13, 10:13] = 4  # same id, away from the edge
    labels[5:8, 5:8] = 6
    out = metrics.remove_boundary_cells(labels)
    assert np.array_equal(out, np.where(labels == 6, 1, 0))


def test_boundary_width_zero_only_relabels():
    labels = _boxes((10, 10), (0, 3, 0, 3)) * 5
    assert np.array_equal(metrics.remove_boundary_cells(labels, 0), labels // 5)


def test_drop_boundary_is_removal_then_matching(rng):
    y_true = synthetic.voronoi_labels((96, 80), 40, rng)
    y_pred = _perturb(y_true, rng)
    for threshold in (0.3, 0.5):
        removed = metrics.match(
            metrics.remove_boundary_cells(y_true),
            metrics.remove_boundary_cells(y_pred),
            threshold,
            drop_boundary=False,
        )
        m = metrics.match(y_true, y_pred, threshold)
        assert m == removed
        assert m.n_true < metrics.match(y_true, y_pred, threshold, drop_boundary=False).n_true


# --------------------------------------------------------------------------- large images


@pytest.fixture
def small_tiles(monkeypatch):
    """Tile every image of 1,000 pixels or more into 20 x 20 tiles (the challenge: 25 MP, 2000)."""
    monkeypatch.setattr(metrics, "TILE_THRESHOLD_PIXELS", 1000)
    monkeypatch.setattr(metrics, "TILE_SIZE", 20)


def test_tiles_cut_cells_and_drop_tile_boundaries(small_tiles, monkeypatch):
    # 50 x 45 is padded to 60 x 60: 3 x 3 tiles; tile frames are 2 pixels wide
    y_true = _boxes(
        (50, 45),
        (5, 12, 5, 12),  # inside tile (0, 0): counted
        (5, 12, 15, 25),  # across the tile border at x = 20: both pieces touch a tile frame
        (44, 50, 44, 45),  # touches the image corner, but the tiles' frames lie in the padding
    )
    m = metrics.match(y_true, y_true)
    assert _counts(m) == (2, 2, 2, 0, 0)
    whole = metrics.match(y_true, y_true, drop_boundary=False)
    assert _counts(whole) == (4, 4, 4, 0, 0)  # the cut cell counts once per tile
    monkeypatch.setattr(metrics, "TILE_THRESHOLD_PIXELS", 50 * 45 + 1)  # now scored whole
    assert _counts(metrics.match(y_true, y_true)) == (2, 2, 2, 0, 0)  # cells 1 and 2; 3 on the edge
    assert _counts(metrics.match(y_true, y_true, drop_boundary=False)) == (3, 3, 3, 0, 0)


def test_tiled_counts_are_sums_over_padded_tiles(small_tiles, rng):
    y_true = synthetic.voronoi_labels((50, 45), 30, rng)
    y_pred = _perturb(y_true, rng)
    m = metrics.match(y_true, y_pred)
    padded_true, padded_pred = np.zeros((2, 60, 60), np.int32)
    padded_true[:50, :45], padded_pred[:50, :45] = y_true, y_pred
    sums = np.zeros(3, int)
    for top in range(0, 60, 20):
        for left in range(0, 60, 20):
            tile = np.s_[top : top + 20, left : left + 20]  # 400 pixels: not tiled again
            t = metrics.match(padded_true[tile], padded_pred[tile])
            sums += (t.n_true, t.n_pred, t.tp)
    assert (m.n_true, m.n_pred, m.tp) == tuple(sums)
    assert m.tp > 0 and m.f1 == 2 * m.tp / (m.n_true + m.n_pred)


# --------------------------------------------------------------------------- against stardist


def _perturb(labels, rng, *, max_shift=2) -> np.ndarray:
    """A plausible prediction: cells shifted, some split, merged, deleted, a few spurious; new ids."""
    n = int(labels.max())
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    dy, dx = rng.integers(-max_shift, max_shift + 1, (2, n + 1))
    out = np.zeros_like(labels)
    h, w = labels.shape
    out[np.clip(ys + dy[ids], 0, h - 1), np.clip(xs + dx[ids], 0, w - 1)] = ids
    ys, xs = np.nonzero(out)
    ids = out[ys, xs]
    centre = np.bincount(ids, xs, n + 1) / np.maximum(np.bincount(ids, minlength=n + 1), 1)
    split = (rng.random(n + 1) < 0.08)[ids] & (xs > centre[ids])
    out[ys[split], xs[split]] = n + ids[split]
    lookup = np.arange(2 * n + 4)
    a, b = out[:, :-1].ravel(), out[:, 1:].ravel()
    pairs = np.unique(np.stack([a, b], 1)[(a != b) & (a > 0) & (b > 0)], axis=0)
    merged = pairs[rng.random(len(pairs)) < 0.06]
    lookup[merged[:, 1]] = merged[:, 0]
    lookup[rng.random(lookup.size) < 0.05] = 0
    lookup[0] = 0
    out = lookup[out]
    for k in range(3):  # spurious cells where there was background
        top, left = rng.integers(0, (h - 6, w - 6))
        window = out[top : top + 6, left : left + 6]
        window[window == 0] = 2 * n + 1 + k
    ids = np.concatenate([[0], 5 + rng.permutation(2 * n + 3)])  # neither sequential nor sorted
    return ids[out].astype(np.int32)


def _float32_gap_pairs(y_true, y_pred, threshold) -> int:
    """Pairs whose float32 IoU (stardist) and float64 IoU (the challenge) fall on two sides of it."""
    _, _, _, _, iou = metrics._pair_table(y_true, y_pred, 0, y_true.shape)
    return int(np.count_nonzero((iou >= threshold) != (iou.astype(np.float32) >= threshold)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_stardist_matching(seed):
    from stardist.matching import matching

    rng = np.random.default_rng(seed)
    y_true = synthetic.voronoi_labels((128, 160), 90, rng)
    y_pred = _perturb(y_true, rng)
    for threshold in (0.3, 0.5, 0.7, 0.9):
        assert _float32_gap_pairs(y_true, y_pred, threshold) == 0, "pick another seed"
        ours = metrics.match(y_true, y_pred, threshold, drop_boundary=False)
        theirs = matching(y_true, y_pred, thresh=threshold)
        assert (ours.n_true, ours.n_pred, ours.tp, ours.fp, ours.fn) == (
            theirs.n_true,
            theirs.n_pred,
            theirs.tp,
            theirs.fp,
            theirs.fn,
        )
        assert abs(ours.f1 - theirs.f1) <= 1e-9
        assert abs(ours.precision - theirs.precision) <= 1e-9
        assert abs(ours.recall - theirs.recall) <= 1e-9
        # stardist sums float32 IoUs
        assert abs(ours.mean_matched_iou - theirs.mean_matched_score) <= 1e-6
        if threshold == 0.5:
            assert 0 < ours.tp < ours.n_true  # the data are neither trivial nor hopeless


def test_agrees_with_stardist_on_the_low_threshold_puzzle():
    from stardist.matching import matching

    y_true, y_pred = _low_threshold_puzzle()
    ours = metrics.match(y_true, y_pred, 0.15, drop_boundary=False)
    theirs = matching(y_true, y_pred, thresh=0.15)
    assert (ours.tp, ours.f1) == (theirs.tp, theirs.f1)


# --------------------------------------------------------------------------- time tolerance


@pytest.mark.parametrize(
    ("height", "width", "seconds"),
    [
        (1, 1, 10.0),
        (256, 256, 10.0),
        (1000, 1000, 10.0),
        (1000, 1001, 10.01),
        (2000, 3000, 60.0),
        (10496, 8415, 883.2384),  # the largest tuning image (paper: 883 s)
    ],
)
def test_time_tolerance(height, width, seconds):
    assert metrics.time_tolerance(height, width) == pytest.approx(seconds, rel=1e-12)


# --------------------------------------------------------------------------- kinds of error


def _kinds(k: metrics.ErrorKinds) -> dict[str, int]:
    return {name: getattr(k, name) for name in metrics.ErrorKinds._fields[1:] if getattr(k, name)}


def test_error_kinds_of_each_kind():
    y_true = _boxes(
        (60, 60),
        (5, 15, 5, 15),  # 1: matched
        (5, 15, 20, 30),  # 2, 3: two touching cells read as one
        (5, 15, 30, 40),
        (20, 30, 5, 15),  # 4: cut in three
        (20, 30, 25, 35),  # 5: not found
        (40, 50, 5, 15),  # 6: found with an outline three times too large
    )
    y_pred = _boxes(
        (60, 60),
        (5, 15, 6, 15),
        (5, 15, 19, 41),
        (20, 30, 5, 8),
        (20, 30, 8, 11),
        (20, 30, 11, 15),
        (38, 52, 3, 25),
        (40, 45, 45, 50),  # debris
    )
    k = metrics.error_kinds(y_true, y_pred)
    assert _kinds(k) == {
        "tp": 1,
        "missed": 1,
        "split": 1,
        "merged": 2,
        "outline": 1,
        "merger": 1,
        "on_cell": 4,  # the three pieces and the large outline
        "background": 1,
    }
    m = metrics.match(y_true, y_pred)
    assert (k.tp, k.fn, k.fp) == (m.tp, m.fn, m.fp)


def test_error_kinds_of_a_cell_the_frame_removed_from_the_truth():
    # the true cell touches the frame and leaves the truth; its prediction stops 3 px short
    y_true = _boxes((30, 30), (0, 10, 5, 15))
    y_pred = _boxes((30, 30), (3, 10, 5, 15))
    assert _kinds(metrics.error_kinds(y_true, y_pred)) == {"background": 1}
    assert _kinds(metrics.error_kinds(y_true, y_pred, drop_boundary=False)) == {"tp": 1}


def test_error_kinds_of_empty_images():
    empty = np.zeros((20, 20), np.int32)
    cell = _boxes((20, 20), (5, 10, 5, 10))
    assert _kinds(metrics.error_kinds(empty, empty)) == {}
    assert _kinds(metrics.error_kinds(cell, empty)) == {"missed": 1}
    assert _kinds(metrics.error_kinds(empty, cell)) == {"background": 1}
    assert metrics.error_kinds(empty, empty).f1 == metrics.f1_score(empty, empty) == 0.0


def test_error_kinds_follow_the_assignment_at_exact_ties():
    # the exact halves of test_exact_half_ties_stay_one_to_one: one half of each tie is matched,
    # the other is the error
    y_true = _boxes((40, 40), (4, 14, 4, 14), (20, 30, 4, 9), (20, 30, 9, 14), (4, 14, 20, 30))
    y_pred = _boxes((40, 40), (4, 14, 4, 9), (4, 14, 9, 14), (20, 30, 4, 14), (4, 14, 20, 30))
    k = metrics.error_kinds(y_true, y_pred)
    assert (k.tp, k.fn, k.fp) == (3, 1, 1)
    assert _kinds(k) == {"tp": 3, "merged": 1, "on_cell": 1}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_kinds_add_up_to_the_challenge_counts(seed):
    rng = np.random.default_rng(seed)
    y_true = synthetic.voronoi_labels((128, 160), 90, rng)
    y_pred = _perturb(y_true, rng)
    for threshold in (0.3, 0.5, 0.7):
        for drop_boundary in (True, False):
            k = metrics.error_kinds(y_true, y_pred, threshold, drop_boundary=drop_boundary)
            m = metrics.match(y_true, y_pred, threshold, drop_boundary=drop_boundary)
            assert (k.tp, k.fn, k.fp) == (m.tp, m.fn, m.fp)
            assert k.iou_threshold == threshold
            assert k.f1 == m.f1
    # _perturb splits, merges, deletes and adds cells: every kind shows up at 0.5
    k = metrics.error_kinds(y_true, y_pred)
    assert k.missed and k.split and k.merged and k.merger and k.on_cell and k.background


def test_error_kinds_of_a_tiled_image_are_sums_over_tiles(small_tiles, rng):
    y_true = synthetic.voronoi_labels((50, 45), 30, rng)
    y_pred = _perturb(y_true, rng)
    k = metrics.error_kinds(y_true, y_pred)
    m = metrics.match(y_true, y_pred)
    assert (k.tp, k.fn, k.fp) == (m.tp, m.fn, m.fp)
    padded_true, padded_pred = np.zeros((2, 60, 60), np.int32)
    padded_true[:50, :45], padded_pred[:50, :45] = y_true, y_pred
    sums = np.zeros(len(metrics.ErrorKinds._fields) - 1, int)
    for top in range(0, 60, 20):
        for left in range(0, 60, 20):
            tile = np.s_[top : top + 20, left : left + 20]
            sums += metrics.error_kinds(padded_true[tile], padded_pred[tile])[1:]
    assert tuple(k)[1:] == tuple(sums)


def test_error_kinds_refuse_bad_input():
    with pytest.raises(CellSegError, match=r"y_pred: shape \(8, 9\) differs"):
        metrics.error_kinds(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(CellSegError, match="iou_threshold"):
        metrics.error_kinds(np.zeros((8, 8)), np.zeros((8, 8)), 1.5)


# --------------------------------------------------------------------------- folders


def _write(path, labels):
    tifffile.imwrite(path, np.asarray(labels).astype(np.uint16), compression="zlib")


@pytest.fixture
def folders(tmp_path, rng):
    gt_dir, pred_dir = tmp_path / "labels", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    pairs = {}
    for stem in ("cell_00001", "cell_00002", "cell_00003"):
        y_true = synthetic.voronoi_labels((64, 72), 25, rng)
        pairs[stem] = (y_true, _perturb(y_true, rng))
        _write(gt_dir / f"{stem}_label.tiff", y_true)
    _write(pred_dir / "cell_00001_label.tiff", pairs["cell_00001"][1])
    _write(pred_dir / "cell_00003_label.tif", pairs["cell_00003"][1])
    (gt_dir / "notes.txt").write_text("not a label file")
    return gt_dir, pred_dir, pairs


def test_evaluate_folder_lists_predictions_with_no_ground_truth_and_leaves_them_out(folders):
    gt_dir, pred_dir, pairs = folders
    before = metrics.evaluate_folder(gt_dir, pred_dir)
    assert before.unscored == ()
    _write(pred_dir / "cell_2_label.tiff", pairs["cell_00002"][1])  # a name that does not match
    report = metrics.evaluate_folder(gt_dir, pred_dir)
    assert report.unscored == ("cell_2",) and report.missing == ("cell_00002",)
    assert report.rows == before.rows and report.mean_f1 == before.mean_f1
    assert report.report().splitlines()[-1] == (
        "1 predictions with no ground truth, not scored: cell_2"
    )


def test_evaluate_folder_with_missing_prediction_and_csv(folders, tmp_path):
    gt_dir, pred_dir, pairs = folders
    out = tmp_path / "report" / "scores.csv"
    report = metrics.evaluate_folder(gt_dir, pred_dir, out)
    assert report.n_images == 3 and report.missing == ("cell_00002",)
    assert [row.stem for row in report.rows] == ["cell_00001", "cell_00002", "cell_00003"]
    expected = {
        stem: metrics.match(y_true, y_pred if stem != "cell_00002" else 0 * y_true)
        for stem, (y_true, y_pred) in pairs.items()
    }
    for row in report.rows:
        assert tuple(row[1:]) == tuple(expected[row.stem][1:9])
    assert report.rows[1].f1 == 0.0 and report.rows[1].fn == report.rows[1].n_true > 0
    assert report.mean_f1 == pytest.approx(sum(m.f1 for m in expected.values()) / 3, abs=1e-15)
    assert report.mean_precision == pytest.approx(sum(m.precision for m in expected.values()) / 3)
    assert report.mean_recall == pytest.approx(sum(m.recall for m in expected.values()) / 3)
    assert "missing=('cell_00002',)" in repr(report)
    assert report.report().splitlines() == [
        f"3 images, IoU >= 0.5: mean F1 {report.mean_f1:.4f} (mean precision "
        f"{report.mean_precision:.4f}, mean recall {report.mean_recall:.4f})",
        "1 missing predictions, scored 0: cell_00002",
    ]

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "stem",
        "n_true",
        "n_pred",
        "tp",
        "fp",
        "fn",
        "precision",
        "recall",
        "f1",
    ]
    assert [r["stem"] for r in rows] == ["cell_00001", "cell_00002", "cell_00003"]
    assert [float(r["f1"]) for r in rows] == [row.f1 for row in report.rows]
    assert [int(r["tp"]) for r in rows] == [row.tp for row in report.rows]
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.csv"]  # no temporary left

    strict = metrics.evaluate_folder(gt_dir, pred_dir, iou_threshold=0.9, drop_boundary=False)
    assert strict.rows[0].tp <= report.rows[0].tp and strict.rows[0].n_true >= report.rows[0].n_true


def test_evaluate_folder_sorts_errors_by_kind_when_asked(folders):
    gt_dir, pred_dir, pairs = folders
    assert metrics.evaluate_folder(gt_dir, pred_dir).kinds is None
    report = metrics.evaluate_folder(gt_dir, pred_dir, iou_threshold=0.7, kinds=True)
    sums = np.zeros(len(metrics.ErrorKinds._fields) - 1, int)
    for stem, (y_true, y_pred) in pairs.items():
        y_pred = y_pred if stem != "cell_00002" else 0 * y_true  # the missing one: empty
        sums += metrics.error_kinds(y_true, y_pred, 0.7)[1:]
    assert report.kinds == metrics.ErrorKinds(0.7, *sums)
    assert report.kinds.tp == sum(row.tp for row in report.rows)
    assert report.kinds.fn == sum(row.fn for row in report.rows)
    assert report.kinds.fp == sum(row.fp for row in report.rows)
    # the rows are those of an evaluation without kinds
    assert report.rows == metrics.evaluate_folder(gt_dir, pred_dir, iou_threshold=0.7).rows
    k = report.kinds
    assert report.report().splitlines()[-2:] == [
        f"true cells not matched: {k.fn} of {k.tp + k.fn} (missed {k.missed}, split {k.split}, "
        f"merged {k.merged}, outline {k.outline})",
        f"predicted cells not matched: {k.fp} of {k.tp + k.fp} (merger {k.merger}, on_cell "
        f"{k.on_cell}, background {k.background})",
    ]


def test_evaluate_folder_errors(folders, tmp_path):
    gt_dir, pred_dir, _ = folders
    with pytest.raises(CellSegError, match="nowhere.*not a folder"):
        metrics.evaluate_folder(tmp_path / "nowhere", pred_dir)
    with pytest.raises(CellSegError, match="nothing.*not a folder"):
        metrics.evaluate_folder(gt_dir, tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CellSegError, match="empty.*no ground-truth label files"):
        metrics.evaluate_folder(empty, pred_dir)
    (tmp_path / "report").mkdir()
    with pytest.raises(CellSegError, match="report.*is a folder"):
        metrics.evaluate_folder(gt_dir, pred_dir, tmp_path / "report")
    with pytest.raises(CellSegError, match="iou_threshold"):
        metrics.evaluate_folder(gt_dir, pred_dir, iou_threshold=0)
    _write(pred_dir / "cell_00002_label.tiff", np.zeros((64, 70)))
    with pytest.raises(
        CellSegError, match=r"cell_00002_label\.tiff.*\(64, 70\) differs.*\(64, 72\)"
    ):
        metrics.evaluate_folder(gt_dir, pred_dir)
    _write(pred_dir / "cell_00002_label.tiff", np.zeros((64, 72)))
    _write(gt_dir / "cell_00001_label.tif", np.zeros((64, 72)))
    with pytest.raises(CellSegError, match="cell_00001_label.tiff.*second label file.*cell_00001"):
        metrics.evaluate_folder(gt_dir, pred_dir)


def test_evaluate_folder_reports_an_unreadable_prediction(folders):
    gt_dir, pred_dir, _ = folders
    (pred_dir / "cell_00001_label.tiff").write_bytes(b"not a tiff")
    with pytest.raises(CellSegError, match="cell_00001_label.tiff"):
        metrics.evaluate_folder(gt_dir, pred_dir)


@pytest.mark.realdata
def test_real_labels_score_one_against_themselves(real_mini, real_manifest):
    labels = real_mini / "labels"
    report = metrics.evaluate_folder(labels, labels, drop_boundary=False)
    assert report.n_images == len(real_manifest) and report.missing == ()
    cells = {row["stem"]: int(row["cells"]) for row in real_manifest}
    for row in report.rows:
        assert row.n_true == row.n_pred == row.tp == cells[row.stem]
        assert row.f1 == (1.0 if row.tp else 0.0)
    with_rule = metrics.evaluate_folder(labels, labels)
    assert all(row.tp == row.n_true <= cells[row.stem] for row in with_rule.rows)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [
        (-np.ones((8, 8)), np.zeros((8, 8)), "y_true: labels must be >= 0"),
        (np.zeros((8, 8)), np.full((8, 8), 0.5), "y_pred: labels must be integers"),
        (np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), r"y_true: labels must be a 2-D \(H, W\)"),
        (
            np.zeros((8, 8)),
            np.zeros((8, 9)),
            r"y_pred: shape \(8, 9\) differs from y_true shape \(8, 8\)",
        ),
    ],
)
def test_match_refuses_bad_labels(y_true, y_pred, message):
    with pytest.raises(CellSegError, match=message):
        metrics.match(y_true, y_pred)


def test_f1_score_names_its_own_arguments():
    with pytest.raises(CellSegError, match=r"pred: shape \(8, 9\) differs from gt shape"):
        metrics.f1_score(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(CellSegError, match="gt: labels must be >= 0"):
        metrics.f1_score(-np.ones((8, 8)), np.zeros((8, 8)))


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5, float("nan"), "0.5", True, None])
def test_match_refuses_bad_thresholds(threshold):
    with pytest.raises(CellSegError, match="iou_threshold"):
        metrics.match(np.zeros((8, 8)), np.zeros((8, 8)), threshold)


@pytest.mark.parametrize(
    ("width", "message"), [(-1, "width: must be >= 0"), (1.5, "width: expected an integer")]
)
def test_remove_boundary_cells_refuses_bad_width(width, message):
    with pytest.raises(CellSegError, match=message):
        metrics.remove_boundary_cells(np.zeros((8, 8)), width)


def test_remove_boundary_cells_refuses_bad_labels():
    with pytest.raises(CellSegError, match="labels: labels must be >= 0"):
        metrics.remove_boundary_cells(-np.ones((8, 8)))


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (0, 10, "height: must be >= 1"),
        (10, -3, "width: must be >= 1"),
        (10.0, 10, "height: expected an integer"),
        (10, True, "width: expected an integer"),
    ],
)
def test_time_tolerance_refuses_bad_sizes(height, width, message):
    with pytest.raises(CellSegError, match=message):
        metrics.time_tolerance(height, width)


# --------------------------------------------------------------------------- a segmenter on images


def _scored(segment, n=3):
    from cellseg_lite import synthetic

    images = []
    for c in range(n):
        image, labels = synthetic.make_image(c % 4, size=(128, 128), seed=c)
        images.append((f"img{c}", image, labels))
    return metrics.evaluate_segmenter(segment, images, categories=[c % 4 for c in range(n)])


def test_evaluate_segmenter_scores_and_times_each_image():
    from cellseg_lite import synthetic

    truth = {}

    def perfect(image):
        for c in range(4):
            for seed in range(3):
                candidate, labels = synthetic.make_image(c, size=(128, 128), seed=seed)
                if np.array_equal(candidate, image):
                    truth[seed] = labels
                    return labels
        raise AssertionError("unknown image")

    rows = _scored(perfect)
    assert [r.stem for r in rows] == ["img0", "img1", "img2"]
    assert [r.category for r in rows] == [0, 1, 2]
    assert all(r.f1 == 1.0 and r.n_true == r.n_pred for r in rows)
    assert all(r.seconds >= 0 and r.tolerance == 10.0 and r.over_time == 0.0 for r in rows)
    empty = _scored(lambda image: np.zeros(image.shape[:2], np.int32))
    assert all(r.f1 == 0.0 and r.n_pred == 0 for r in empty)


def test_evaluate_segmenter_checks_its_inputs():
    with pytest.raises(CellSegError, match="segment: expected a callable"):
        metrics.evaluate_segmenter("model.pt", [])
    with pytest.raises(CellSegError, match="2 classes for 1 images"):
        metrics.evaluate_segmenter(
            lambda x: x, [("a", np.zeros((4, 4)), np.zeros((4, 4)))], categories=[0, 1]
        )
    with pytest.raises(CellSegError, match="img0 prediction"):
        _scored(lambda image: np.zeros((5, 5), np.int32), n=1)


def test_class_and_timing_tables_have_the_papers_shape():
    row = metrics.SegmenterScore
    results = {
        "stream A": [
            row("a", 0, 100, 100, 5, 5, 1.0, 0.5, 10.0),
            row("b", 3, 2000, 1000, 5, 4, 0.5, 30.0, 20.0),
        ],
        "stream B": [
            row("a", 0, 100, 100, 5, 5, 0.0, 0.5, 10.0),
            row("b", 3, 2000, 1000, 5, 4, 1.0, 1.0, 20.0),
        ],
    }
    table = metrics.class_table(results)
    lines = table.splitlines()
    assert (
        lines[0]
        == "| method | class 0 (one-channel) | class 3 (colour, small cells) | all images |"
    )
    assert lines[2] == "| images | 1 | 1 | 2 |"
    assert lines[3] == "| stream A | 1.0000 | 0.5000 | 0.7500 |"
    assert lines[4] == "| stream B | 0.0000 | 1.0000 | 0.5000 |"
    timing = metrics.timing_table(results["stream A"]).splitlines()
    assert timing[2] == "| b | 2000 x 1000 | 30.00 | 20 | 10.00 |"  # the largest image first
    assert timing[-1] == "| all 2 images | | 30.50 | | 10.00 |"
