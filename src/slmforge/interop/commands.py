"""Verbs `export` and `import-hf`: thin wrappers over `slmforge.interop`."""

from __future__ import annotations

import argparse

from slmforge.arguments import HelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's model as a Hugging Face folder (config.json, safetensors, tokenizer)",
        description="Write the latest (or given) checkpoint of a run as a folder that transformers loads as-is:\n"
                    "AutoTokenizer.from_pretrained(OUT) and, by the run's kind of model,\n"
                    "  decoders (llama, gemma3, qwen3, smollm3)     AutoModelForCausalLM.from_pretrained(OUT)\n"
                    "  encoders (bert, roberta, modernbert)         AutoModelForMaskedLM.from_pretrained(OUT)\n"
                    "    fine-tuned with finetune.task = classify   AutoModelForSequenceClassification\n"
                    "    fine-tuned with finetune.task = tag        AutoModelForTokenClassification\n"
                    "  encoder-decoders (t5)                        AutoModelForSeq2SeqLM.from_pretrained(OUT)\n"
                    "With --adapter-only (LoRA runs of decoders): the adapter alone, which peft's\n"
                    "PeftModel.from_pretrained(base, OUT) loads onto `base`, the export of RUN/base.\n\n"
                    "examples:\n"
                    "  slmforge export runs/my --out hf/my\n"
                    "  slmforge export runs/qa-lora/base --out hf/qa-base\n"
                    "  slmforge export runs/qa-lora --adapter-only --out hf/qa-adapter",
        formatter_class=HelpFormatter)
    p.add_argument("run", help="run folder or checkpoint folder (run/checkpoints/step-000500)")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (default: hf)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the saved weights (default: float32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--adapter-only", action="store_true",
                   help="LoRA runs: write only the adapter, in PEFT's format with transformers' module names "
                        "(load with PeftModel.from_pretrained onto the export of RUN/base); without it the "
                        "merged model is exported")
    p.set_defaults(func=_export)

    p = subparsers.add_parser(
        "import-hf", help="read a local Hugging Face checkpoint (Llama, Gemma 3, BERT, XLM-R, ModernBERT, T5) into a run folder",
        description="Convert a local Hugging Face model folder (e.g. a downloaded google/gemma-3-270m) into "
                    "an slmforge run folder to continue pretraining or fine-tune (train.init_from=OUT).")
    p.add_argument("hf_dir", metavar="DIR", help="folder with config.json, *.safetensors and tokenizer files")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=_import_hf)


def _export(args: argparse.Namespace) -> None:
    from slmforge.interop import export_hf

    if args.adapter_only:
        from slmforge.interop.export_adapter import export_adapter

        out = export_adapter(args.run, args.out, force=args.force)
        print(f"exported the LoRA adapter of {args.run} -> {out} (PEFT format)")
        return
    out = export_hf(args.run, args.out, dtype=args.dtype, force=args.force)
    print(f"exported {args.run} -> {out} (Hugging Face format, {args.dtype})")


def _import_hf(args: argparse.Namespace) -> None:
    from slmforge.interop import import_hf

    out = import_hf(args.hf_dir, args.out, force=args.force)
    print(f"imported {args.hf_dir} -> {out} (continue with train.init_from={out})")
