"""Pictures of the three views, drawn from the raw arrays the command saves (``record.py``'s dict, or
the npz loaded back), so that a picture can always be redrawn -- or two models compared -- from the
files alone. matplotlib with the Agg backend; nothing is shown on screen."""

from typing import Dict, List, Sequence

import numpy as np

VIEWS = ("receptive_field", "sampling_locations", "saliency")
MIN_SHOWN_STRENGTH = 0.01  # sampling points weaker than 1% of the layer's strongest are not drawn


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_receptive_field(ax, record: Dict) -> None:
    heat = record["erf_heat"]
    ax.imshow(_grey(record["image"]), cmap="gray", vmin=0, vmax=255)
    ax.imshow(heat / max(float(heat.max()), 1e-30), cmap="inferno", alpha=0.7, vmin=0, vmax=1)
    _mark_node(ax, record)
    _frame(ax, record, "effective receptive field")


def draw_sampling_layer(ax, record: Dict, index: int) -> None:
    points = record[f"sampling_{index}_points"]
    strength = record[f"sampling_{index}_strength"]
    weight = strength / max(float(strength.max()), 1e-30)
    shown = np.argsort(weight)  # strongest on top
    shown = shown[weight[shown] >= MIN_SHOWN_STRENGTH]
    height, width = record["image"].shape[:2]
    ax.imshow(_grey(record["image"]), cmap="gray", vmin=0, vmax=255)
    ax.scatter(
        points[shown, 0],
        points[shown, 1],
        c=weight[shown],
        s=4 + 36 * weight[shown],
        cmap="viridis",
        vmin=0,
        vmax=1,
        edgecolors="none",
        alpha=0.9,
    )
    _mark_node(ax, record)
    outside = ((points < -0.5) | (points > np.array([width, height]) - 0.5)).any(1)
    share = float(strength[outside].sum() / max(float(strength.sum()), 1e-30))
    name = str(record["sampling_names"][index]).replace("backbone.", "").replace("roi_head.bbox_roi_extractor.", "")
    title = f"{name} ({record['sampling_types'][index]})"
    if share > 0.005:  # points past the border read zero padding; widen the view to show where they go
        title += f"\n{100 * share:.0f}% of strength outside the image"
        ax.add_patch(_rectangle((-0.5, -0.5, width - 0.5, height - 0.5), "white"))
        ax.set_facecolor("0.85")
        low = np.minimum(points[shown].min(0) - 4, -0.5).clip(min=(-width, -height))
        high = np.maximum(points[shown].max(0) + 4, (width - 0.5, height - 0.5)).clip(max=(2 * width, 2 * height))
        _frame(ax, record, title, (low[0], high[0], low[1], high[1]))
    else:
        _frame(ax, record, title)


def draw_saliency(ax, record: Dict) -> None:
    keep = record["saliency_keep"]
    shown = np.where(keep[..., None], record["image"], record["mean_rgb"][None, None]).astype(np.uint8)
    ax.imshow(shown)
    ax.contour(keep.astype(float), levels=[0.5], colors="cyan", linewidths=1)
    _mark_node(ax, record)
    _frame(
        ax,
        record,
        f"saliency region {100 * keep.mean():.0f}% of image\n"
        f"error {float(record['saliency_error']):.3f} <= {float(record['saliency_max_error']):g}, "
        f"{_masked_images(record)} masked imgs",
    )


def _masked_images(record: Dict) -> int:
    if "saliency_masked_images" in record:
        return int(record["saliency_masked_images"])
    return int(record["saliency_forward_passes"]) - 1  # records written before the two counts were split


def view_panels(record: Dict, view: str) -> List:
    """The drawing calls of one view: one panel, or one per sampling layer."""
    if view == "receptive_field":
        return [lambda ax: draw_receptive_field(ax, record)]
    if view == "sampling_locations":
        return [lambda ax, i=i: draw_sampling_layer(ax, record, i) for i in range(len(record["sampling_names"]))]
    if view == "saliency":
        return [lambda ax: draw_saliency(ax, record)]
    raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")


def save_view(record: Dict, view: str, path: str, panel_inches: float = 2.6, dpi: int = 100) -> None:
    """One PNG: the view's panels side by side, the node described above them."""
    panels = view_panels(record, view)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_inches * len(panels), panel_inches + 0.7), squeeze=False)
    for draw, ax in zip(panels, axes[0]):
        draw(ax)
    fig.suptitle(str(record["node_label"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_comparison(
    records: Sequence[Dict], labels: Sequence[str], path: str, panel_inches: float = 2.2, dpi: int = 90
) -> None:
    """Rows = models (e.g. regular ConvNet, DCNv2) for the same node, columns = every panel of the
    three views -- the layout of the paper's Figure 1."""
    rows = [[draw for view in VIEWS for draw in view_panels(record, view)] for record in records]
    columns = max(len(row) for row in rows)
    plt = pyplot()
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(panel_inches * columns, (panel_inches + 0.4) * len(rows)), squeeze=False
    )
    for row, label, row_axes in zip(rows, labels, axes):
        for draw, ax in zip(row, row_axes):
            draw(ax)
        row_axes[0].set_ylabel(label, fontsize=10)
        for ax in row_axes[len(row) :]:
            ax.axis("off")
    fig.suptitle(str(records[0]["node_label"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _mark_node(ax, record: Dict) -> None:
    if str(record["node_kind"]) == "conv":
        x, y = record["node_xy"]
        ax.plot([x], [y], marker="+", color="red", markersize=10, markeredgewidth=2)
    else:  # box corners are continuous coordinates; pixel centres sit at integers
        ax.add_patch(_rectangle(np.asarray(record["node_box"]) - 0.5, "red", 1.5))


def _rectangle(corners, colour: str, linewidth: float = 1.0):
    import matplotlib.patches as patches

    x1, y1, x2, y2 = corners
    return patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=linewidth)


def _frame(ax, record: Dict, title: str, extent=None) -> None:
    """Limits (the image, or ``extent`` = (x0, x1, y0, y1)), no ticks, a small title."""
    height, width = record["image"].shape[:2]
    x0, x1, y0, y1 = extent or (-0.5, width - 0.5, -0.5, height - 0.5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
