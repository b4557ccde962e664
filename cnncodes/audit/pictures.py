"""One picture per finding kind, drawn like `predict --grid` (Agg canvas, 256-px thumbnails, titles, the
suspect in red): label issues (given -> suggested), duplicate pairs (side by side), outliers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .duplicates import Duplicates, Pair
from .images import Images
from .labels import LabelIssues
from .outliers import Outliers
from .output import PICTURES

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


def draw_pictures(folder: Path, images: Images, issues: LabelIssues, dups: Duplicates, outliers: Outliers,
                  n: int) -> list[str]:
    """The pictures of PICTURES with something to draw (the first `n` tiles each; duplicates as pairs, leaks
    first); none when the image files are not known. Returns the file names written."""
    if images.root is None or n == 0:
        return []
    tiles = {"label_issues": label_tiles(images, issues, n), "duplicates": pair_tiles(images, dups.pairs[:max(1, n // 2)]),
             "outliers": outlier_tiles(images, outliers, n)}
    drawn = []
    for kind, (file, title) in PICTURES.items():
        if tiles[kind]:
            draw_tiles(tiles[kind], folder / file, title)
            drawn.append(file)
    return drawn


def label_tiles(images: Images, issues: LabelIssues, n: int) -> list[Tile]:
    """Each flagged image with its given and suggested class (and the suggestion's probability)."""
    name = [images.classes[c] for c in issues.classes]
    suggested = issues.suggested()
    return [Tile(images.file(i), f"{short(images.paths[i])}\ngiven: {name[issues.labels[i]]}\n"
                                 f"suggested: {name[suggested[i]]} ({issues.probs[i, suggested[i]]:.2f})", True)
            for i in issues.flagged[:n]]


def pair_tiles(images: Images, pairs: list[Pair]) -> list[Tile]:
    """Each pair as two adjacent tiles, split, path and class above each; kind and cosine above the twin."""
    def tile(p: Pair, i: int) -> Tile:
        what = f"{p.kind}, cosine {p.similarity:.3f}" + (" LEAK" if p.leak else "") if i == p.b else ""
        return Tile(images.file(i), f"{images.splits[i]}: {short(images.paths[i])}\n"
                                    f"{images.classes[images.labels[i]]}\n{what}", p.leak)

    return [tile(p, i) for p in pairs for i in (p.a, p.b)]


def outlier_tiles(images: Images, outliers: Outliers, n: int) -> list[Tile]:
    return [Tile(images.file(i), f"{images.splits[i]}: {short(images.paths[i])}\n"
                                 f"given: {images.classes[images.labels[i]]}\nnearest class: {images.classes[c]}, "
                                 f"z {outliers.z[i]:.1f}", True)
            for i, c in zip(outliers.flagged[:n], outliers.nearest_class[:n])]
