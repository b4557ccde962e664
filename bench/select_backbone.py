"""Which backbone? `cnncodes select` on one dataset with several real backbones, and the fusion of their codes.

Runs `cnncodes.select.select_backbone` (the API of `cnncodes select DATA --arch SPEC -o DIR --concat
--show-all-val`): each backbone is extracted into its own cache, every (backbone, head) and the
concatenation of all codes are scored by the same grouped 5-fold CV on train, the best is refitted
and evaluated on val. Prints per candidate: code dim, CV accuracy, val accuracy (the chosen one's is
the honest estimate; the others' are OPTIMISTIC: they are shown, never used to choose), extraction
and fit seconds; the chosen one is marked. Also the whole selection's wall time against the sum of
the extractions (what choosing costs beyond extracting).

    python bench/select_backbone.py                 # ants/bees, ResNet-50 + MobileNetV2 + EfficientNet-Lite2 (../shared)
    python bench/select_backbone.py --data DIR --arch resnet18=DEFAULT,mobilenet_v2=DEFAULT

Named select_backbone.py, not select.py: a script's folder comes first on sys.path, and a bench/select.py
would shadow the standard library's `select`, which subprocess imports.

Extracts afresh into a temporary folder unless --cache-dir names one (then finished caches are
reused, and their extraction time is that of the rerun: say so). Writes bench/results/select.json
and .txt. Skips cleanly when ../shared is absent and no --data/--arch are given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HYMENOPTERA, ROOT, SHARED, results_header, write_results  # noqa: E402

WEIGHTS = SHARED / "weights"
REAL = {"resnet50": WEIGHTS / "resnet50-imagenet-keras.pth",
        "mobilenet_v2": WEIGHTS / "mobilenet_v2-imagenet-features.pth",
        "timm:tf_efficientnet_lite2": WEIGHTS / "tf_efficientnet_lite2-imagenet.pth"}


def default_spec() -> str | None:
    if not HYMENOPTERA.is_dir() or not all(p.is_file() for p in REAL.values()):
        return None
    return ",".join(f"{arch}={path}" for arch, path in REAL.items())


def rows(report: dict) -> list[dict]:
    """One row per candidate: code dim, CV and val accuracy (OPTIMISTIC unless chosen), extraction and fit seconds."""
    extract_s = {b["name"]: b["extract_seconds"] for b in report["backbones"]}
    others = report.get("optimistic", {}).get("candidates", {})
    out = []
    for c in report["candidates"]:
        label = f"{c['name']} {c['clf']}"
        splits = report["splits"] if c["chosen"] else others.get(label, {})
        val = splits.get("val", {}).get("accuracy")
        out.append({"candidate": label, "code_dim": c["code_dim"], "C": c["C"], "cv": c["cv_score"], "val": val,
                    "val_is": "chosen: honest" if c["chosen"] else "OPTIMISTIC", "chosen": c["chosen"],
                    "extract_s": extract_s.get(c["name"]), "fit_s": c["fit_seconds"], "fused": c["fused"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HYMENOPTERA)
    ap.add_argument("--arch", default=None, help="select's spec [default: the three real backbones in ../shared]")
    ap.add_argument("--clf", default="logreg", help="head(s), comma-separated")
    ap.add_argument("--cache-dir", type=Path, default=None, help="reuse caches here (default: a fresh temp folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "select.json")
    args = ap.parse_args()
    spec = args.arch or default_spec()
    if spec is None or not args.data.is_dir():
        print(f"# skipping: {HYMENOPTERA} or the weights in {WEIGHTS} are absent (pass --data and --arch)")
        return
    from cnncodes.cli.head_cmd import parse_clfs
    from cnncodes.heads.config import HeadConfig
    from cnncodes.select import parse_backbones, select_backbone

    result = {**results_header("select"), "data": str(args.data), "spec": spec}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.cache_dir or Path(tmp) / "select"
        clfs = parse_clfs(args.clf)
        start = time.perf_counter()
        _, report = select_backbone(args.data, out_dir, parse_backbones(spec), head_config=HeadConfig(clf=clfs[0]),
                                    clfs=clfs, concat=True, show_all_val=True, progress=False, log=lambda m: None)
        wall = time.perf_counter() - start
    table = rows(report)
    extraction = sum(b["extract_seconds"] for b in report["backbones"])
    result.update({
        "rows": table, "chosen": report["chosen"], "folds": report["selection"]["strategy"],
        "backbones": report["backbones"], "select_wall_s": round(wall, 2), "extract_sum_s": round(extraction, 2),
        "choosing_s": round(wall - extraction, 2), "reused_caches": args.cache_dir is not None,
        "table": {"columns": ["candidate", "code dim", "C", "CV acc (train)", "val acc", "val is", "extract s", "fit s"],
                  "rows": [[r["candidate"] + (" (chosen)" if r["chosen"] else ""), r["code_dim"], f"{r['C']:g}",
                            f"{r['cv']:.4f}", "" if r["val"] is None else f"{r['val']:.4f}", r["val_is"],
                            "" if r["extract_s"] is None else f"{r['extract_s']:.1f}", f"{r['fit_s']:.1f}"]
                           for r in table]},
    })
    lines = [f"{'candidate':<62} {'dim':>5} {'C':>7} {'CV acc':>7} {'val acc':>7} {'val is':<15} {'extract s':>9} {'fit s':>6}"]
    for r in table:
        val = "" if r["val"] is None else f"{r['val']:.4f}"
        ext = "" if r["extract_s"] is None else f"{r['extract_s']:.1f}"
        lines.append(f"{r['candidate']:<62} {r['code_dim']:>5} {r['C']:>7g} {r['cv']:>7.4f} {val:>7} {r['val_is']:<15} "
                     f"{ext:>9} {r['fit_s']:>6.1f}" + ("  <- chosen" if r["chosen"] else ""))
    for b in report["backbones"]:
        pre = b["preprocessing"]
        lines.append(f"# {b['name']}: preprocessing resize {pre.get('resize')} crop {pre.get('crop')} "
                     f"{pre.get('interpolation', '')}; extraction {b['extract_seconds']:.1f} s"
                     + (" (cache reused)" if b["up_to_date"] else ""))
    whole = (f"whole selection {wall:.1f} s wall = extractions {extraction:.1f} s + choosing (CV of every candidate, "
             f"refit, val) {wall - extraction:.1f} s")
    lines.append(f"# {whole}; {report['selection']['strategy']}")
    lines.append(f"# load average before {result['load_before'][0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    val = report["splits"].get("val", {})
    result["notes"] = ["val accuracy of a candidate not chosen is OPTIMISTIC: shown, never used to choose; the chosen "
                       "candidate was picked by grouped 5-fold CV on train alone"
                       + (f" (its val: {val['correct']}/{val['images']} images)" if val.get("images") else ""), whole]
    write_results(result, args.out, lines)
    print(f"# wrote {args.out} and {args.out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
