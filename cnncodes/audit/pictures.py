"""One picture per finding kind, drawn like `predict --grid` (Agg canvas, 256-px thumbnails, titles, the
suspect in red): label issues (given -> suggested), duplicate pairs (side by side), outliers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COLUMNS = 4


@dataclass
class Tile:
    file: Path | None
    title: str
    red: bool = False


def draw_tiles(tiles: list[Tile], out: Path, title: str) -> Path:
    """Thumbnails in rows of COLUMNS (a pair of duplicates fills two adjacent tiles), titled; written atomically."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..data import BadImage, load_rgb
    from ..runtime import save_figure

    cols = min(COLUMNS, len(tiles))
    lines = int(np.ceil(len(tiles) / cols))
    fig = Figure(figsize=(3 * cols, 3.3 * lines + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(lines, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile in zip(axes.ravel(), tiles):
        try:
            if tile.file is not None:
                img = load_rgb(tile.file, 256)
                img.thumbnail((256, 256))
                ax.imshow(img)
        except (BadImage, OSError):
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(tile.title, fontsize=8, color="red" if tile.red else "black")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # the tiles' titles below the suptitle
    return save_figure(fig, out, dpi=80)


def short(path: str, width: int = 34) -> str:
    """A path cut to its last `width` characters, for a tile's title."""
    return path if len(path) <= width else "..." + path[-(width - 3):]
