"""SentencePiece `.model` -> `tokenizers` pipeline that gives SentencePiece's own ids.

Reads the model protobuf (shipped with the `sentencepiece` package) and rebuilds what
`SentencePieceProcessor.encode` does: the precompiled normalization rules (e.g. nmt_nfkc), removal of
extra whitespace, the dummy '▁' prefix, spaces as '▁', then Unigram (Viterbi over the scored pieces)
or BPE (merge the adjacent pair whose result scores highest), with byte fallback when trained so.
Control pieces (<s>, </s>, <pad>) become special tokens, user-defined symbols plain added tokens.

`tokenizers`' `Precompiled` normalizer skips SentencePiece's compositions of decomposed Indic vowel
signs, nukta letters and kana (transformers' converters share that); we compose those first, see
`_missed_compositions`. Known gaps left, also inside `Precompiled`: a combining mark right after a
no-break space is dropped, and text typed fully decomposed with stacked marks (Vietnamese ệ as
e + ◌̣ + ◌̂, polytonic Greek, Hangul jamo) is not composed as SentencePiece composes it. NFC text
has neither the second nor the third, and rarely the first.
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from slmforge.errors import SlmforgeError

# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "▁"  # U+2581, SentencePiece's visible space


def read_model_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise SlmforgeError(f"{path}: importing a SentencePiece model needs the `sentencepiece` and "
                            f"`protobuf` packages (pip install 'slmforge[hf]'): {e}") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise SlmforgeError(f"{path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise SlmforgeError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def convert_sentencepiece(path: str | Path) -> tuple[BackendTokenizer, dict[str, str | None]]:
    """The converted pipeline and its special-token roles (bos/eos/pad/unk from the trainer spec)."""
    path = Path(path)
    proto = read_model_proto(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.treat_whitespace_as_suffix:
        raise SlmforgeError(f"{path}: treat_whitespace_as_suffix models are not supported")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk_id = spec.unk_id if 0 <= spec.unk_id < len(pieces) else None
    if spec.model_type == UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id,
                               byte_fallback=spec.byte_fallback)
    elif spec.model_type == BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(vocab, _bpe_merges(pieces, vocab), fuse_unk=True,
                           unk_token=pieces[unk_id][0] if unk_id is not None else None,
                           byte_fallback=spec.byte_fallback)
    else:
        raise SlmforgeError(f"{path}: SentencePiece model type {spec.model_type} (word/char) "
                            f"is not supported; only unigram and bpe")

    backend = BackendTokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps += _missed_compositions(proto)
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        # SentencePiece only counts ' ' as whitespace here (after its own normalization rules).
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never",
                                                     split=spec.split_by_whitespace)
    decode = [decoders.Replace(SPACE, " ")]
    if spec.byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)

    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, _, t in pieces if t in (UNKNOWN, CONTROL)])
    backend.add_tokens([AddedToken(p, special=False, normalized=False)
                        for p, _, t in pieces if t == USER_DEFINED])

    def role(piece_id: int) -> str | None:
        return pieces[piece_id][0] if 0 <= piece_id < len(pieces) else None

    roles = {"bos": role(spec.bos_id), "eos": role(spec.eos_id), "pad": role(spec.pad_id),
             "unk": role(spec.unk_id), "mask": None}
    return backend, roles


@functools.lru_cache(maxsize=None)
def _wide_compositions() -> list[tuple[str, str]]:
    """(decomposed, composed) for every canonical composite whose parts are all characters of 3+
    UTF-8 bytes, longest first: two-part vowel signs (Bengali ো = ে + া, ৌ; Oriya; Tamil ொ ோ ௌ;
    Telugu; Kannada ೀ ೇ ೈ ೊ ೋ; Malayalam; Sinhala; Myanmar ဦ; Balinese; Kaithi, Chakma, Grantha,
    Tirhuta, Siddham, Dives Akuru), the nukta letters ऩ ऱ ऴ, and kana with a (semi-)voiced mark."""
    pairs = []
    for cp in range(0x20000):  # no canonical composite lies above the SMP
        composed = chr(cp)
        decomposed = unicodedata.normalize("NFD", composed)
        if (len(decomposed) > 1 and unicodedata.normalize("NFC", decomposed) == composed
                and not 0xAC00 <= cp <= 0xD7A3  # Hangul syllables: 11,172 jamo sequences; see below
                and all(ord(c) >= 0x800 for c in decomposed)):
            pairs.append((decomposed, composed))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _missed_compositions(proto) -> list[normalizers.Normalizer]:
    """Replace steps, placed before `Precompiled`, for the compositions it skips and SentencePiece makes.

    `tokenizers`' `Precompiled` looks a grapheme cluster up whole only when it is shorter than 6
    UTF-8 bytes, and otherwise maps each character alone, so a rule for a sequence of 3-byte
    characters (Bengali ো typed as ে + া, U+09C7 U+09BE) never fires: ঘোষ became ['▁ঘ', 'ে', 'া',
    'ষ'] where SentencePiece, which matches the longest rule at every position, gives ['▁ঘ', 'োষ'].
    Composing those sequences first makes the two agree. NFC would compose them too, but it also
    reorders combining marks, which SentencePiece does not (Vietnamese and Burmese UDHR text, Arabic
    shadda + vowel typed in that order). Only compositions this model's own normalizer makes are
    added, asked of SentencePiece itself. Hangul jamo sequences (Korean typed decomposed) stay a
    gap: one rule per syllable would be 11,172 passes over the text.
    """
    import sentencepiece

    spm_normalize = sentencepiece.SentencePieceNormalizer(
        model_proto=proto.SerializeToString(), add_dummy_prefix=False, escape_whitespaces=False,
        remove_extra_whitespaces=False).normalize
    return [normalizers.Replace(decomposed, composed) for decomposed, composed in _wide_compositions()
            if spm_normalize(decomposed) == spm_normalize(composed)]


def _bpe_merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE has no merge list: encoding repeatedly joins the adjacent pair whose
    joined piece has the highest score. Every split of a piece into two known pieces is such a
    merge; ranking them by the joined piece's score reproduces that order."""
    merges = []
    for piece, score, kind in pieces:
        if kind != NORMAL:  # user-defined symbols are matched whole, never merged
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]
