"""viz: overlays keep the image where there are no cells and colour every instance; the pipeline
diagram; explorers draw a static figure, follow their sliders and keep their state in the book."""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pytest

from cellseg_lite import CellSegError, train, viz

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


def test_display_shows_what_the_networks_see():
    from cellseg_lite import io

    sparse = np.random.default_rng(0).integers(10, 16, (64, 64)).astype(np.uint16)
    sparse[30:33, 20:24] = 900  # one small bright cell: the rules differ here
    np.testing.assert_array_equal(
        viz.display_image(sparse), io.normalize_image(sparse, sparse_cells=True)
    )


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


# --------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("routing", ["paper", "code", "hover"])
def test_pipeline_names_the_stream_of_every_class(routing):
    import matplotlib.pyplot as plt

    fig = viz.plot_pipeline(routing=routing, examples=False)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    hover_classes = [c for c, stream in viz.ROUTES[routing].items() if stream == "HoVer"]
    assert f"ConvNeXt-HoVer\nfine-tuned on class {hover_classes[0]}" in texts
    assert f"({routing} routing)" in texts
    # a stream that serves no class gets no box
    assert ("ConvNeXt-StarDist" in texts) == ("StarDist" in viz.ROUTES[routing].values())
    plt.close(fig)


def test_pipeline_with_examples_draws_them():
    import matplotlib.pyplot as plt

    fig = viz.plot_pipeline()
    assert len(fig.axes) == 1 + 4 + 1  # the diagram, one image per class, the labels
    plt.close(fig)


def test_pipeline_routes_are_the_segmenters_routings():
    from cellseg_lite import infer

    names = {"stardist": "StarDist", "hover": "HoVer"}
    assert viz.ROUTES == {
        name: {c: names[stream] for c, stream in table.items()}
        for name, table in infer.ROUTINGS.items()
    }


def test_pipeline_rejects_unknown_routing():
    with pytest.raises(CellSegError, match="routing: expected one of 'paper', 'code'"):
        viz.plot_pipeline(routing="mine")


# --------------------------------------------------------------------------- explorers


@pytest.fixture(scope="module")
def tissue():
    from cellseg_lite import synthetic

    image, labels = synthetic.make_image(3, size=(128, 128), seed=2)
    return image, labels


def sliders_of(explorer):
    return {s.description: s for s in explorer.children[0].children}


def test_stardist_explorer_draws_first_then_follows_the_sliders(tissue):
    import matplotlib.pyplot as plt

    from cellseg_lite.streams import stardist

    image, labels = tissue
    prob, dist = stardist.targets(labels)
    plt.close("all")
    explorer = viz.explore_stardist(image, prob, dist, y_true=labels)
    assert len(plt.get_fignums()) == 1  # the static figure at the defaults
    sliders = sliders_of(explorer)
    assert (sliders["prob_thresh"].value, sliders["nms_thresh"].value) == (0.5, 0.4)
    first = viz.stardist_view(prob, dist, 0.5, 0.4, y_true=labels)
    assert explorer.children[1].value == first.summary()
    np.testing.assert_array_equal(first.labels, stardist.instances(prob, dist, 0.5, 0.4))
    sliders["prob_thresh"].value = 0.95  # only the cell centres remain candidates
    later = viz.stardist_view(prob, dist, 0.95, 0.4, y_true=labels)
    assert explorer.children[1].value == later.summary()
    assert len(plt.get_fignums()) == 1  # redraws close their figures
    plt.close("all")


def test_watershed_explorer_uses_the_preset_threshold(tissue):
    import matplotlib.pyplot as plt

    from cellseg_lite.streams import hover

    image, labels = tissue
    prob, hv = hover.targets(labels)
    explorer = viz.explore_watershed(image, prob, hv, y_true=labels, preset="hover_net")
    sliders = sliders_of(explorer)
    assert sliders["marker_threshold"].value == hover.PRESETS["hover_net"].marker_threshold
    assert sliders["marker_threshold"].max == 0.95  # a min-max energy lies in [0, 1]
    steps, result = viz.watershed_view(prob, hv, 0.6, 0.4, preset="hover_net", y_true=labels)
    assert explorer.children[1].value == result.summary()
    np.testing.assert_array_equal(steps.labels, hover.instances(prob, hv, preset="hover_net"))
    sliders["marker_threshold"].value = 0.05
    _, fewer = viz.watershed_view(prob, hv, 0.6, 0.05, preset="hover_net", y_true=labels)
    assert explorer.children[1].value == fewer.summary()
    plt.close("all")


def test_watershed_explorer_slides_the_markers_probability(tissue):
    import matplotlib.pyplot as plt

    from cellseg_lite.streams import hover

    image, labels = tissue
    prob, hv = hover.noisy_maps(*hover.targets(labels), blur=1.5, noise=0.1, seed=3)
    explorer = viz.explore_watershed(image, prob, hv, y_true=labels)
    slider = sliders_of(explorer)["marker_min_prob"]
    assert slider.value == hover.PRESETS["scaled"].marker_min_prob == 0.0
    assert slider.max >= max(train.HOVER_MARKER_PROBS)  # every value the tuning tries
    slider.value = 0.9
    steps, result = viz.watershed_view(prob, hv, 0.6, marker_min_prob=0.9, y_true=labels)
    assert explorer.children[1].value == result.summary()
    np.testing.assert_array_equal(steps.labels, hover.instances(prob, hv, marker_min_prob=0.9))
    assert not (steps.markers > 0)[prob < 0.9].any()
    default, _ = viz.watershed_view(prob, hv, 0.6, y_true=labels)
    assert (default.markers > 0)[prob < 0.9].any()  # the slider changed something
    plt.close("all")


def test_explorers_without_ipywidgets_draw_the_static_figure(tissue, monkeypatch):
    import matplotlib.pyplot as plt

    from cellseg_lite.streams import hover

    image, labels = tissue
    prob, hv = hover.targets(labels)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    plt.close("all")
    assert viz.explore_watershed(image, prob, hv) is None
    assert len(plt.get_fignums()) == 1
    plt.close("all")


def test_explorer_inputs_are_checked(tissue):
    from cellseg_lite.streams import stardist

    image, labels = tissue
    prob, dist = stardist.targets(labels)
    with pytest.raises(CellSegError, match="prob: image size"):
        viz.explore_stardist(image[:64], prob, dist)
    with pytest.raises(CellSegError, match="y_true: image size"):
        viz.explore_stardist(image, prob, dist, y_true=labels[:64])


# --------------------------------------------------------------------------- widgets in the book

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.mark.slow
def test_executed_explorer_keeps_its_widget_state_for_the_book(tmp_path, monkeypatch):
    """Execute a one-cell notebook as the book build does (nbclient, which stores widget state
    by default) and check what myst-nb needs to render the widget in static HTML: the view in
    the cell's output, its model in the notebook's widget state, the static figure before it;
    then render it with myst-nb and find both as the scripts the ipywidgets embedder reads."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must use the inline backend
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "from cellseg_lite import synthetic, viz\n"
            "from cellseg_lite.streams import stardist\n"
            "image, labels = synthetic.make_image(0, size=(64, 64), seed=0)\n"
            "viz.explore_stardist(image, *stardist.targets(labels), y_true=labels)"
        )
    )
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = nb.cells[0].outputs
    assert [o.output_type for o in outputs] == ["display_data", "execute_result"], outputs
    assert "image/png" in outputs[0].data  # the static figure, first
    view = outputs[1].data[WIDGET_VIEW]
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    assert view["model_id"] in state
    sliders = {
        m["state"]["description"]: m["state"]["value"]
        for m in state.values()
        if m["model_name"] == "FloatSliderModel"
    }
    assert sliders == {"prob_thresh": 0.5, "nms_thresh": 0.4}
    assert any(
        "F1" in str(m["state"].get("value"))
        for m in state.values()
        if m["model_name"] == "HTMLModel"
    )

    # the book's own renderer: Sphinx with myst-nb, as Jupyter Book 1 runs it, execution off
    pytest.importorskip("myst_nb", reason="myst-nb is not installed (install the [book] extra)")
    source = tmp_path / "site"
    source.mkdir()
    nbformat.write(nb, source / "index.ipynb")
    (source / "conf.py").write_text('extensions = ["myst_nb"]\nnb_execution_mode = "off"\n')
    subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-q", str(source), str(tmp_path / "html")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    page = (tmp_path / "html" / "index.html").read_text()
    assert f'<script type="{WIDGET_STATE}">' in page  # the models, with their initial values
    assert f'<script type="{WIDGET_VIEW}">' in page and view["model_id"] in page
    assert "html-manager" in page  # the ipywidgets embedder that draws them
