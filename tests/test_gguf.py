"""`slmforge export --format gguf`: llama.cpp (through llama-cpp-python) reads the file as slmforge
wrote it: the same token ids on multilingual text for every tokenizer kind that is exported, the same
greedy continuation in f32 for each decoder family, and q8_0 / f16 files that load and generate. Kinds
llama.cpp cannot reproduce are refused with the measured mismatch, and llama.cpp itself confirms the
mismatch is real.

Without `llama_cpp` the llama.cpp checks skip (saying so); the refusals, the Python model of llama.cpp's
tokenizers on its own, and the command line run wherever the `gguf` package is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch

from conftest import randomize_weights

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'slmforge[gguf]')")

from slmforge.checkpoint.writing import save_checkpoint  # noqa: E402
from slmforge.cli import main  # noqa: E402
from slmforge.errors import SlmforgeError  # noqa: E402
from slmforge.interop import gguf as ggufx  # noqa: E402
from slmforge.models import DecoderConfig, build_model  # noqa: E402
from slmforge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer  # noqa: E402

try:
    import llama_cpp
except ImportError:  # the reason is shown in the skip line
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(
    llama_cpp is None, reason="llama-cpp-python is not installed (pip install llama-cpp-python; it builds "
                              "llama.cpp from source): the llama.cpp side of the GGUF checks is skipped")

CORPUS = [unicodedata.normalize("NFC", s) for s in [
    "हिन्दी भारत की राजभाषा है और इसे देवनागरी लिपि में लिखा जाता है।",
    "मैं कल बाज़ार जाऊँगा और ज़रूरी सामान ख़रीदूँगा।",
    "बच्चों ने स्कूल में नई कविता याद की। क्षत्रिय और श्री।",
    "বাংলা ভাষা খুব মিষ্টি। আমি কাল কলকাতায় যাব।",
    "অসমীয়া ভাষা অসমৰ ৰাজ্যিক ভাষা আৰু ইয়াক বহু লোকে কয়।",
    "ব্ৰহ্মপুত্ৰ নদী অসমৰ মাজেৰে বৈ গৈছে।",
    "தமிழ் ஒரு செம்மொழி ஆகும். நான் நாளை சென்னைக்குப் போவேன்.",
    "Die Straße in München ist im Winter sehr schön.",
    "Grüße aus Köln: Wir fahren übermorgen nach Düsseldorf.",
    "The quick brown fox jumps over the lazy dog.",
    "Small language models can be trained on a single machine in 2024.",
    "We measured the results twice before writing the report, 3 times.",
]] * 6

# Text for the comparisons, beyond the exporter's own probe: every script above, digits, emoji,
# whitespace runs, and text the tokenizers never saw.
TEXTS = [unicodedata.normalize("NFC", s) for s in [
    "हिन्दी भाषा में लिखा गया पाठ। किताब मेज़ पर रखी है।",
    "বাংলা আর অসমীয়া: ৰাজ্যিক ভাষা, ব্ৰহ্মপুত্ৰ।",
    "தமிழ் மொழி மிகவும் பழமையானது.",
    "Übermorgen fahren wir über die Brücke.",
    "Numbers 0123456789, 42, 3.14 and १२३ ১২৩ ௧௨௩.",
    "emoji 😀👍🏽🇮🇳 and ✓",
    "   indented    words\tand\ttabs  \n\n\nnew paragraph\r\n",
    "mixed हिन्दी English অসমীয়া Deutsch தமிழ் 😀 7",
    "Кириллица и 中文 и العربية",
]]

EXPORTED_KINDS = {"bpe": {}, "bpe-akshara": {"akshara": True}}
REFUSED_KINDS = {"bytelevel": {}, "unigram": {}, "unigram-akshara": {"akshara": True}}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-tok")
    out = {}
    for name, extra in {**EXPORTED_KINDS, **REFUSED_KINDS}.items():
        cfg = TokenizerConfig(kind=name.split("-")[0], vocab_size=700, **extra)
        out[name] = train_tokenizer(cfg, root / name, CORPUS)
    return out


def tiny_config(family: str, vocab_size: int = 768) -> DecoderConfig:
    """Each family's tiny preset, smaller still; Gemma 3 with a sliding window shorter than the tests'
    sequences, two RoPE bases and soft-capping."""
    common = dict(vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  intermediate_size=96, max_seq_len=128)
    if family == "gemma3":
        return DecoderConfig.from_name("gemma3-tiny", **common, head_dim=32, query_pre_attn_scalar=32.0,
                                       sliding_window=8, global_every=2, final_logit_softcap=30.0)
    if family == "llama":
        return DecoderConfig.from_name("llama-tiny", **common, tie_embeddings=False, rope_scaling="llama3",
                                       rope_scaling_factor=8.0, rope_original_max_seq_len=16)
    return DecoderConfig.from_name(f"{family}-tiny", **common)


def make_run(root: Path, cfg: DecoderConfig, tokenizer_dir: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A run with a randomised checkpoint (weights large enough that every detail moves the logits)."""
    model = build_model(cfg, seed=seed).eval()
    randomize_weights(model, seed, vector_mean=0.0 if cfg.norm_unit_offset else 1.0)
    with torch.no_grad():
        if cfg.embed_scale:  # Gemma multiplies embeddings by sqrt(hidden): without this, a random tied model
            model.embed.weight /= cfg.hidden_size ** 0.5  # only ever repeats its input token
    run = root / "run"
    save_checkpoint(run, 5, model)
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    return run, model


@pytest.fixture
def llama(request):
    """Open GGUF files with llama.cpp (quiet); closed after the test."""
    opened = []

    def open_file(path: Path, **kwargs):
        opened.append(llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs))
        return opened[-1]

    yield open_file
    for llm in opened:
        llm.close()


def llama_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []


# ---------------------------------------------------------------- tokenizers


@needs_llama_cpp
@pytest.mark.parametrize("kind", list(EXPORTED_KINDS))
def test_llama_cpp_tokenizes_like_slmforge(tokenizers, llama, tmp_path, kind):
    run, _ = make_run(tmp_path, tiny_config("llama"), tokenizers[kind])
    out = ggufx.export_gguf(run, tmp_path / "m.gguf")
    assert out.llama_cpp_checked and out.vocab.model == "llama"
    ours = load_tokenizer(tokenizers[kind])
    llm = llama(out.path, vocab_only=True)
    for text in TEXTS + ggufx.PROBE + CORPUS[:12]:
        assert llama_ids(llm, text) == ours.encode(text), text
        assert out.vocab.simulate(text) == ours.encode(text), text  # the Python model of llama.cpp
        # and back: llama.cpp's detokenizer gives the text (slmforge's round trip is exact)
        assert llm.detokenize(ours.encode(text)).decode("utf-8") == text, text
    bos = ours.bos_id
    assert llm.tokenize(b"hello", add_bos=True, special=False)[0] == bos
    assert (llm.token_bos(), llm.token_eos()) == (ours.bos_id, ours.eos_id)


@pytest.mark.parametrize("kind", list(REFUSED_KINDS))
def test_kinds_llama_cpp_cannot_reproduce_are_refused_with_the_rate(tokenizers, tmp_path, kind):
    run, _ = make_run(tmp_path, tiny_config("llama"), tokenizers[kind])
    out = tmp_path / "m.gguf"
    with pytest.raises(ggufx.TokenizerRefused, match=r"not written: ") as refused:
        ggufx.export_gguf(run, out)
    message = str(refused.value)
    assert "\n" not in message and "--format hf" in message
    assert re.search(r"[\d,]+ sample texts \(\d+\.\d%", message), message
    if kind.startswith("unigram"):  # characters outside the vocabulary: always measurable
        assert "has none, so a character outside the vocabulary becomes <unk>" in message
        assert re.search(r"would tokenize [1-9][\d,]* of", message), message
    else:  # our letters+marks split is none of llama.cpp's pre-tokenizers, whatever the sample shows
        assert "pre-tokenizer is none of llama.cpp's" in message and "'qwen35'" in message
    assert not out.exists() and not out.with_name("m.gguf.partial").exists()


@needs_llama_cpp
@pytest.mark.parametrize("kind", list(REFUSED_KINDS))
def test_refused_mismatches_are_what_llama_cpp_does(tokenizers, llama, tmp_path, kind):
    """Write the refused vocabulary anyway (bypassing the check) and let llama.cpp tokenize: it gives
    what the Python model of it predicts, so the rate in the refusal is llama.cpp's own."""
    tokenizer = load_tokenizer(tokenizers[kind])
    cfg = tiny_config("llama")
    texts = ggufx.sample_texts(tokenizer)
    run, model = make_run(tmp_path, cfg, tokenizers[kind])
    data = json.loads(tokenizer.backend.to_str())
    candidates = (ggufx._gpt2_candidates(tokenizer, data, cfg.vocab_size) if kind == "bytelevel"
                  else ggufx._ugm_candidates(tokenizer, data["model"], cfg.vocab_size))
    vocab, _ = next(iter(candidates))
    vocab = ggufx._finish(vocab, tokenizer, add_bos=True)
    path = tmp_path / "unchecked.gguf"
    ggufx.write_gguf(path, cfg, "llama", ggufx.gguf_tensors(cfg, "llama", model.state_dict()), vocab, "f32",
                     name="unchecked")
    llm = llama(path, vocab_only=True)
    differ = 0
    for text in texts + TEXTS:
        theirs = llama_ids(llm, text)
        assert theirs == vocab.simulate(text), text
        differ += theirs != tokenizer.encode(text)
    if kind.startswith("unigram"):
        assert differ > 0  # unseen characters: <unk> in llama.cpp, bytes in slmforge


def test_python_model_of_spm_merges_by_score_and_falls_back_to_bytes():
    tokens = ["<unk>", "<0x61>", "<0x62>", "<0xC3>", "<0xA4>", "a", "b", "▁", "ab", "▁a", "▁ab"]
    tokens += [f"<0x{i:02X}>" for i in range(256) if f"<0x{i:02X}>" not in tokens]
    types = [ggufx.UNKNOWN] + [ggufx.BYTE] * 4 + [ggufx.NORMAL] * 6 + [ggufx.BYTE] * (len(tokens) - 11)
    scores = [0.0] * 5 + [0.0, 0.0, 0.0, -1.0, -2.0, -3.0] + [0.0] * (len(tokens) - 11)
    spm = ggufx.SpmTokenizer(tokens, scores, types)
    assert spm("ab ab") == [8, 10]          # both "ab" first (score -1), then "▁" + "ab" -> "▁ab" (-3)
    assert spm("ä") == [3, 4]               # not a token: its UTF-8 bytes
    assert spm("") == []


# ---------------------------------------------------------------- models


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "smollm3"])
def test_f32_greedy_continuation_is_identical(tokenizers, llama, tmp_path, family):
    from slmforge.inference.generate import SamplingConfig, generate_ids

    cfg = tiny_config(family)
    run, model = make_run(tmp_path, cfg, tokenizers["bpe"])
    out = ggufx.export_gguf(run, tmp_path / "m.gguf", dtype="f32")
    tokenizer = load_tokenizer(tokenizers["bpe"])
    prompt = [tokenizer.bos_id] + tokenizer.encode("हिन्दी भाषा and English, ১২৩")
    new = 24  # prompt + new > the Gemma 3 window (8): sliding and global layers both matter
    ours = generate_ids(model, torch.tensor([prompt]), SamplingConfig(temperature=0.0, max_new_tokens=new))
    ours = ours[0, len(prompt):].tolist()
    # float32 KV cache (llama.cpp's default is f16) so that the logits can be compared closely too
    llm = llama(out.path, n_ctx=128, logits_all=True, n_threads=1, type_k=0, type_v=0)
    assert llm.tokenize("हिन्दी भाषा and English, ১২৩".encode(), add_bos=True, special=False) == prompt
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == new:
            break
    assert theirs == ours
    assert len(set(ours)) > 3  # a continuation, not one token repeated
    # and the logits themselves, at every position of prompt + continuation
    with torch.no_grad():
        expected = model.logits(model(torch.tensor([prompt + ours[:-1]])))[0]
    llm.reset()
    llm.eval(prompt + ours[:-1])
    got = torch.tensor(llm.scores[: len(prompt) + new - 1])
    # measured: llama 5e-6, qwen3 1e-5, smollm3 4e-6; gemma3 2e-3 (ggml's GELU reads an f16 table)
    assert (got - expected).abs().max().item() < (5e-3 if family == "gemma3" else 1e-4)


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["q8_0", "f16"])
def test_quantized_files_load_and_generate(tokenizers, llama, tmp_path, dtype):
    cfg = tiny_config("llama")
    run, _ = make_run(tmp_path, cfg, tokenizers["bpe"])
    f32 = ggufx.export_gguf(run, tmp_path / "f32.gguf", dtype="f32").path
    small = ggufx.export_gguf(run, tmp_path / f"{dtype}.gguf", dtype=dtype).path
    assert small.stat().st_size < f32.stat().st_size
    reader = gguf.GGUFReader(small)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    llm = llama(small, n_ctx=64, n_threads=1)
    text = llm("हिन्दी", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert isinstance(text, str)
    assert llm.n_tokens > 1


# ---------------------------------------------------------------- the file


def test_metadata_names_the_tokenizer_and_the_model(tokenizers, tmp_path):
    cfg = tiny_config("gemma3")
    run, _ = make_run(tmp_path, cfg, tokenizers["bpe"])
    out = ggufx.export_gguf(run, tmp_path / "m.gguf")
    tokenizer = load_tokenizer(tokenizers["bpe"])
    reader = gguf.GGUFReader(out.path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "gemma3"
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_id
    assert fields["tokenizer.ggml.unknown_token_id"] == tokenizer.unk_id
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size  # padded to the embedding
    assert fields["tokenizer.ggml.tokens"][tokenizer.vocab_size] == f"[PAD{tokenizer.vocab_size}]"
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.attention.sliding_window_pattern"] == [cfg.is_sliding(i) for i in range(cfg.num_layers)]
    assert fields["gemma3.final_logit_softcapping"] == pytest.approx(30.0)
    assert fields["slmforge.tokenizer.sha256"] == tokenizer.sha256
    assert fields["slmforge.tokenizer.normalization"] == "NFC"  # llama.cpp normalizes nothing
    assert fields["slmforge.checkpoint.step"] == 5


def test_chat_template_travels_in_the_metadata(tokenizers, tmp_path):
    from slmforge.finetune.vocab import add_special_tokens

    tokenizer = load_tokenizer(tokenizers["bpe"])
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    grown, _ = add_special_tokens(tokenizer, ("<|im_start|>", "<|im_end|>"), template)
    grown.save(tmp_path / "tok")
    run, _ = make_run(tmp_path, tiny_config("qwen3"), tmp_path / "tok")
    out = ggufx.export_gguf(run, tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in gguf.GGUFReader(out.path).fields.items()}
    assert fields["tokenizer.chat_template"] == template
    end = grown.token_to_id("<|im_end|>")
    assert fields["tokenizer.ggml.token_type"][end] == ggufx.CONTROL


def test_encoders_and_encoder_decoders_are_refused_in_one_line(tmp_path, capsys):
    from slmforge.models import EncDecConfig, EncoderConfig

    for name, cfg in {"bert": EncoderConfig.from_name("bert-tiny", vocab_size=64),
                      "t5": EncDecConfig.from_name("t5-tiny", vocab_size=64)}.items():
        save_checkpoint(tmp_path / name, 1, build_model(cfg, seed=0))
        assert main(["export", str(tmp_path / name), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
        err = capsys.readouterr().err.strip()
        assert "GGUF export is for decoders" in err and "--format hf" in err and "\n" not in err, err
    assert not (tmp_path / "x.gguf").exists()


def test_command_line(tokenizers, tmp_path, capsys):
    run, _ = make_run(tmp_path, tiny_config("qwen3"), tokenizers["bpe-akshara"])
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--dtype", "q8_0"]) == 0
    said = capsys.readouterr().out
    assert "GGUF qwen3, q8_0" in said and "same ids on" in said and "give it NFC text" in said
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2  # exists
    assert "pass --force" in capsys.readouterr().err
    before = out.stat().st_mtime_ns
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--dtype", "bfloat16", "--force"]) == 2
    assert "f32, f16, q8_0" in capsys.readouterr().err and out.stat().st_mtime_ns == before
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path)]) == 2  # a folder
    assert "writes one file" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--dtype", "q8_0"]) == 2
    assert "float32 or bfloat16" in capsys.readouterr().err


def test_what_llama_cpp_cannot_express_is_refused(tokenizers, tmp_path):
    cases = {
        "query_pre_attn_scalar": tiny_config("gemma3").__class__.from_name(
            "gemma3-tiny", vocab_size=768, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
            intermediate_size=96, max_seq_len=128, query_pre_attn_scalar=24.0),
        "nope_every": DecoderConfig.from_name("smollm3-tiny", vocab_size=768, nope_every=3),
        "rope_scaling": DecoderConfig.from_name("qwen3-tiny", vocab_size=768, rope_scaling="llama3",
                                                rope_scaling_factor=8.0),
    }
    for field_name, cfg in cases.items():
        with pytest.raises(SlmforgeError, match=f"model.{field_name}"):
            ggufx.check_gguf_exportable(cfg)
    # SmolLM3 without NoPE layers is a Llama, and is written as one
    assert ggufx.check_gguf_exportable(DecoderConfig.from_name("smollm3-tiny", vocab_size=768, nope_every=0)) == "llama"


def test_the_check_reads_the_runs_own_data(tokenizers, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tokenizers["bpe"]),
                 "--out", str(tmp_path / "data")]) == 0
    tokenizer = load_tokenizer(tokenizers["bpe"])
    lines = ggufx.data_sample(tokenizer, tmp_path / "data", 100_000)
    assert {line.strip() for line in lines} <= set(CORPUS) and len(lines) > 10
    assert set(lines) <= set(ggufx.sample_texts(tokenizer, tmp_path / "data"))
    assert ggufx.data_sample(tokenizer, tmp_path / "missing", 1000) == []  # data moved away: probe only
