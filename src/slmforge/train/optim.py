"""The optimizer (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedule as a pure function of the step.

optim.kind = "adamw": one torch.optim.AdamW, matrices in a decaying group, vectors (norms, biases) in one
without decay.

Two switches regroup AdamW's parameters: optim.decay_embeddings = false moves the embeddings (every
nn.Embedding, and the untied output head) into the group without decay; optim.lr_width_base (adamw only)
puts the blocks' hidden matrices in a third group that steps at lr x lr_width_base / hidden_size (muP's
1/width rule for Adam; Yang et al. 2022, "Tensor Programs V"). Restored through torch.distributed.checkpoint
(by parameter names), a checkpoint written with other groups loads each parameter's moments into the group
that holds it now, and the config's group settings are applied (train/resume_check.apply_optimizer_settings).

optim.kind = "muon": torch.optim.Muon (torch >= 2.9) orthogonalises the update of each 2-D weight of an
nn.Linear inside the transformer blocks (`model.layers`: attention and MLP projections); AdamW keeps
everything else: the embeddings, the output head (tied or not), norms, biases, an MLM head's transform,
an objective's own parameters and LoRA adapters. Both sit in one `MuonWithAdamW`, a torch.optim.Optimizer
whose param_groups are AdamW's (decaying matrices first, then the rest) followed by Muon's, so the
trainer, gradient clipping and checkpoints (torch.distributed.checkpoint's optimizer state, keyed by
parameter names) handle it like a plain AdamW.

The schedule sets every group's "lr" to the AdamW curve (optim.lr x the schedule's factor); Muon's group
steps with that times muon_lr / lr, so each kind follows the same curve from its own peak, and the
width-scaled group with that times lr_width_base / hidden_size (GroupLrScales). In both, the group's "lr"
holds the schedule's value outside step(), which the state and the logs show.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from slmforge.errors import SlmforgeError
from slmforge.train.config import MUON_TORCH, OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over trainable parameters (matrices decay, vectors do not); with optim.kind = "muon", Muon for
    the blocks' hidden matrices and AdamW for the rest (see the module docstring)."""
    fused = device_type == "cuda" if cfg.fused == "auto" else cfg.fused == "on"
    groups = parameter_groups(model, cfg.kind, decay_embeddings=cfg.decay_embeddings,
                              width_scaled=cfg.lr_width_base > 0)
    # Only groups with parameters: torch.distributed.checkpoint maps a checkpoint's groups onto these by
    # parameter names, which it refuses where a group is empty and the checkpoint's layout differs.
    roles = [role for role in ADAMW_ROLES if groups[role]]
    adamw = torch.optim.AdamW(
        [{"params": [p for _, p in groups[role]], "weight_decay": cfg.weight_decay if role != "no_decay" else 0.0}
         for role in roles], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    adamw.group_roles = roles  # what group_settings reads: not kept in the groups, which a checkpoint replaces
    if groups["width_scaled"]:
        scale = width_lr_scale(model, cfg.lr_width_base)
        GroupLrScales(adamw, [scale if role == "width_scaled" else 1.0 for role in roles])
    if cfg.kind == "adamw":
        return adamw
    muon_class = muon_available()
    _refuse_sharded(model)
    if not groups["muon"]:
        lora = any("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
        raise SlmforgeError('optim.kind: "muon" found no trainable hidden matrix to orthogonalise'
                            + (" (LoRA trains only its adapters, which stay on AdamW)" if lora else "")
                            + '; use optim.kind = "adamw"')
    # The group's lr is the AdamW curve the trainer sets; MuonWithAdamW.step scales it to muon_lr's.
    muon = muon_class([p for _, p in groups["muon"]], lr=cfg.lr, weight_decay=cfg.muon_weight_decay,
                      momentum=cfg.muon_momentum, adjust_lr_fn=cfg.muon_adjust_lr_fn)
    return MuonWithAdamW(adamw, muon, muon_lr_scale=cfg.muon_lr / cfg.lr)


# AdamW's groups, in this order, those with parameters (parameter_groups).
ADAMW_ROLES = ("decay", "no_decay", "width_scaled")


def muon_available() -> type[torch.optim.Optimizer]:
    """BatchedMuon (torch.optim.Muon with same-shape matrices orthogonalised together: train/muon.py), or a
    one-line refusal naming the torch it needs."""
    if getattr(torch.optim, "Muon", None) is None:
        raise SlmforgeError(f'optim.kind: "muon" needs torch >= {MUON_TORCH} (torch.optim.Muon); this is torch '
                            f'{torch.__version__}: upgrade torch or use optim.kind = "adamw"')
    from slmforge.train.muon import BatchedMuon

    return BatchedMuon


def _refuse_sharded(model: nn.Module) -> None:
    """Muon orthogonalises whole matrices; FSDP2 leaves each rank a shard (a DTensor) of each."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise SlmforgeError('optim.kind: "muon" orthogonalises whole matrices, and parallel.strategy = "fsdp" '
                            'shards them across ranks; use parallel.strategy = "ddp" (or one process), or '
                            'optim.kind = "adamw"')


def _family_model(model: nn.Module) -> nn.Module | None:
    """The family's model (the one with `layers`: every family has them): `model` itself, or `model.model`
    when the objective's own parameters train beside it (the trainer's _ModelAndObjective)."""
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, nn.Module) and getattr(candidate, "layers", None) is not None:
            return candidate
    return None


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (`layers` of the family's model)."""
    family = _family_model(model)
    return list(family.layers) if family is not None else []


def width_lr_scale(model: nn.Module, lr_width_base: int) -> float:
    """lr_width_base / the model's hidden size: muP's lr factor for Adam on hidden matrices, whose
    per-coordinate updates otherwise grow the layer's output change linearly with its fan-in."""
    family = _family_model(model)
    width = getattr(getattr(family, "cfg", None), "hidden_size", None)
    if not isinstance(width, int) or width <= 0:
        raise SlmforgeError("optim.lr_width_base: this model has no cfg.hidden_size to scale by; set it to 0")
    return lr_width_base / width


def embedding_weights(model: nn.Module) -> set[int]:
    """ids of the embeddings: every nn.Embedding's weight (token, position, token type, T5's relative
    position bias) and the untied output head (the families' `lm_head`, an nn.Linear; a tied head is
    the token embedding itself)."""
    ids = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] == "lm_head"):
            ids.add(id(module.weight))
    return ids


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the trainable weights Muon takes: each nn.Linear's weight inside a transformer block
    (attention and MLP projections), except LoRA adapters (`lora_A`, `lora_B`: they stay on AdamW)."""
    ids = set()
    for block in _blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and "lora_" not in name and module.weight.requires_grad \
                    and module.weight.ndim == 2:
                ids.add(id(module.weight))
    return ids


def parameter_groups(model: nn.Module, kind: str = "adamw", decay_embeddings: bool = True,
                     width_scaled: bool = False) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable (name, parameter) pairs by group: "muon" (the hidden matrices; empty for adamw),
    "width_scaled" (adamw's hidden matrices when their lr scales with width; else empty), "decay"
    (AdamW's other matrices: embeddings, an untied head, an MLM head's transform, LoRA adapters) and
    "no_decay" (AdamW's vectors: norms, biases; and the embeddings unless decay_embeddings)."""
    hidden = hidden_matrices(model) if kind == "muon" or width_scaled else set()
    hidden_group = "muon" if kind == "muon" else "width_scaled"
    embeddings = set() if decay_embeddings else embedding_weights(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "width_scaled": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in hidden:
            group = hidden_group
        else:
            group = "decay" if p.ndim >= 2 and id(p) not in embeddings else "no_decay"
        groups[group].append((name, p))
    return groups


class GroupLrScales:
    """Steps each param group of `optimizer` at its "lr" times its scale, and puts the scheduled value
    back after the step (step hooks: whoever sets the schedule's lr, the trainer or distillation's
    control twin, needs to know nothing of it). The scales come from the config at build time, never
    from a checkpoint, so a resumed run steps as a straight one does."""

    def __init__(self, optimizer: torch.optim.Optimizer, scales: list[float]):
        self.scales = scales
        self.scheduled: list[float] = []
        optimizer.register_step_pre_hook(self.before)
        optimizer.register_step_post_hook(self.after)

    def before(self, optimizer, args, kwargs) -> None:
        self.scheduled = [group["lr"] for group in optimizer.param_groups]
        for group, scale in zip(optimizer.param_groups, self.scales):
            group["lr"] = group["lr"] * scale

    def after(self, optimizer, args, kwargs) -> None:
        for group, lr in zip(optimizer.param_groups, self.scheduled):
            group["lr"] = lr


class _States(Mapping):
    """The per-parameter state of several optimizers as one read-only mapping (no defaultdict look-up
    that would add a foreign parameter to one of them)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self._optimizers = optimizers

    def __getitem__(self, param):
        for optimizer in self._optimizers:
            if param in optimizer.state:
                return optimizer.state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


class MuonWithAdamW(torch.optim.Optimizer):
    """AdamW and Muon as one optimizer: param_groups, state, step, zero_grad, state_dict and
    load_state_dict span both (AdamW's groups first), so code written for one optimizer works unchanged.

    Every group's "lr" is the AdamW schedule's value; step() runs Muon's groups at that times
    `muon_lr_scale` (muon_lr / lr) and puts the value back, so the state and the logs hold the schedule's.
    """

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer, muon_lr_scale: float):
        # torch.optim.Optimizer.__init__ is not called: the parts hold the parameters, hooks and state.
        self.adamw, self.muon = adamw, muon
        self.optimizers = [adamw, muon]
        self.muon_lr_scale = muon_lr_scale
        self.defaults: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"MuonWithAdamW(muon_lr_scale={self.muon_lr_scale:g},\n{self.adamw!r},\n{self.muon!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [*self.adamw.param_groups, *self.muon.param_groups]

    @property
    def state(self) -> Mapping:  # type: ignore[override]
        return _States(self.optimizers)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise SlmforgeError("MuonWithAdamW: add the group to its .adamw or .muon part")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        scheduled = [group["lr"] for group in self.muon.param_groups]
        try:
            for group, lr in zip(self.muon.param_groups, scheduled):
                group["lr"] = lr * self.muon_lr_scale
            self.muon.step()
        finally:
            for group, lr in zip(self.muon.param_groups, scheduled):
                group["lr"] = lr
        return loss

    def state_dict(self) -> dict[str, Any]:
        """One state dict: AdamW's groups then Muon's, parameters numbered through both in that order
        (as torch.optim.Optimizer numbers its own groups' parameters)."""
        adamw, muon = self.adamw.state_dict(), self.muon.state_dict()
        offset = sum(len(group["params"]) for group in adamw["param_groups"])
        state = dict(adamw["state"])
        state.update({key + offset: value for key, value in muon["state"].items()})
        groups = [*adamw["param_groups"],
                  *({**group, "params": [i + offset for i in group["params"]]} for group in muon["param_groups"])]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inverse of state_dict(); parameters may be keyed by ids or names (torch.distributed.checkpoint
        hands names), matched to the parts' parameters by order as torch.optim.Optimizer does."""
        groups = state_dict["param_groups"]
        adamw_count = len(self.adamw.param_groups)
        parts = [(self.adamw, groups[:adamw_count], "betas", "ns_steps"),
                 (self.muon, groups[adamw_count:], "ns_steps", "betas")]
        if len(groups) != len(self.param_groups) or any(mark not in group or other in group
                                                        for _, saved, mark, other in parts for group in saved):
            raise kind_mismatch("muon")
        for optimizer, saved, _, _ in parts:
            keys = {key for group in saved for key in group["params"]}
            optimizer.load_state_dict({"state": {k: v for k, v in state_dict["state"].items() if k in keys},
                                       "param_groups": saved})


def check_optimizer_kind(saved: dict[str, Any] | None, kind: str) -> None:
    """Refuse, before loading, a checkpoint's optimizer state written by the other optim.kind (Muon's
    groups carry "ns_steps")."""
    if saved is None:
        return
    written_by_muon = any("ns_steps" in group for group in saved.get("param_groups", []))
    if written_by_muon != (kind == "muon"):
        raise kind_mismatch(kind)


def kind_mismatch(kind: str) -> SlmforgeError:
    other = "adamw" if kind == "muon" else "muon"
    return SlmforgeError(f'optim.kind: the checkpoint\'s optimizer state was written with optim.kind = "{other}", '
                         f'not "{kind}"; resume with optim.kind = "{other}", or start a new train.out_dir from its '
                         f'weights with train.init_from (a fresh optimizer)')


def group_settings(optimizer: torch.optim.Optimizer,
                   cfg: OptimConfig) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """(group, the settings `cfg` gives it, the prefix that names them as config fields) for each param
    group build_optimizer makes: AdamW's betas, eps and weight decay on each (0 on the vectors' group);
    Muon's momentum, weight decay and lr adjustment. A restored optimizer of the other kind is
    refused in one line."""
    adamw = optimizer.adamw if isinstance(optimizer, MuonWithAdamW) else optimizer
    adamw_groups = adamw.param_groups
    muon_groups = optimizer.muon.param_groups if isinstance(optimizer, MuonWithAdamW) else []
    # Restored through torch.distributed.checkpoint (by parameter names), Muon's saved group lends its
    # keys to the AdamW group holding its matrices, and AdamW's to Muon's: either shows here.
    if any("betas" not in g or "ns_steps" in g for g in adamw_groups) or any("ns_steps" not in g or "betas" in g
                                                                           for g in muon_groups):
        raise kind_mismatch(cfg.kind)
    settings = []
    for group, role in zip(adamw_groups, getattr(adamw, "group_roles", ADAMW_ROLES)):
        # every group's decay, as one restored from a checkpoint written with other groups may hold
        # another group's settings (the parameters' states are matched by name, the groups' are not)
        decay = cfg.weight_decay if role != "no_decay" else 0.0
        settings.append((group, {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": decay}, ""))
    for group in muon_groups:
        settings.append((group, {"momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay,
                                 "adjust_lr_fn": cfg.muon_adjust_lr_fn}, "muon_"))
    return settings


def learning_rate(step: int, max_steps: int, optim: OptimConfig, schedule: ScheduleConfig) -> float:
    """Linear warmup to optim.lr, then cosine / linear / no decay to min_lr_ratio * optim.lr, or (wsd) the
    peak held until the last cooldown_ratio of the steps, then a linear or 1-sqrt cooldown to the floor.

    `step` counts optimizer steps already taken, so the first update uses learning_rate(0) > 0. Muon's
    group follows the same curve from muon_lr (MuonWithAdamW.step).
    """
    peak, floor = optim.lr, optim.lr * schedule.min_lr_ratio
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    if schedule.decay == "constant":
        return peak
    if schedule.decay == "wsd":
        start = cooldown_start(max_steps, schedule)
        if step < start:
            return peak
        progress = min((step - start) / max(max_steps - start, 1), 1.0)
        if schedule.cooldown_shape == "1-sqrt":
            return floor + (peak - floor) * (1 - math.sqrt(progress))
        return peak - (peak - floor) * progress
    span = max(max_steps - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / span, 1.0)
    if schedule.decay == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def cooldown_start(max_steps: int, schedule: ScheduleConfig) -> int:
    """The first step of a wsd schedule's cooldown: the last round(cooldown_ratio x max_steps) steps cool
    down, never before the warmup ends."""
    return max(max_steps - round(schedule.cooldown_ratio * max_steps), schedule.warmup_steps)
