"""Generation with encoder-decoders: greedy, sampling and beam search.

The source is encoded once. With the cache (the default), each step feeds only the newest token to the
decoder: its self-attention keys/values accumulate in a preallocated cache and the cross-attention
keys/values of the encoder output are projected at the first step and reused. Without it, every step
runs the decoder over the whole target so far (the baseline the cache is measured against).

Outputs are the generated ids (B, new) without the decoder start token; a sequence that ended is
filled with eos after its end, as `generate.generate_ids` does.

Beam search keeps `num_beams` hypotheses per source, scored by their summed log-probabilities; a
finished hypothesis (one that emits eos from among the top `num_beams` candidates) is ranked by
sum / length ** length_penalty, length counting its tokens and eos. With `early_stopping` a source is
done once it holds `num_beams` finished hypotheses; without, once no running beam can still beat the
worst of them at its current length (transformers' default heuristic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from slmforge.config import require
from slmforge.errors import SlmforgeError
from slmforge.models.registry import family

Choose = Callable[[torch.Tensor, torch.Tensor, "Seq2SeqConfig", torch.Generator | None], torch.Tensor]
"""A sampling rule: (logits (B, V), tokens so far (B, T), config, generator) -> next ids (B,).
`generate.next_token` (temperature, top-k, top-p, repetition penalty) is the one `generate.generate_ids`
passes; this module does not import it, so generate.py can dispatch here without an import cycle."""


@dataclass
class Seq2SeqConfig:
    max_new_tokens: int = 100
    """Target tokens to generate at most (eos included)."""
    temperature: float = 0.0
    """Softmax temperature; 0 = greedy (always the most likely token). Not used by beam search."""
    top_k: int = 0
    """Sample only among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches p (1 = off)."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already generated (CTRL-style)."""
    num_beams: int = 1
    """Beam search with this many hypotheses per source (1 = greedy or sampling)."""
    length_penalty: float = 1.0
    """Beam search: finished hypotheses are ranked by log-probability / length ** length_penalty."""
    early_stopping: bool = True
    """Beam search: stop a source as soon as it has num_beams finished hypotheses."""
    stop_at_eos: bool = True
    """Stop a sequence when it produces the end-of-sequence token."""
    seed: int | None = None
    """Seed for sampling."""

    def validate(self) -> None:
        require(self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.num_beams == 1 or self.repetition_penalty == 1.0, "repetition_penalty",
                "is not applied by beam search; leave it at 1 with num_beams > 1")


def _check(model, cfg: Seq2SeqConfig, input_ids: torch.Tensor) -> int:
    if family(model.cfg).kind != "encoder-decoder":
        raise SlmforgeError(f"model family {model.cfg.family!r} is not an encoder-decoder; use generate.generate_ids")
    cfg.validate()
    room = model.cfg.max_seq_len - 1  # the decoder start token takes one position
    if input_ids.shape[1] > model.cfg.max_seq_len:
        raise SlmforgeError(f"source of {input_ids.shape[1]} tokens exceeds the model's max_seq_len "
                            f"({model.cfg.max_seq_len})")
    return min(cfg.max_new_tokens, room)


@torch.no_grad()
def generate_seq2seq(model, input_ids: torch.Tensor, cfg: Seq2SeqConfig, eos_id: int | None = None,
                     attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                     choose: Choose | None = None) -> torch.Tensor:
    """Targets (B, new) for sources `input_ids` (B, S) (attention_mask (B, S): 1 = token).

    Greedy and beam search need nothing more; sampling (temperature > 0, a repetition penalty) needs
    the rule `choose` (see `Choose`; `generate.generate_ids` supplies it)."""
    steps = _check(model, cfg, input_ids)
    sampling = cfg.num_beams == 1 and (cfg.temperature > 0 or cfg.repetition_penalty != 1.0)
    if choose is None and sampling:
        raise SlmforgeError("sampling with an encoder-decoder goes through slmforge.generate.generate_ids (which "
                            "supplies the sampling rule), or pass choose=slmforge.generate.next_token")
    model.eval()
    encoded = model.encode(input_ids, attention_mask)  # once per source
    if cfg.num_beams > 1:
        return _beam_search(model, encoded, attention_mask, cfg, steps, eos_id, use_cache)
    device = input_ids.device
    B = input_ids.shape[0]
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    tokens = torch.full((B, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=device)
    cache = model.new_cache(B, steps + 1) if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(steps):
        step_input = tokens[:, -1:] if use_cache else tokens
        hidden = model.decode(step_input, encoded, attention_mask, cache=cache)
        logits = model.logits(hidden[:, -1])  # (B, V): the last position only
        chosen = choose(logits, tokens, cfg, generator) if choose is not None else logits.argmax(dim=-1)
        if eos_id is not None and cfg.stop_at_eos:
            chosen = torch.where(finished, torch.full_like(chosen, eos_id), chosen)
            finished |= chosen == eos_id
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        if bool(finished.all()):
            break
    return tokens[:, 1:]


def _beam_search(model, encoded: torch.Tensor, attention_mask: torch.Tensor | None, cfg: Seq2SeqConfig,
                 steps: int, eos_id: int | None, use_cache: bool) -> torch.Tensor:
    B, K, device = encoded.shape[0], cfg.num_beams, encoded.device
    # Beams of source b are rows b*K .. b*K + K-1 of every tensor below.
    encoded = encoded.repeat_interleave(K, dim=0)  # (B*K, S, d)
    memory_mask = attention_mask.repeat_interleave(K, dim=0) if attention_mask is not None else None
    tokens = torch.full((B * K, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand the first one only
    cache = model.new_cache(B * K, steps + 1) if use_cache else None
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    stop = eos_id if cfg.stop_at_eos else None
    for step in range(steps):
        hidden = model.decode(tokens[:, -1:] if use_cache else tokens, encoded, memory_mask, cache=cache)
        logits = model.logits(hidden[:, -1]).float()
        V = logits.shape[-1]
        candidates = (scores.view(-1, 1) + F.log_softmax(logits, dim=-1)).view(B, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # 2K: enough to keep K beams without eos
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        rows, next_tokens, next_scores = [], [], []
        fill = stop if stop is not None else 0
        for b in range(B):
            kept = 0
            if not done[b]:
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    beam, token = divmod(index, V)
                    if stop is not None and token == stop:
                        if rank < K:  # only eos among the top K candidates finishes a hypothesis
                            sequence = tokens[b * K + beam, 1:].tolist() + [token]
                            finished[b].append((score / len(sequence) ** cfg.length_penalty, sequence))
                        continue
                    rows.append(b * K + beam)
                    next_tokens.append(token)
                    next_scores.append(score)
                    kept += 1
                    if kept == K:
                        break
            # A finished source (or, with a tiny vocabulary, one short of candidates) keeps rows that
            # are out of the race: score -inf.
            rows.extend(range(b * K + kept, b * K + K))
            next_tokens.extend([fill] * (K - kept))
            next_scores.extend([float("-inf")] * (K - kept))
            if done[b]:
                continue
            finished[b] = sorted(finished[b], key=lambda item: -item[0])[:K]
            if len(finished[b]) >= K:
                if cfg.early_stopping:
                    done[b] = True
                else:  # can the best running beam, at its current length, still beat the worst finished?
                    best_running = max(next_scores[-K:]) / (step + 1) ** cfg.length_penalty
                    done[b] = best_running <= finished[b][-1][0]
        index = torch.tensor(rows, device=device)
        tokens = torch.cat([tokens[index], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device).view(B, K)
        if cache is not None:
            cache.reorder(index)
        if all(done):
            break
    results = []
    for b in range(B):
        pool = list(finished[b])
        if not done[b]:  # out of steps: running beams count as they are
            for k in range(K):
                score = float(scores[b, k])
                if score > float("-inf"):
                    sequence = tokens[b * K + k, 1:].tolist()
                    pool.append((score / len(sequence) ** cfg.length_penalty, sequence))
        results.append(max(pool, key=lambda item: item[0])[1])
    width = max(len(sequence) for sequence in results)
    fill = stop if stop is not None else 0
    out = torch.full((B, width), fill, dtype=torch.long, device=device)
    for b, sequence in enumerate(results):
        out[b, :len(sequence)] = torch.tensor(sequence, device=device)
    return out
