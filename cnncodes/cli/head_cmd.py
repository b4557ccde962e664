"""`cnncodes fit-head`, `cnncodes predict` and `cnncodes export`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from ..heads.config import HeadConfig
from ..heads.names import CLFS
from ..precision import PRECISIONS
from .options import config_options, manifest_from, manifest_options


def fit_head_options(f):
    """The head options (HeadConfig's fields; --clf takes a comma-separated list), --concat, --show-all-val."""
    f = click.option("--show-all-val", is_flag=True,
                     help="Several candidates: also report the val/test accuracy of those not chosen "
                          "(labelled OPTIMISTIC).")(f)
    f = click.option("--concat", is_flag=True,
                     help="Several caches: their codes side by side (each standardised) compete too.")(f)
    return config_options(HeadConfig, {"clf": {"type": str, "metavar": "CLF[,CLF...]",
                                               "help": f"{HeadConfig.__dataclass_fields__['clf'].metadata['help']} "
                                                       f"Several (comma-separated) compete by CV."},
                                       "max_iter": {"decls": ["--epochs"], "type": int}},
                          skip=("grid", "patience", "exclude"))(f)


def exclude_option(f):
    """fit-head's --exclude (HeadConfig.exclude): one cache and one head only, so not among the shared options."""
    return config_options(HeadConfig, {"exclude": {"multiple": True, "type": click.Path(dir_okay=False),
                                                   "metavar": "CSV", "show_default": False}},
                          skip=tuple(f.name for f in dataclasses.fields(HeadConfig) if f.name != "exclude"))(f)


@click.command("fit-head")
@click.argument("caches", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Head file to write (.h5).")
@fit_head_options
@exclude_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@click.option("--confusion", type=click.Path(dir_okay=False), default=None, help="Draw confusion matrices (PNG; .pdf/.svg by suffix).")
def fit_head_command(caches, out, json_out, confusion, concat, show_all_val, **options):
    """Fit a linear head on the train split of CACHE and report on its other splits.

    Uses every stored train view; standardisation is part of the head. The head file is HDF5
    (no pickle) in scikit-learn's layout (StandardScaler then LogisticRegression or LinearSVC;
    docs/formats.md), the linear form that `cnncodes export` folds into the backbone.

    Several CACHES of the same images (other backbones, layers, preprocessing), several --clf
    and --concat: every candidate is scored by the same grouped CV on train; the best is
    refitted on all of train and only it is evaluated on val/test.
    """
    from ..heads.format import holds_a_head
    from ..runtime import check_replaceable, figure_format

    clfs, config = parse_head_options(options)
    check_replaceable(out, "head file", holds_a_head, list(caches))  # these fail now, not after the fit
    if json_out:
        check_replaceable(json_out, "JSON report", lambda p: p.suffix.lower() == ".json", [*caches, out])
    if confusion:
        figure_format(confusion)
    head, report = fit_heads(caches, clfs, config, concat, show_all_val, log=lambda m: click.echo(m, err=True))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    head.save(out)
    if "candidates" in report:
        print_candidates(report)
    print_report(report)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2))
    if confusion and report["splits"]:
        draw_confusion(report, confusion)
    click.echo(f"head saved to {out}")


def parse_head_options(options: dict) -> tuple[list[str], HeadConfig]:
    """`fit_head_options`' values -> (the --clf list, HeadConfig with the first of them)."""
    clfs = parse_clfs(options.pop("clf"))
    return clfs, HeadConfig(clf=clfs[0], **options)


def parse_clfs(text: str) -> list[str]:
    """`--clf a,b` -> ["a", "b"]; an unknown or repeated name is one error line."""
    from ..errors import CnnCodesError

    clfs = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in clfs if c not in CLFS]
    if not clfs or bad:
        raise CnnCodesError(f"unknown --clf '{bad[0] if bad else text}'; choose one or more (comma-separated) of: "
                            f"{', '.join(CLFS)}")
    if len(set(clfs)) != len(clfs):
        raise CnnCodesError(f"--clf {text}: a head is named twice")
    return clfs


def fit_heads(caches, clfs: list[str], config: HeadConfig, concat: bool, show_all_val: bool, log):
    """One cache and one head: `fit_head`, as always; else `fit_head_multi` (several candidates)."""
    from ..errors import CnnCodesError

    if concat and len(caches) < 2:
        raise CnnCodesError("--concat joins the codes of two or more caches; pass several CACHES")
    if config.exclude and (len(caches) > 1 or len(clfs) > 1):
        raise CnnCodesError("--exclude applies to one cache and one --clf; fit the chosen candidate again with it")
    if len(caches) == 1 and len(clfs) == 1:
        from ..heads import fit_head

        if show_all_val:
            log("note: --show-all-val applies when several candidates compete (several caches or --clf a,b)")
        return fit_head(caches[0], config=config, log=log)
    from ..heads.multi import fit_head_multi

    return fit_head_multi(caches, clfs, config=config, concat=concat, show_all_val=show_all_val, log=log)


def print_candidates(report: dict, extra: dict[str, str] | None = None) -> None:
    """The candidates' table: CV accuracy, code dim, C, fit time; the chosen one marked.
    `extra`: per cache name, one more column (select's extraction time)."""
    rows = report["candidates"]
    width = max(len(f"{r['name']} {r['clf']}") for r in rows)
    head = f"{'candidate':<{width}}  {'dim':>5}  {'C':>7}  {'CV acc':>7}  {'fit s':>6}"
    click.echo(head + ("  " + "extract s" if extra else ""))
    for r in rows:
        label = f"{r['name']} {r['clf']}"
        more = f"  {extra.get(r['name'], ''):>9}" if extra else ""
        click.echo(f"{label:<{width}}  {r['code_dim']:>5}  {r['C']:>7g}  {r['cv_score']:>7.4f}  {r['fit_seconds']:>6.1f}"
                   f"{more}{'  <- chosen' if r['chosen'] else ''}")
    click.echo(f"chosen by {report['selection']['strategy']}: {report['chosen']} (only its val/test accuracy follows)")
    opt = report.get("optimistic")
    if opt:
        click.echo(opt["note"])
        for label, splits in opt["candidates"].items():
            accs = ", ".join(f"{s} {r['accuracy']:.4f}" for s, r in splits.items() if r["accuracy"] is not None)
            click.echo(f"  OPTIMISTIC {label}: {accs}")


def print_report(report: dict) -> None:
    sel = report["selection"]
    if sel["auto"]:
        scores = ", ".join(f"{c:g}: {s:.3f}" for c, s in zip(sel["grid"], sel["cv_scores"]))
        click.echo(f"C = {sel['C']:g} chosen by {sel['strategy']}: CV accuracy {sel['cv_score']:.4f} ({scores})")
        if sel.get("stopped_early"):
            click.echo(f"C path {sel['stopped_early']}")
    else:
        click.echo(f"C = {sel['C']:g} (fixed)")
    for note in sel["notes"]:
        click.echo(f"note: {note}", err=True)
    if "note" in report:
        click.echo(report["note"])
    for split, r in report["splits"].items():
        if not r["images"]:
            click.echo(f"{split}: no codes to score (every image skipped?)")
            continue
        how = f", scores averaged over {r['views_per_image']:g} views" if r["views_per_image"] > 1 else ""
        click.echo(f"{split}: accuracy {r['accuracy']:.4f} ({r['correct']}/{r['images']} images{how})")
        apart = report.get("excluded", {}).get("splits", {}).get(split)
        if apart and apart["images"]:
            click.echo(f"{split} without the {apart['left_out']} image(s) --exclude lists: accuracy "
                       f"{apart['accuracy']:.4f} ({apart['correct']}/{apart['images']} images)")
        for name, m in r["per_class"].items():
            click.echo(f"  {name:>20}: precision {m['precision']:.3f}  recall {m['recall']:.3f}  ({m['support']} images)")
        labels, matrix = r["confusion"]["labels"], r["confusion"]["matrix"]
        click.echo("  confusion (rows true, columns predicted): " + "; ".join(
            f"{lab}: {' '.join(map(str, row))}" for lab, row in zip(labels, matrix)))
        if r["unseen_classes"]:
            click.echo(f"  warning: classes with no training images counted as errors: {r['unseen_classes']}", err=True)


def draw_confusion(report: dict, out: str) -> None:
    """One confusion-matrix panel per held-out split (scikit-learn's display, Agg canvas: no
    display, no global backend)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    from ..runtime import save_figure

    splits = {s: r for s, r in report["splits"].items() if r["images"]}
    if not splits:
        return
    fig = Figure(figsize=(4.5 * len(splits), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(splits), squeeze=False)
    for ax, (split, r) in zip(axes[0], splits.items()):
        display = ConfusionMatrixDisplay(np.array(r["confusion"]["matrix"]), display_labels=r["confusion"]["labels"])
        display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
        ax.set_title(f"{split}: accuracy {r['accuracy']:.3f}")
    fig.tight_layout()
    save_figure(fig, out, dpi=100)


@click.command("predict")
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None, help="Write predictions (.csv or .json).")
@click.option("--scores", is_flag=True, help="Also give every class's probability: one column per class (named by "
              "the class) in CSV, a {class: probability} dict per row in JSON, class=probability on screen.")
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Draw a sample of predictions (PNG; .pdf/.svg by suffix).")
@click.option("--weights", default=None, help="Backbone weights for a head [default: those recorded in the head].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="[default: the head's extraction precision]")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 16 on CPU, 128 on CUDA].")
@click.option("--workers", type=int, default=None, help="Decode workers [default: sized to the machine].")
@manifest_options(split=False)
def predict_command(model, inputs, out, scores, grid, weights, device, precision, batch_size, workers, path_col, label_col):
    """Classify images (files, folders and/or CSV manifests) with a head (.h5), a classifier (.pt)
    or a finetune RUN_DIR.

    A folder whose images sit in class-named subfolders (DIR/<class>/, DIR/val/<class>/) is
    labelled, and so is a manifest with a label column: accuracy is printed. `score` is the
    predicted class's probability, softmax of the class scores (for svm heads a monotone
    confidence, not calibrated); --scores gives every class's.
    """
    from ..predict import predict
    from ..predictions import check_predictions_path, draw_grid, write_predictions
    from ..runtime import figure_format

    if out:
        check_predictions_path(out, inputs)  # before the work, not after it
    if grid:
        figure_format(grid)  # a bad suffix fails now, not after the predictions
    preds = predict(model, inputs, weights=weights, device=device, precision=precision, batch_size=batch_size,
                    workers=workers, manifest=manifest_from(path_col, label_col))
    for path, reason in preds.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    if out:
        write_predictions(preds, out, scores=scores)
    else:
        probs = preds.probabilities() if scores else [[]] * len(preds.rows)
        for r, p in zip(preds.rows, probs):
            every = "".join(f"\t{c}={v:.4f}" for c, v in zip(preds.classes, p))
            click.echo(f"{r['path']}\t{r['pred']}\t{r['score']:.4f}{every}")
    for name, a in preds.accuracy().items():
        label = "accuracy" if name == "all" else f"{name} accuracy"
        click.echo(f"{label} {a['accuracy']:.4f} ({a['correct']}/{a['images']} labelled images)")
    if grid:
        draw_grid(preds, grid)
    click.echo(f"predicted {len(preds.rows)} images, skipped {len(preds.skipped)}" + (f"; wrote {out}" if out else ""),
               err=out is None)


@click.command("export")
@click.argument("head", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Classifier to write (.pt + .json).")
@click.option("--weights", default=None, help="Backbone weights [default: those recorded in the head].")
def export_command(head, out, weights):
    """Fold a head into its backbone's fc: a torchvision state_dict that
    torchvision.models.<arch>(num_classes=K) loads strictly."""
    from ..predict import export_head

    path = export_head(head, out, weights)
    click.echo(f"wrote {path} and {path.with_suffix('.json')}")
