"""`cnncodes archs`: the backbones, their code dims and crops; `archs ARCH --layers`: layer names."""

from __future__ import annotations

import json

import click


@click.command("archs")
@click.argument("arch", required=False)
@click.option("--layers", is_flag=True, help="List ARCH's intermediate layer names for `extract --layer`.")
@click.option("--timm", "timm_names", multiple=True, metavar="NAME", help="Also list these timm models (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def archs_command(arch, layers, timm_names, as_json):
    """List the backbones: code dim, default crop (resize/crop, interpolation), DEFAULT weights offline?

    Every torchvision classification model is listed; timm models are `timm:NAME`.
    """
    from ..backbones import canonical_arch, is_timm, list_layers
    from ..backbones._catalog import list_archs, rows_as_dicts
    from ..errors import CnnCodesError

    if layers:
        if not arch:
            raise CnnCodesError("archs --layers needs an ARCH, e.g. `cnncodes archs resnet50 --layers`")
        names = list_layers(canonical_arch(arch))
        click.echo(json.dumps(names) if as_json else "\n".join(names))
        return
    rows = list_archs(list(timm_names) + ([arch] if arch and is_timm(arch) else []))
    if arch:
        arch = canonical_arch(arch)
        rows = [r for r in rows if r.arch == arch]
    if as_json:
        click.echo(json.dumps(rows_as_dicts(rows), indent=1))
        return
    click.echo(f"{'arch':24} {'code dim':>8} {'crop':>5} {'resize':>6} {'interp':8} offline")
    for r in rows:
        click.echo(f"{r.arch:24} {r.code_dim:8d} {r.crop:5d} {r.resize:6d} {r.interpolation:8} {'yes' if r.offline else 'no'}")

