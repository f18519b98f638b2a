"""viz: overlays keep the image where there are no cells and colour every instance."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from cellseg_lite import CellSegError, viz

matplotlib.use("Agg")


@pytest.fixture
def image_and_labels():
    image = np.zeros((40, 50), np.uint16)
    image[5:15, 5:15] = 4000
    image[20:35, 25:45] = 9000
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:15] = 1
    labels[20:35, 25:45] = 2
    return image, labels


def test_overlay_shape_dtype_and_background(image_and_labels):
    image, labels = image_and_labels
    out = viz.overlay(image, labels)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    shown = viz.display_image(image)
    background = labels == 0
    np.testing.assert_array_equal(out[background], shown[background])


def test_overlay_colours_each_instance_differently(image_and_labels):
    image, labels = image_and_labels
    out = viz.overlay(image, labels, alpha=1.0, contours=False)
    first = np.unique(out[labels == 1].reshape(-1, 3), axis=0)
    second = np.unique(out[labels == 2].reshape(-1, 3), axis=0)
    assert len(first) == 1 and len(second) == 1
    assert not np.array_equal(first, second)


def test_overlay_contours_drawn_on_the_inner_boundary(image_and_labels):
    image, labels = image_and_labels
    out = viz.overlay(image, labels, alpha=0.0, contour_color=(1.0, 0.0, 0.0))
    np.testing.assert_array_equal(out[5, 10], [255, 0, 0])  # top edge of cell 1
    assert not np.array_equal(out[10, 10], [255, 0, 0])  # its inside


def test_label_colors_are_reproducible():
    np.testing.assert_array_equal(viz.label_colors(5, seed=3), viz.label_colors(5, seed=3))
    assert viz.label_colors(5).shape == (5, 3)


def test_overlay_size_mismatch_is_a_cellseg_error(image_and_labels):
    image, labels = image_and_labels
    with pytest.raises(CellSegError, match="differ"):
        viz.overlay(image, labels[:30])


def test_overlay_rejects_bad_alpha(image_and_labels):
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(*image_and_labels, alpha=2.0)


def test_plots_draw(image_and_labels):
    import matplotlib.pyplot as plt

    image, labels = image_and_labels
    ax = viz.plot_instances(image, labels)
    assert ax.get_title() == "2 instances"
    ax = viz.plot_contours(image, labels, other=np.roll(labels, 2, axis=1), title="gt vs pred")
    assert ax.get_title() == "gt vs pred"
    fig = viz.plot_gallery([image, image, image], [labels] * 3, titles=["a", "b", "c"], ncols=2)
    assert len(fig.axes) == 4
    plt.close("all")


def test_gallery_needs_images():
    with pytest.raises(ValueError, match="at least one"):
        viz.plot_gallery([])
