"""Generation with encoder-decoders (greedy, sampling, beam search): it lives in
`slmforge.inference.seq2seq`, beside the decoder engine; the names stay importable from here."""

from slmforge.inference.seq2seq import Choose, Seq2SeqConfig, Seq2SeqEngine, generate_seq2seq

__all__ = ["Choose", "Seq2SeqConfig", "Seq2SeqEngine", "generate_seq2seq"]
