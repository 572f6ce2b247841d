"""Pictures are produced, open as PNGs of the expected size, and are not blank; the trained length is marked."""

from __future__ import annotations

import numpy as np
from PIL import Image

from condensation.evaluate import (
    PasskeyGrid,
    passkey_table_html,
    plot_passkey_heatmap,
    plot_passkey_matrix,
    plot_rouge_by_length,
    plot_stage_summary,
    rouge_by_length,
)


def toy_grid(**meta) -> PasskeyGrid:
    lengths, depths = [2048, 4096, 8192, 16384], [0.0, 0.25, 0.5, 0.75, 1.0]
    exact = np.array([[1, 1, 1, 1, 1], [1, 0.9, 0.8, 1, 1], [0.5, 0.4, 0.2, 0.6, 0.9], [0, 0.1, 0, 0, 0.3]])
    digit = np.clip(exact + 0.2, 0, 1)
    return PasskeyGrid(lengths, depths, exact, digit, np.full(exact.shape, 10), meta=meta)


def open_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_heatmap(tmp_path):
    grid = toy_grid()
    p = plot_passkey_heatmap(grid, tmp_path / "sub" / "heat.png", trained_length=4096)
    img = open_png(p)
    # 4 panels in one row: (3.6 * 4 + 0.9) x (2.9 + 0.6) inches at 100 dpi
    assert img.shape == (350, 1530, 3)
    assert p.stat().st_size > 20_000
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)
    assert red.sum() > 300  # the trained panel's frame / dashed lines
    unmarked = open_png(plot_passkey_heatmap(grid, tmp_path / "plain.png"))
    red_plain = (unmarked[..., 0] > 200) & (unmarked[..., 1] < 60) & (unmarked[..., 2] < 60)
    assert red.sum() > red_plain.sum() + 300
    # trained length taken from the grid's meta when not given
    assert np.array_equal(open_png(plot_passkey_heatmap(toy_grid(trained_length=4096), tmp_path / "m.png")), img)


def test_one_panel_and_empty_cells(tmp_path):
    grid = PasskeyGrid([256], [0.5], [[0.0]], [[0.0]], [[0]])
    img = open_png(plot_passkey_heatmap(grid, tmp_path / "one.png"))
    assert img.shape == (350, 450, 3)


def test_matrix_stage_summary_and_html(tmp_path):
    grid = toy_grid(trained_length=2048)
    assert open_png(plot_passkey_matrix(grid, tmp_path / "matrix.png")).shape[0] > 100
    stages = {"2K": toy_grid(trained_length=2048), "4K": toy_grid(trained_length=4096)}
    assert open_png(plot_stage_summary(stages, tmp_path / "stages.png")).shape[1] > 200
    html = passkey_table_html(grid)
    assert html.count("<tr>") == 5 and "background:" in html and "16K" in html


def test_rouge_bars(tmp_path):
    res = rouge_by_length(["a b c", "a b x", "q r s"], ["a b c", "a b c", "a b c"], [10, 600, 2000])
    other = rouge_by_length(["a b c"] * 3, ["a b c"] * 3, [10, 600, 2000])
    img = open_png(plot_rouge_by_length({"condensation": res, "llama": other}, tmp_path / "rouge.png"))
    assert img.shape == (380, 1260, 3) and len(np.unique(img.reshape(-1, 3), axis=0)) > 20
    from condensation.evaluate import plot_rouge_overall

    fig9 = open_png(plot_rouge_overall({"condensation": res, "llama": other}, tmp_path / "fig9.png", title="toy"))
    assert fig9.shape[0] == 380 and len(np.unique(fig9.reshape(-1, 3), axis=0)) > 20


def test_heatmap_title_is_the_trained_lengths_accuracy():
    from condensation.evaluate.plots import heatmap_title

    title = heatmap_title(toy_grid(trained_length=4096))
    # the 4K row's mean (what a curriculum prints for the stage), not the grid's 0.64; the grid mean is labelled
    assert "at 4K tokens (trained): exact 0.94, per digit 1.00" in title
    assert f"mean over all 4 lengths: exact {toy_grid().mean_exact:.2f}" in title
    assert heatmap_title(toy_grid()).endswith("(mean over the grid)")
    assert heatmap_title(toy_grid(trained_length=300)).endswith("(mean over the grid)")  # not in the grid


def test_zero_accuracy_is_drawn(tmp_path):
    """A cell at 0 shows as a dark-red marker on the axis (a bar of height 0 drew nothing)."""
    def dark_red(acc: float) -> int:
        g = PasskeyGrid([96, 192], [0.0, 0.5, 1.0], np.full((2, 3), acc), np.full((2, 3), acc), np.full((2, 3), 10))
        img = open_png(plot_passkey_heatmap(g, tmp_path / f"h{acc}.png", trained_length=96)).astype(int)
        return int(((abs(img[..., 0] - 165) < 20) & (img[..., 1] < 30) & (abs(img[..., 2] - 38) < 25)).sum())

    assert dark_red(0.0) > dark_red(1.0) + 100  # 6 markers; the colour bar's red end is in both


def test_text_contrast():
    from matplotlib import colormaps

    from condensation.evaluate.plots import CMAP, text_colour

    cmap = colormaps[CMAP]
    assert text_colour(cmap(0.0)) == "white" and text_colour(cmap(0.5)) == "black"
    html = passkey_table_html(PasskeyGrid([96], [0.0, 1.0], [[0.0, 0.5]], [[0.0, 0.5]], [[4, 4]]))
    assert "color:white;text-align:center\">0.00" in html and "color:black;text-align:center\">0.50" in html
