"""EPD Image Grid: image batches as labelled rows of one picture (the demo's comparison grid)."""

from __future__ import annotations

import pytest
import torch

from epd_dev import comfy_harness as H

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]


def _node():
    return H.pack_module("nodes.nodes_demo").EPDImageGrid


def test_rows_are_pasted_in_order_right_of_their_labels():
    grid = _node()
    red = torch.zeros(3, 10, 12, 3)
    red[..., 0] = 1.0
    blue = torch.zeros(2, 10, 12, 3)
    blue[..., 2] = 1.0
    (out,) = grid.execute("first row\nsecond", row_1=red, row_2=blue).result
    assert out.shape[0] == 1 and out.shape[-1] == 3 and out.dtype == torch.float32
    image = out[0]
    gap = 4
    assert image.shape[0] == 2 * (10 + gap) + gap
    label_w = image.shape[1] - 3 * (12 + gap)  # three columns: the longest row
    assert label_w > 40  # room for the text
    first = image[gap : gap + 10, label_w : label_w + 12]
    second = image[2 * gap + 10 : 2 * gap + 20, label_w + 12 + gap : label_w + 24 + gap]
    assert torch.equal(first, red[0]) and torch.equal(second, blue[1])
    assert torch.equal(
        image[2 * gap + 10 :, label_w + 2 * (12 + gap) :],
        torch.ones_like(image[2 * gap + 10 :, label_w + 2 * (12 + gap) :]),
    )
    labels = image[:, : label_w - gap]
    assert (labels < 0.5).any(dim=-1).sum() > 20  # dark text pixels where the labels are
    assert (labels[: gap + 10] < 0.5).any() and (labels[2 * gap + 10 :] < 0.5).any()


def test_grey_images_and_errors():
    grid = _node()
    (out,) = grid.execute("a", row_1=torch.full((2, 8, 8, 1), 0.5)).result
    assert out.shape[-1] == 3
    with pytest.raises(ValueError, match="labels"):
        grid.execute("a\nb\nc", row_1=torch.zeros(1, 8, 8, 3), row_2=torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="one size"):
        grid.execute("a\nb", row_1=torch.zeros(1, 8, 8, 3), row_2=torch.zeros(1, 9, 8, 3))


@pytest.mark.parametrize("labels", ["\nsecond", "first\n", "first\nsecond\n", "first\r\nsecond"])
def test_an_empty_first_or_last_line_labels_its_row_with_nothing(labels):
    """Two rows and two lines, one of them empty: the empty one leaves its row unlabelled (the whole text was stripped,
    so the node counted one label); a trailing newline is not a label."""
    grid = _node()
    (out,) = grid.execute(labels, row_1=torch.zeros(1, 10, 12, 3), row_2=torch.zeros(1, 10, 12, 3)).result
    assert out.shape[1] == 2 * (10 + 4) + 4


def test_table_preview_labels_keep_whole_values():
    """The preview's right margin lists each step's r and w: as many whole values as fit, then how many more (it cut
    the text at 34 characters, so a third point's r read 0 and its weight was gone)."""
    from PIL import Image, ImageDraw

    preview = H.pack_module("nodes.preview")
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert preview._values(draw, "r", [0.06, 0.19, 0.36, 0.56], 190) == "r:  0.06  0.19  0.36  0.56"
    many = preview._values(draw, "w", [1 / 16] * 16, 190)
    shown = many.split("+")[0].split()[1:]
    assert shown == ["0.06"] * len(shown) and many.endswith(f"+{16 - len(shown)} more")
    assert draw.textlength(many) <= 190


def test_the_node_declares_eight_rows_the_first_required():
    spec = _node().INPUT_TYPES()
    assert list(spec["required"]) == ["labels", "row_1"]
    assert list(spec["optional"]) == [f"row_{i}" for i in range(2, 9)]


def test_the_default_label_runs_with_more_rows_connected():
    """A node added with its default 'row 1' and two rows runs: the second row is unlabelled."""
    grid = _node()
    rows = {"row_1": torch.ones(1, 10, 12, 3), "row_2": torch.ones(1, 10, 12, 3)}
    (out,) = grid.execute(grid.define_schema().inputs[0].default, **rows).result
    label_w = out.shape[2] - 12 - 4
    first, second = out[0, 4:14, :label_w], out[0, 18:28, :label_w]
    assert (first < 0.5).any() and not (second < 0.5).any()


def test_labels_beyond_ascii_are_drawn_not_boxed():
    """PIL's bundled font draws every non-ASCII character as the same box: accents and Greek letters differ."""
    labelled_grid = H.pack_module("nodes.image_grid").labelled_grid

    def drawn(label):
        return labelled_grid([torch.ones(1, 24, 8, 3)], [label], font_size=18)[0, :, :-12]

    for a, b in (("Ä", "Â"), ("é", "ê"), ("σ", "τ")):
        assert (drawn(a) < 0.5).any() and not torch.equal(drawn(a), drawn(b)), (a, b)
