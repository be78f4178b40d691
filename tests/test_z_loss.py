"""PaLM's z-loss (objective.z_loss, issue 25): the chunked kernel's loss and gradients against autograd
through `F.cross_entropy + z * logsumexp^2`, off (0) exactly the cross-entropy, and training-only: the
validation loss of a model does not depend on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slmforge import config
from slmforge.errors import ConfigError
from slmforge.models.heads import OutputProjection
from slmforge.objectives import ClmConfig, MlmConfig, ObjectiveConfig, mean_loss
from slmforge.objectives.clm import CausalLM
from slmforge.objectives.losses import HeadLoss, linear_cross_entropy
from slmforge.objectives.mlm import MaskedLM

VOCAB, WIDTH = 60, 16


def reference(hidden, weight, targets, z_loss, softcap=None):
    """Cross-entropy + z_loss * mean(logsumexp^2) over the scored rows, by autograd on full logits."""
    logits = hidden.reshape(-1, WIDTH) @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = targets.reshape(-1)
    scored = targets != -100
    z_term = z_loss * torch.logsumexp(logits, dim=-1)[scored].square().mean()
    return F.cross_entropy(logits, targets, ignore_index=-100) + z_term, z_term


def make_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(3, 11, WIDTH, generator=generator) * 2).requires_grad_()
    weight = (torch.randn(VOCAB, WIDTH, generator=generator) * 0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (3, 11), generator=generator)
    targets[0, :4] = -100
    targets[2, 7:] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("z_loss", [1e-4, 0.05])
def test_chunked_loss_and_gradients_match_autograd(softcap, z_loss):
    hidden, weight, targets = make_inputs()
    loss, _, z_term = linear_cross_entropy(hidden, weight, targets, softcap=softcap, chunk_rows=7, z_loss=z_loss,
                                           with_z_term=True)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref, ref_z_term = reference(hidden, weight, targets, z_loss, softcap)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(z_term, ref_z_term.detach(), rtol=0, atol=1e-7)
    assert not z_term.requires_grad
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)
    # the z term moves the gradient by more than the tolerance: the check above can fail
    plain = torch.autograd.grad(reference(hidden, weight, targets, 0.0, softcap)[0], (hidden, weight))
    assert (plain[1] - ref_grads[1]).abs().max() > 1e-5


def test_z_loss_zero_is_the_plain_cross_entropy_bitwise():
    hidden, weight, targets = make_inputs(1)
    plain = linear_cross_entropy(hidden, weight, targets, softcap=5.0, chunk_rows=7, with_correct=True)
    plain_grads = torch.autograd.grad(plain[0], (hidden, weight))
    projection = OutputProjection(hidden, weight, None, 5.0)
    loss, correct, z_term = HeadLoss(chunk_rows=7).with_z_loss(projection, targets, 0.0)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert torch.equal(loss, plain[0]) and torch.equal(correct, plain[1]) and float(z_term) == 0.0
    assert all(torch.equal(g, p) for g, p in zip(grads, plain_grads))


class TinyModel(nn.Module):
    """Embedding -> head: enough for an objective's loss (hidden states, then `output_projection`)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(VOCAB, WIDTH, generator=generator) * 2)
        self.head = nn.Parameter(torch.randn(VOCAB, WIDTH, generator=generator) * 0.5)

    def forward(self, input_ids, attention_mask=None, **_):
        return self.embed[input_ids]

    def output_projection(self, hidden):
        return OutputProjection(hidden, self.head, None, None)


def objectives(z_loss):
    return {"clm": CausalLM(ClmConfig(z_loss=z_loss)),
            "mlm": MaskedLM(MlmConfig(z_loss=z_loss, mask_rate=0.5), mask_id=1, vocab_size=VOCAB, special_ids={0, 1})}


@pytest.mark.parametrize("kind", ["clm", "mlm"])
def test_training_adds_the_z_term_and_validation_stays_the_cross_entropy(kind):
    model = TinyModel()
    tokens = torch.randint(2, VOCAB, (4, 13), generator=torch.Generator().manual_seed(2))
    raw = {"tokens": tokens, "sample_ids": torch.arange(4)}
    plain, regularised = objectives(0.0)[kind], objectives(0.01)[kind]
    batch = plain.collate(raw, 0)

    loss, metrics = plain.loss(model, batch)
    loss_z, metrics_z = regularised.loss(model, batch)
    projection, targets = plain.predictions(model, batch)
    _, z_term = reference(projection.features, projection.weight, targets, 0.01)
    assert "z_loss" not in metrics
    torch.testing.assert_close(metrics_z["z_loss"], z_term.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(loss_z, loss + z_term, rtol=0, atol=2e-6)
    assert float(z_term.detach()) > 1e-3  # a visible difference, so the equalities below can fail

    val, tokens_plain = mean_loss(model, plain, [raw], torch.device("cpu"))
    val_z, tokens_z = mean_loss(model, regularised, [raw], torch.device("cpu"))
    assert val == val_z and tokens_plain == tokens_z
    assert model.training  # mean_loss put it back


@pytest.mark.parametrize("kind", ["clm", "mlm"])
def test_a_negative_z_loss_is_one_line_naming_the_field(kind):
    with pytest.raises(ConfigError, match=r"^objective\.z_loss: must be >= 0 \(PaLM used 1e-4\), got -0\.1$"):
        config.parse(ObjectiveConfig, {"kind": kind, "z_loss": -0.1}, "objective")
    assert config.parse(ObjectiveConfig, {"kind": kind, "z_loss": 1e-4}, "objective").z_loss == 1e-4


def test_distillation_refuses_a_z_loss_it_would_not_use():
    from slmforge import config
    from slmforge.distill.config import DistillRunConfig
    from slmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^objective.z_loss: distillation does not add the z-loss"):
        config.from_dict(DistillRunConfig, {"distill": {"teacher": "t"}, "objective": {"kind": "clm", "z_loss": 1e-4}})
    config.from_dict(DistillRunConfig, {"distill": {"teacher": "t"}, "objective": {"kind": "clm"}})
