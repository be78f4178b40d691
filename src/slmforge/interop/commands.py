"""Verbs `export` and `import-hf`: thin wrappers over `slmforge.interop`."""

from __future__ import annotations

import argparse

from slmforge.arguments import HelpFormatter
from slmforge.errors import SlmforgeError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's model as a Hugging Face folder (config.json, safetensors, tokenizer) "
                       "or a GGUF file for llama.cpp",
        description="Write the latest (or given) checkpoint of a run as a folder that transformers loads as-is:\n"
                    "AutoTokenizer.from_pretrained(OUT) and, by the run's kind of model,\n"
                    "  decoders (llama, gemma3, qwen3, smollm3)     AutoModelForCausalLM.from_pretrained(OUT)\n"
                    "  encoders (bert, roberta, modernbert)         AutoModelForMaskedLM.from_pretrained(OUT)\n"
                    "    fine-tuned with finetune.task = classify   AutoModelForSequenceClassification\n"
                    "    fine-tuned with finetune.task = tag        AutoModelForTokenClassification\n"
                    "  encoder-decoders (t5)                        AutoModelForSeq2SeqLM.from_pretrained(OUT)\n"
                    "With --adapter-only (LoRA runs of decoders): the adapter alone, which peft's\n"
                    "PeftModel.from_pretrained(base, OUT) loads onto `base`, the export of RUN/base.\n"
                    "With --format gguf (decoders): one file llama.cpp loads, with the run's tokenizer, refused\n"
                    "when llama.cpp would tokenize a sample of text differently (docs/interop.md).\n\n"
                    "examples:\n"
                    "  slmforge export runs/my --out hf/my\n"
                    "  slmforge export runs/qa-lora/base --out hf/qa-base\n"
                    "  slmforge export runs/qa-lora --adapter-only --out hf/qa-adapter\n"
                    "  slmforge export runs/my --format gguf --dtype q8_0 --out my.gguf   # llama.cpp (decoders)",
        formatter_class=HelpFormatter)
    p.add_argument("run", help="run folder or checkpoint folder (run/checkpoints/step-000500)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="output format (default: hf); gguf: one llama.cpp file, decoders only")
    p.add_argument("--out", required=True, help="folder to write (gguf: the .gguf file)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "f32", "f16", "q8_0"], default=None,
                   help="dtype of the saved weights: hf float32 (default) or bfloat16; gguf f32 (default), "
                        "f16 or q8_0")
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

    if args.format == "gguf":
        from slmforge.interop.gguf import export_gguf

        if args.adapter_only:
            raise SlmforgeError("--adapter-only: GGUF export writes the merged model; leave out --adapter-only")
        done = export_gguf(args.run, args.out, dtype={None: "f32", "float32": "f32"}.get(args.dtype, args.dtype),
                           force=args.force)
        print(f"exported {args.run} -> {done.path} (GGUF {done.arch}, {done.dtype}; {done.vocab.what}, same ids "
              f"on {done.vocab.checked.total:,} sample texts{' and in llama.cpp' if done.llama_cpp_checked else ''})"
              + ("; llama.cpp does not normalize text: give it NFC text, as this tokenizer expects" if done.vocab.nfc
                 else ""))
        return
    if args.dtype not in (None, "float32", "bfloat16"):
        raise SlmforgeError(f"--dtype {args.dtype}: Hugging Face export takes float32 or bfloat16")
    args.dtype = args.dtype or "float32"
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
