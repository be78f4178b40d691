"""slmforge against `transformers` (and plain baselines), measured in the same run.

    python -m benchmarks                      # CPU: tiny shapes, a few minutes
    python -m benchmarks --device cuda        # GPU: the real shapes (Gemma 3 270M, Llama 124M, ...)
    python -m benchmarks --shapes smoke       # seconds; what CI runs so the suite cannot rot

One module per measurement (training, decoding, loss, data); `shapes` names what each measures at
which size; `common` holds timing (interleaved rounds, medians, wall and CPU time), peak memory, the
measured matmul rate behind MFU, and the report (one table of slmforge / baseline ratios, also
written as JSON and Markdown). The older single-purpose scripts (`bench_*.py`) stay runnable on
their own.
"""
