"""Regenerate the documents' benchmark tables from the results files, so no figure is typed by hand.

    python bench/report.py [--doc docs/benchmarks.md ...] [--results bench/results] [--check]

Each results file `bench/results/NAME.json` (written through `common.write_results`) fills the
block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in whichever document holds it
(by default README.md and every docs/*.md: the tables live in docs/benchmarks.md); the file's "bench" field
picks the renderer in RENDERERS. A bench with no renderer of its own gets `render_table` when
its file holds {"table": {"columns": [...], "rows": [[...], ...]}, "notes": [...]}. To give a
bench its own table, decorate a function `dict -> str` with `@renderer("its bench name")`.
Every block opens with the machine and its load average, read from the file.
`--check` changes nothing and exits 1 when a block is out of date (for CI).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL)
RENDERERS: dict[str, Callable[[dict], str]] = {}


def renderer(bench: str) -> Callable:
    """Register `fn(result) -> markdown` as the table of results files whose "bench" is `bench`."""
    def register(fn: Callable[[dict], str]) -> Callable[[dict], str]:
        RENDERERS[bench] = fn
        return fn
    return register


# --------------------------------------------------------------------------- shared pieces


def _load(values: list | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "unknown"


def machine_line(result: dict) -> str:
    """Where and when: CPU, cores, memory, GPU, versions, load average before/after, commit."""
    m = result.get("machine", {})
    cores = m.get("cores")
    load, after = result.get("load_before") or [], result.get("load_after") or []
    # Before the run, any load is other jobs'; after it, the bench's own threads count too, so a high
    # load after a quiet start may be the bench itself (e.g. a thread pool of BLAS calls) and is said as such.
    busy_before = bool(cores) and bool(load) and load[0] > 0.5 * cores
    busy_after = bool(cores) and bool(after) and after[0] > 1.5 * cores
    commit = (result.get("git_commit") or "unknown")[:12]
    bf16 = f" (bf16 {m['cpu_bf16']})" if m.get("cpu_bf16") else ""
    line = (f"Measured {result.get('date', '?')} on {m.get('cpu', '?')}{bf16}, {cores} cores, {m.get('memory_gib')} GiB, "
            f"{m.get('gpu') or 'no GPU'}; torch {m.get('torch')}, torchvision {m.get('torchvision')}; "
            f"load average (1/5/15 min) {_load(load)} before, {_load(after)} after; "
            f"commit {commit}.")
    starts = [v for r in result.get("rows", []) if isinstance(r, dict) for v in r.get("loads_at_start", [])]
    if result.get("wait_load") and starts and max(starts) < result["wait_load"]:
        # a gated bench: the load before/after is its own or the previous bench's; what counts is each run's start
        line += (f" Each timed run started once the 1-minute load average was below {result['wait_load']:g} "
                 f"({min(starts):.2f}-{max(starts):.2f} at the starts).")
    elif busy_before:
        line += (" **Other jobs loaded the machine** (load average beyond what the bench itself explains): "
                 "absolute times are inflated and noisy; ratios measured within the run hold better.")
    elif busy_after:
        line += (" The load after the run exceeds the cores: the bench's own threads oversubscribed them, or "
                 "other jobs started during it; its absolute times may be inflated.")
    return line


def command_block(result: dict) -> str:
    return f"```\n{result.get('command', '?')}\n```" if result.get("command") else ""


def render_table(result: dict) -> str:
    """Generic: the machine line, the command, a markdown table from result["table"] and result["notes"]."""
    table = result.get("table")
    if not table:
        raise ValueError(f"bench '{result.get('bench')}' has no renderer and no 'table' in its results file")
    lines = [machine_line(result), "", command_block(result), ""]
    lines += ["| " + " | ".join(map(str, table["columns"])) + " |", "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table["rows"]]
    return "\n".join(lines + [""] + [f"* {n}" for n in result.get("notes", [])]).rstrip()


# --------------------------------------------------------------------------- compare


def _s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"


def _pct(v: float | None) -> str:
    return f"{100 * v:.2f}%" if v is not None else ""


def _time_cell(r: dict) -> str:
    reps = f"median of {r['repeats']}" if r["repeats"] > 1 else "1 run"
    if r["extrapolated"]:
        return f"**{_s(r['seconds'])} EXTRAPOLATED** from {r['epochs_run']} of {r['epochs']} epochs ({reps})"
    return f"{_s(r['seconds'])} ({reps})"


def _acc_cell(r: dict) -> str:
    if r["val_acc"] is not None:
        return _pct(r["val_acc"])
    p = r.get("partial") or {}
    return f"none: not a full run (after epoch {p.get('epoch')} of {p.get('of')}: {_pct(p.get('val_acc'))}, not final)"


def _prep(result: dict) -> str:
    p = result.get("preprocessing")
    return f"resize {p['resize']} / crop {p['crop']} px" if p else f"{result['image_size']} px"


def _epoch0(r: dict) -> str:
    acc = r.get("epoch0_val_acc")
    return f" (epoch 0, the head as loaded: {_pct(acc)})" if acc is not None else ""


@renderer("compare")
def render_compare(result: dict) -> str:
    """The cache path vs the epoch paths: times, final accuracies, speed-ups beside their bounds."""
    rows = result["paths"]
    mode = ("Full run: every path ran the whole recipe; accuracies are the final epoch's on val." if result["full"]
            else f"**Not a full run**: the epoch paths ran {result['epochs_run']} of {result['epochs']} epochs, so "
                 f"their times are **extrapolated** and they have no final accuracy (rerun with `--full`).")
    out = [machine_line(result), "", command_block(result), "",
           f"Data {result['data']} ({', '.join(f'{k} {v}' for k, v in result['splits'].items())} images), "
           f"{result['arch']}, weights `{Path(result['weights']).name}`, {_prep(result)}, "
           f"recipe {result['epochs']} epochs, device {result['device']}. {mode}", "",
           "| path | precision, batch, layout | time to a trained model | val accuracy (final epoch) "
           "| model-only time | share of ceiling |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['path']} | {r['settings_label']} | {_time_cell(r)} | {_acc_cell(r)}{_epoch0(r)} "
                   f"| {_s(r['model_only_s'])} | {r['ceiling_share']:.2f} |")
    out += ["", "| speed-up of | over | measured | bound | measured / bound |", "|---|---|---|---|---|"]
    for q in result["ratios"]:
        ext = " (extrapolated)" if q["extrapolated"] else ""
        out.append(f"| {q['cache']} | {q['other']} | {q['ratio']:.1f}x{ext} | {q['bound']:.1f}x "
                   f"| {q['ratio_over_bound']:.2f} |")
    nominal = ", ".join(f"{k} {v:.0f}x" for k, v in result.get("nominal_bound", {}).items())
    out += ["",
            "* time to a trained model: wall time of the whole path (cache: extract train + val, then fit the "
            "head with C chosen by CV on train; epoch paths: setup, every epoch's training and val pass, saves). "
            "Extrapolated = the epochs run + the missing ones at the median measured epoch time.",
            "* model-only time: the path's work (images through a forward, images through a training step) at "
            "the model-only ceilings measured before and after each of its runs (same model, precision, batch and "
            "layout, synthetic batch in memory); share of ceiling = model-only time / time.",
            "* bound = the other path's model-only time / the cache path's: the speed-up when both paths run at "
            "the same share of their ceilings. measured / bound above 1 means the other path lost more time "
            "outside the network than the cache path, not extra work saved by caching. At equal per-image cost "
            f"with a backward costing two forwards the bound would be: {nominal}."]
    differs: dict[str, list[str]] = {}  # one line per distinct text: the cache rows share theirs
    for r in rows:
        if r["differs_from_tutorial"]:
            differs.setdefault("; ".join(r["differs_from_tutorial"]), []).append(r["path"])
    out += [f"* {', '.join(paths)}: {text}." for text, paths in differs.items()]
    return "\n".join(out)


@renderer("extract_fixed_cost")
def render_fixed_cost(r: dict) -> str:
    """bench/extract_speed.py --fixed-cost: a whole command's wall time outside its loop, and its stages."""
    lines = [machine_line(r), "", command_block(r), ""]
    for arch, f in r.get("fixed_cost", {}).items():
        runs = ", ".join(f"{x:.2f}" for x in f.get("runs_s", []))
        lines += [f"**{arch}**: fixed cost {f['fixed_s']:.2f} s (median of {runs} s)", "",
                  "| stage | s |", "|---|---|"]
        lines += [f"| {stage} | {sec:.3f} |" for stage, sec in f.get("stages_s", {}).items()]
        lines.append("")
    return "\n".join(lines + [f"* {n}" for n in r.get("notes", [])]).rstrip()


@renderer("device_check")
def render_device_check(r: dict) -> str:
    """bench/device_check.py on a GPU: rates against their bounds, the views' differences, the targets."""
    rates = r.get("rates", {})
    lines = [machine_line(r), "", command_block(r), "", "| measurement | value |", "|---|---|"]
    for key in ("ceiling_img_s", "cpu_decode_img_s", "device_decode_img_s"):
        if key in rates:
            lines.append(f"| {key.replace('_img_s', '').replace('_', ' ')} | {rates[key]:,.0f} img/s |")
    for key in ("command_cpu_decode", "command_gpu_decode"):
        c = rates.get(key, {})
        if "loop_img_s" in c:
            lines.append(f"| extract loop, {key.split('_')[1]} decode | {c['loop_img_s']:,.0f} img/s, fixed cost "
                         f"{c['fixed_s']} s |")
        elif c:
            lines.append(f"| extract, {key.split('_')[1]} decode | failed: {c.get('error', '?')} |")
    ft = r.get("finetune", {})
    if "ratio" in ft:
        lines.append(f"| fine-tuning | {ft['finetune_img_s']:,.0f} img/s of a {ft['ceiling_img_s']:,.0f} img/s "
                     f"forward+backward ceiling ({ft['ratio']:.2f}) |")
    for key in ("views_photos", "views_generated"):
        v = r.get(key)
        if v:
            lines.append(f"| device vs CPU views, {key.split('_')[1]} ({v['images']}) | grey levels max "
                         f"{v['max_grey']:.0f}, mean {v['mean_grey']:.3f}; codes rel. diff max "
                         f"{v['codes_rel_diff_max']:.1e} |")
    lines += ["", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'not measured' if ok is None else 'yes' if ok else '**no**'} |"
              for name, ok in r.get("targets", {}).items()]
    if r.get("skipped"):
        lines += [""] + [f"* skipped: {s}" for s in r["skipped"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the documents


def render(result: dict, name: str = "") -> str:
    """The markdown for one results file (its renderer, else the generic table)."""
    fn = RENDERERS.get(result.get("bench", ""), render_table)
    note = f"<!-- generated by `python bench/report.py` from bench/results/{name}.json: do not edit by hand -->\n"
    return (note if name else "") + fn(result).strip()


def load_results(folder: Path) -> dict[str, dict]:
    """NAME -> parsed results file, for every bench/results/NAME.json written by a bench."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {path}: not a readable results file ({e}); rerun its bench") from None
        if isinstance(data, dict) and "bench" in data:
            out[path.stem] = data
    return out


def update(text: str, results: dict[str, dict]) -> tuple[str, list[str]]:
    """`text` with every known block regenerated, and one note per block (updated, unchanged, missing)."""
    notes = []

    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in results:
            notes.append(f"{name}: no bench/results/{name}.json, block left as is")
            return m.group(0)
        body = render(results[name], name) + "\n"
        notes.append(f"{name}: {'unchanged' if body == m['body'] else 'updated'}")
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), notes


def default_docs() -> list[Path]:
    """README.md and every docs/*.md: wherever a block may stand."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", "--readme", dest="docs", type=Path, action="append",
                   help="a markdown file holding blocks (repeatable) [default: README.md and docs/*.md]")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--check", action="store_true", help="exit 1 if a block is out of date; write nothing")
    args = p.parse_args(argv)
    results = load_results(args.results)
    stale, shown = False, set()
    for doc in args.docs or default_docs():
        text = doc.read_text()
        new, notes = update(text, results)
        for n in notes:
            print(f"{doc.name}: {n}")
        shown |= {n.split(":")[0] for n in notes}
        stale |= new != text
        if new != text and not args.check:
            doc.write_text(new)
    for name in sorted(set(results) - shown):
        print(f"{name}: results file with no <!-- bench:{name} --> block in any document")
    return int(stale) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
