"""Fine-tuning memory and speed: slmforge LoRA vs slmforge full fine-tuning vs transformers + peft
(LoRA and full) on the same decoder, weights, batch and adapter settings, in one run.

    python -m benchmarks.bench_lora                          # small Llama shape on CPU, ~1-2 min on 2 cores
    python -m benchmarks.bench_lora --rounds 7 --threads 2
    python -m benchmarks.bench_lora --preset gemma3-270m --device cuda --dtype bfloat16 --batch-size 16 --seq-len 1024

Each step is forward + prompt-masked next-token loss (the first half of every row is prompt: no loss)
+ backward + AdamW over the trainable parameters. LoRA: rank 16, alpha 32, no dropout, on q/k/v/o and
the three MLP projections, through peft on both sides (`inject_adapter_in_model` on slmforge's model,
`get_peft_model` on transformers'). The transformers model is built from slmforge's exported config and
weights; the run stops unless the LoRA losses of both sides agree within 1e-4 (float32, eval mode).

Timing: sides alternate round after round (benchmarks/common.py `interleave`), median of the rounds,
CPU time beside wall time. Memory: each side runs alone in a fresh process and reports the peak its
first two training steps add over the built model (grads, optimizer state, activations).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks.common import interleave, peak_memory_mib, timing_note
from slmforge.models import build_model, config_from_dict
from slmforge.models.hf import config_to_hf, state_dict_to_hf
from slmforge.objectives.clm import CausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(preset="llama-tiny", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
             intermediate_size=688, max_seq_len=512)
SIDES = ("slmforge LoRA", "slmforge full", "transformers+peft LoRA", "transformers full")


def model_config(args):
    return config_from_dict({"preset": args.preset} if args.preset else dict(SMALL))


def batch(cfg, args, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, args.seq_len // 2:] = True  # the second half is the response
    raw = CausalLM().collate({"tokens": tokens, "scored": scored})
    return {k: v.to(device) for k, v in raw.items()}


def build_side(name: str, args, device):
    """(model, loss_fn(batch) -> loss) for one side; LoRA sides have their adapters added."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    cfg = model_config(args)
    ours = build_model(cfg, device="cpu", seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    if name.startswith("slmforge"):
        model = ours
        if "LoRA" in name:
            inject_adapter_in_model(lora, model)
        model = model.to(device=device, dtype=args.torch_dtype)
        objective = CausalLM()
        return model, lambda b: objective.loss(model, b)[0]
    import transformers

    hf_cfg = config_to_hf(cfg, dtype="float32")
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    model = getattr(transformers, hf_cfg["architectures"][0])(config)
    model.load_state_dict(state_dict_to_hf(cfg, ours.state_dict()), strict=False)
    if cfg.tie_embeddings:
        model.tie_weights()
    if "LoRA" in name:
        model = get_peft_model(model, lora)
    model = model.to(device=device, dtype=args.torch_dtype)

    def loss(b):
        logits = model(input_ids=b["input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), b["targets"].flatten(), ignore_index=-100)

    return model, loss


def stepper(model, loss_fn, b, autocast):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step():
        with autocast:
            loss = loss_fn(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params)


def check_same_loss(args, device) -> float:
    b = batch(model_config(args), args, device)
    losses = []
    for name in ("slmforge LoRA", "transformers+peft LoRA"):
        model, loss_fn = build_side(name, args, device)
        model.eval()
        with torch.no_grad():
            losses.append(float(loss_fn(b)))
    if abs(losses[0] - losses[1]) > 1e-4 * max(1.0, abs(losses[0])):
        sys.exit(f"losses differ at step 0: slmforge {losses[0]:.6f}, transformers+peft {losses[1]:.6f}")
    return losses[0]


def memory_child(args) -> None:
    device = torch.device(args.device)
    model, loss_fn = build_side(args.memory_side, args, device)
    model.train()
    step, _ = stepper(model, loss_fn, batch(model_config(args), args, device), autocast_for(args))

    def two_steps():
        step()
        step()

    print(json.dumps({"peak_mib": peak_memory_mib(two_steps, device)}))


def measure_memory(name: str, argv: list[str]) -> float | None:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_lora", *argv, "--memory-side", name],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def autocast_for(args):
    if args.dtype == "bfloat16-autocast":
        return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="", help="model preset (default: a small Llama shape)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="training steps per round and side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "bfloat16-autocast"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--memory-side", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_side:
        return memory_child(args)
    argv = [a for a in sys.argv[1:]]
    device = torch.device(args.device)
    loss0 = check_same_loss(args, device)
    b = batch(model_config(args), args, device)
    steps, trainable = {}, {}
    for name in SIDES:
        model, loss_fn = build_side(name, args, device)
        model.train()
        step, trainable[name] = stepper(model, loss_fn, b, autocast_for(args))
        steps[name] = (lambda s: lambda: [s() for _ in range(args.steps)])(step)
    timings = interleave(steps, args.rounds, device)
    tokens = args.batch_size * args.seq_len * args.steps
    memory = {name: measure_memory(name, argv) for name in SIDES}
    print(f"{model_config(args).family} {model_config(args).num_parameters() / 1e6:.1f}M, batch {args.batch_size} x "
          f"{args.seq_len}, {args.dtype}, {args.device}, torch threads {torch.get_num_threads()}; "
          f"LoRA losses equal at step 0 ({loss0:.4f})")
    print(f"{'side':<24}{'trainable':>12}{'tokens/s':>10}{'cpu s/step':>12}{'peak MiB':>10}")
    for name in SIDES:
        t = timings[name]
        mib = memory[name]
        print(f"{name:<24}{trainable[name]:>12,}{tokens / t.median_wall:>10.0f}{t.median_cpu / args.steps:>12.3f}"
              f"{mib if mib is not None else float('nan'):>10.0f}")
    ours, theirs = timings["slmforge LoRA"], timings["transformers+peft LoRA"]
    print(f"slmforge LoRA / transformers+peft LoRA: {theirs.median_wall / ours.median_wall:.2f}x the tokens/s, "
          f"{memory['slmforge LoRA'] / memory['transformers+peft LoRA']:.2f}x the memory"
          if memory["slmforge LoRA"] and memory["transformers+peft LoRA"] else "")
    print(f"slmforge LoRA / slmforge full: {timings['slmforge full'].median_wall / ours.median_wall:.2f}x the tokens/s, "
          f"{memory['slmforge LoRA'] / memory['slmforge full']:.2f}x the memory"
          if memory["slmforge LoRA"] and memory["slmforge full"] else "")
    print("rounds: " + timing_note(timings, per=args.steps, unit="s/step"))


if __name__ == "__main__":
    main()
