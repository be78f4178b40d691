"""`slmforge pretrain`: causal-LM pretraining from a TOML config plus overrides."""

from __future__ import annotations

import argparse

from slmforge.arguments import HelpFormatter, add_config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain any model family (decoder: causal LM, encoder: masked LM) on token shards",
        description="Pretrain from a TOML config (sections model, objective, optim, schedule, train, tracking) "
                    "with key.sub=value overrides. Re-running the same command resumes from the run "
                    "folder's latest checkpoint.\n\nexamples:\n"
                    "  slmforge pretrain model.preset=llama-tiny train.data=runs/my/data train.out_dir=runs/my\n"
                    "  slmforge pretrain -c recipes/gemma3-270m-hindi.toml train.max_steps=1000",
        formatter_class=HelpFormatter)
    add_config_arguments(p, "train.max_steps=200 model.preset=llama-tiny")
    p.add_argument("--list-presets", action="store_true", help="list model presets and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from slmforge import config
    from slmforge.formatting import human
    from slmforge.models import PRESETS, config_from_dict
    from slmforge.models.registry import family
    from slmforge.train.config import PretrainConfig
    from slmforge.train.pretrain import pretrain
    from slmforge.train.parallel import environment

    if args.show_fields:
        print("\n".join(config.describe(PretrainConfig)))
        return 0
    if args.list_presets:
        for name in sorted(PRESETS):
            cfg = config_from_dict({"preset": name})
            print(f"{name:<22} {cfg.family:<10} {family(cfg).kind:<15} {human(cfg.num_parameters()):>7} params  "
                  f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
                  f"vocab {cfg.vocab_size}")
        return 0
    cfg = config.load_recipe(PretrainConfig, args.config, args.overrides)
    run_dir = pretrain(cfg)
    if environment().is_main:  # one line per job, not per process
        print(run_dir)
    return 0
