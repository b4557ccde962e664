"""`cnncodes audit`: label issues, duplicates and leaks, outliers of a cache, into a new folder."""

from __future__ import annotations

import click

from ..audit.config import SEARCHES, AuditConfig
from ..heads.config import HeadConfig
from ..heads.names import CLFS
from .options import config_options


@click.command("audit")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write (must not exist): label_issues.csv, duplicates.csv, leaks.csv, outliers.csv, "
                   "pictures, summary.json.")
@config_options(AuditConfig, {"data": {"type": click.Path(), "metavar": "DATA"},
                              "search": {"type": click.Choice(SEARCHES)}})
@config_options(HeadConfig, {"clf": {"type": click.Choice(CLFS)},
                             "device": {"help": "Torch heads and the neighbour search: auto, cpu, cuda or cuda:N."}},
                skip=("grid", "patience", "allow_unseen_classes", "exclude", "max_iter"))  # out-of-fold fits: L-BFGS
def audit_command(cache, out, data, near, neighbours, search, outlier_z, pictures, **head_options):
    """What is wrong with the dataset of CACHE: label issues (out-of-fold probabilities from fit-head's
    grouped CV, ranked by cleanlab), exact and near duplicates within and across splits (a val/test image
    near a train image is a leak, said first), outliers; a picture per finding and summary.json.

    Refit without the flagged images, and score val without its leaks:
    `cnncodes fit-head CACHE -o head.h5 --exclude OUT/label_issues.csv --exclude OUT/leaks.csv`.
    """
    from ..audit import audit

    config = AuditConfig(data=data, near=near, neighbours=neighbours, search=search, outlier_z=outlier_z,
                         pictures=pictures)
    audit(cache, out, config, HeadConfig(**head_options), log=click.echo)
