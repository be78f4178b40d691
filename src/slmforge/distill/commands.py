"""`slmforge distill`."""

from __future__ import annotations

import argparse

from slmforge.cli import HelpFormatter, add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="pretrain a student with a teacher's distributions mixed into its loss (KL, JS, TV)",
        description="Pretraining (sections model, objective, optim, schedule, train, tracking, parallel) plus "
                    "[distill]: teacher (a run or a local Hugging Face folder), alpha, temperature, divergence. "
                    "Re-running the same command resumes.\n\nexamples:\n"
                    "  slmforge distill -c recipes/xlmr-hindi-distill.toml\n"
                    "  slmforge distill model.preset=bert-tiny distill.teacher=runs/teacher train.data=data "
                    "train.out_dir=runs/student",
        formatter_class=HelpFormatter)
    add_config_arguments(p, "distill.alpha=0.3 distill.temperature=4")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from slmforge import config
    from slmforge.distill.config import DistillRunConfig
    from slmforge.distill.run import distill

    if args.show_fields:
        print("\n".join(config.describe(DistillRunConfig)))
        return 0
    if args.config:
        config.check_sections(config.read_toml(args.config), args.config)
    print(distill(config.load(DistillRunConfig, args.config, args.overrides)))
    return 0
