"""The training step compiles as one graph (issue 17): no graph breaks in the decoder's forward nor in
forward + the chunked linear cross-entropy, for both decoder families, checked with
torch._dynamo.explain (tracing only: no compiler is run, so this is fast and needs no GPU)."""

from __future__ import annotations

import pytest
import torch

from slmforge.models import DecoderConfig, build_model
from slmforge.objectives.clm import CausalLM

dynamo = pytest.importorskip("torch._dynamo")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_training_step_has_no_graph_breaks(family):
    preset = "gemma3-tiny" if family == "gemma3" else "llama-tiny"
    fields = dict(vocab_size=128, num_layers=2, max_seq_len=64)
    if family == "gemma3":
        fields.update(sliding_window=8, global_every=2, final_logit_softcap=30.0)  # a window mask and a softcap
    model = build_model(DecoderConfig.from_name(preset, **fields), seed=0)
    objective = CausalLM()
    batch = objective.collate({"tokens": torch.randint(0, 128, (2, 25), generator=torch.Generator().manual_seed(0))})

    def step(input_ids, targets):
        return objective.loss(model, {"input_ids": input_ids, "targets": targets})[0]

    dynamo.reset()
    forward = dynamo.explain(model)(batch["input_ids"])
    assert forward.graph_break_count == 0, [str(b.reason) for b in forward.break_reasons]
    dynamo.reset()
    whole = dynamo.explain(step)(batch["input_ids"], batch["targets"])
    assert whole.graph_break_count == 0, [str(b.reason) for b in whole.break_reasons]
    assert whole.graph_count == 1
