"""Reading raw text: sources (text, JSONL, Parquet, compressed, HF datasets), language mixtures, sampling.

Below both `tokenizer` (which samples sentences to train on) and `data` (which encodes them into shards).
"""
