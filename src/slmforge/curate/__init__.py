"""`slmforge data curate`: raw text in any language -> a clean corpus plus a report of what was removed
and why, as a datatrove pipeline (local on all cores, or on Slurm). Needs `pip install 'slmforge[curate]'`.

    from slmforge.curate import load_config, curate
    curate(load_config("recipe.toml", ["curate.workers=4"]))

Only the config is imported here; datatrove is imported when `curate` runs.
"""

from slmforge.curate.config import CurateConfig, load_config


def curate(cfg: CurateConfig, show_progress: bool = True):
    """Run the curation described by `cfg`; returns the output folder (see `slmforge.curate.pipeline`)."""
    from slmforge.curate.pipeline import curate as run

    return run(cfg, show_progress)


__all__ = ["CurateConfig", "curate", "load_config"]
