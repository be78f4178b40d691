"""`SlmforgeLM`: an lm-eval `LM` answered by a slmforge run's own model (see `harness.py`).

Imports lm_eval at module level: import it only through `harness.backend_for`, which says how to
install lm-eval when it is missing.
"""

from __future__ import annotations

from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from slmforge.errors import SlmforgeError
from slmforge.eval.harness import (
    continuation_logprobs,
    encdec_continuation_logprobs,
    generate_until,
)
from slmforge.models.registry import family

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend's default


class SlmforgeLM(TemplateLM):
    """Requests in lm-eval's text form, answered with `run.model` and `run.tokenizer()`.

    Tokenization mirrors lm-eval's HF backend on the exported model: `tok_encode` adds bos when the run
    was trained with one (meta.json `add_bos`, default true) unless the text already starts with it;
    an empty context is the prefix token (bos, or eos for a run without bos); an encoder-decoder's
    source ends with eos, as its training sources and the exported tokenizer do."""

    def __init__(self, run, batch_size: int = 8, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        super().__init__()
        self.run = run
        self.model = run.model.eval()
        self.tokenizer_ = run.tokenizer()
        self.kind = family(self.model.cfg).kind
        if self.kind not in ("decoder", "encoder-decoder"):
            raise SlmforgeError(f"{run.step_dir}: lm-eval tasks need a decoder or an encoder-decoder, "
                                f"this is a {self.model.cfg.family} {self.kind}")
        self.backend = "causal" if self.kind == "decoder" else "seq2seq"
        self.add_bos = run.info.add_bos and self.tokenizer_.bos_id is not None
        self._batch_size = int(batch_size)
        self._max_gen_toks = max_gen_toks
        self._device = run.device
        tok = self.tokenizer_
        self.pad_id = next((i for i in (tok.pad_id, tok.eos_id, 0) if i is not None), 0)
        if self.kind == "decoder":
            self._prefix = tok.bos_id if self.add_bos else (tok.eos_id if tok.eos_id is not None else tok.bos_id)
        else:  # as lm-eval's HF backend chooses: bos if the tokenizer has one, else eos
            self._prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if self._prefix is None:
            raise SlmforgeError(f"{run.step_dir}: the tokenizer has neither bos nor eos; lm-eval needs one "
                                f"to condition a text with no context on")

    # ------------------------------------------------------------ what lm-eval asks of an LM

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id if self.tokenizer_.eos_id is not None else self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"slmforge-{self.tokenizer_.sha256[:16]}"

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "model_family": self.model.cfg.family, "checkpoint": str(self.run.step_dir),
                "add_bos": self.add_bos}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        tok = self.tokenizer_
        special = add_special_tokens
        if special is None:  # the run's convention, unless the text already begins with bos
            bos_text = tok.decode([self._prefix], skip_special=False) if self.kind == "decoder" else None
            special = not (bos_text and string.startswith(bos_text))
        ids = tok.encode(string)
        if not special:
            return ids
        if self.kind == "decoder":
            return [tok.bos_id] + ids if self.add_bos else ids
        return ids + ([tok.eos_id] if tok.eos_id is not None else [])  # a source: text eos

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer_.decode(ids, skip_special=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) text or None, context ids, continuation ids)."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        score = continuation_logprobs if self.kind == "decoder" else encdec_continuation_logprobs
        answers = score(self.model, pairs, self.batch_size, self.max_length, self.pad_id)
        for (text, _, _), answer in zip(requests, answers):
            if text is not None:
                self.cache_hook.add_partial("loglikelihood", text, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in lm-eval's windows of the model's context (every token
        predicted once, the first from the prefix token); all windows of all texts batched together."""
        windows, owners = [], []
        for index, (string,) in enumerate(tqdm([r.args for r in requests], disable=disable_tqdm)):
            tokens = self.tok_encode(string)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampled where the task asks for do_sample), cut at the task's stop
        strings and eos; contexts of one batch share their generation settings."""
        if self.kind != "decoder":
            raise SlmforgeError("generate_until tasks need a decoder; this run is an encoder-decoder "
                                "(its log-likelihood tasks run, generation tasks do not yet)")
        from slmforge.inference.generate import SamplingConfig

        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        answers: list[str | None] = [None] * len(requests)
        # Group by settings (as lm-eval does).
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        encoded = [self.tok_encode(r.args[0]) for r in requests]
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise SlmforgeError(f"a task asks for {max_gen} new tokens; the model's context is "
                                    f"{self.max_length}")
            sampling = SamplingConfig(temperature=0.0)
            if kwargs.get("do_sample"):
                sampling = SamplingConfig(temperature=float(kwargs.get("temperature") or 1.0),
                                          top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
            # the inference engine: the group's prompts share its batch, rows refilled as others end
            prompts = [encoded[i][-(self.max_length - max_gen):] for i in members]
            texts = generate_until(self.model, self.tokenizer_, prompts, max_gen, until, self.tokenizer_.eos_id,
                                   sampling, seed=kwargs.get("seed"), batch_size=self.batch_size)
            for index, text in zip(members, texts):
                text = postprocess_generated_text(text, until, None)
                answers[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
            progress.update(len(members))
        progress.close()
        return answers  # type: ignore[return-value]
