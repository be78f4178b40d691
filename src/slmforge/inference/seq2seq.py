"""Generation with encoder-decoders: greedy, sampling and beam search, and `Seq2SeqEngine`, which
decodes sources of different lengths in padded batches (the encoder-decoder side of the engine).

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
from slmforge.inference.engine import Completion
from slmforge.inference.sampling import SamplingParams, next_token
from slmforge.models.registry import family

Choose = Callable[[torch.Tensor, torch.Tensor, "Seq2SeqConfig", torch.Generator | None], torch.Tensor]
"""A sampling rule: (logits (B, V), tokens so far (B, T), config, generator) -> next ids (B,).
`inference.sampling.next_token` (temperature, top-k, top-p, repetition penalty) is the one
`Seq2SeqEngine` and `generate.generate_ids` pass."""


@dataclass
class Seq2SeqConfig(SamplingParams):
    """SamplingParams (the same fields and defaults: greedy unless temperature > 0) plus beam search.
    Stop strings, stop_token_ids and the decoder-only switches (threads, caches, compile) are not read here."""

    num_beams: int = 1
    """Beam search with this many hypotheses per source (1 = greedy or sampling)."""
    length_penalty: float = 1.0
    """Beam search: finished hypotheses are ranked by log-probability / length ** length_penalty."""
    early_stopping: bool = True
    """Beam search: stop a source as soon as it has num_beams finished hypotheses."""

    def validate(self) -> None:
        super().validate()
        require(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
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
        raise SlmforgeError("sampling with an encoder-decoder goes through slmforge.inference.generate.generate_ids "
                            "(which supplies the sampling rule), or pass choose=slmforge.inference.generate.next_token")
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


class Seq2SeqEngine:
    """An encoder-decoder's generations for many sources (ids, each ending in eos as span corruption and
    translation laid them out), `max_batch` at a time, right-padded for the encoder with its mask:
    greedy, sampling (`next_token`) or beam search, by the params' fields. Each source gets what it
    gets alone with greedy decoding and beam search (tested); sampling draws from one generator per
    batch (seeded by `seed`), so a sampled source depends on its batch mates."""

    def __init__(self, model, tokenizer=None, max_batch: int = 16, pad_id: int = 0):
        if family(model.cfg).kind != "encoder-decoder":
            raise SlmforgeError(f"Seq2SeqEngine decodes with encoder-decoders; {model.cfg.family!r} is not one")
        self.model, self.tokenizer, self.max_batch, self.pad_id = model.eval(), tokenizer, max_batch, pad_id
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None

    @torch.no_grad()
    def generate(self, sources: list[list[int]], params: Seq2SeqConfig | None = None,
                 eos_id: int | None = None) -> list[Completion]:
        params = params or Seq2SeqConfig()
        eos = eos_id if eos_id is not None else self.eos_id
        completions = []
        for start in range(0, len(sources), self.max_batch):
            batch = sources[start:start + self.max_batch]
            for source, ids in zip(batch, self._batch(batch, params, eos)):
                ended = eos is not None and params.stop_at_eos and eos in ids
                ids = ids[:ids.index(eos) + 1] if ended else ids
                text = ""
                if self.tokenizer is not None:
                    text = self.tokenizer.decode(ids[:-1] if ended else ids)
                completions.append(Completion(ids, text, "stop" if ended else "length", len(source), len(ids)))
        return completions

    def _batch(self, sources: list[list[int]], params: Seq2SeqConfig, eos: int | None) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(s) for s in sources)
        input_ids = torch.full((len(sources), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sources), width), dtype=torch.long)
        for row, ids in enumerate(sources):
            input_ids[row, :len(ids)] = torch.as_tensor(ids)
            mask[row, :len(ids)] = 1
        # An unpadded batch needs no mask: the same computation, with fewer masked-attention paths.
        padded = bool((mask == 0).any())
        out = generate_seq2seq(self.model, input_ids.to(device), params, eos_id=eos,
                               attention_mask=mask.to(device) if padded else None, choose=next_token)
        return out.tolist()
