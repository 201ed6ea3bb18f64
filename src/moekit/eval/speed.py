"""Memory footprint and speed of MoE checkpoints, measured side by side on the same prompts.

    from moekit.eval.speed import measure_footprint_and_speed, format_speed_table

    result = measure_footprint_and_speed({"original": "Qwen3-30B-A3B", "pruned": "Qwen3-30B-A3B-reap50"},
                                         batch_size=4, prompt_tokens=256, new_tokens=64, device="cuda")
    print(format_speed_table(result))

What is measured, for every named model directory, one model loaded at a time, in one call and on
the same batch of prompts (the first model is the reference every ratio is taken to), in rounds whose
order alternates (A B, then B A) so that an effect of the order is in every model's spread:

- parameter bytes (``numel x element size`` of every parameter, in the dtype it is loaded in, tied
  weights once): the total, the routed experts, the shared experts, everything but the routed
  experts, and the bytes active per token -- ``moekit.summary``'s rule: everything but the routed
  experts, plus ``top_k / num_experts`` of each MoE layer's routed experts (integer division on the
  parameter count, as the summary does, then times the element size);
- checkpoint size on disk: the sum of the directory's weight files (``*.safetensors``, or ``*.bin``
  where there are none);
- peak accelerator memory during the timed runs (``torch.cuda.max_memory_allocated`` after a reset,
  weights included, less what was allocated before the model was loaded; the CUDA context and cuBLAS
  workspaces are created first so the first model is not charged for them), and the memory the
  loaded weights take; ``None`` on CPU, where it is not measured;
- prefill tokens/s: one forward of ``batch_size x prompt_tokens`` tokens (building the KV cache,
  logits of the last position only where the model supports ``logits_to_keep``), synchronised,
  the median of ``repeats`` timed runs after ``warmup`` untimed ones (default 1);
- decode tokens/s: greedy ``generate`` of exactly ``new_tokens`` tokens per row (``min_new_tokens =
  max_new_tokens``, ``do_sample=False``, KV cache on), ``batch_size x new_tokens / time``, the
  median of ``repeats`` timed runs after the warm-up. The time includes the prefill of the prompt, as
  a user waits for it; ``decode_step_tokens_per_s`` takes the median prefill time out (an estimate of
  the steady decoding rate).

Prompts are token ids, every row exactly ``prompt_tokens`` long (no padding, so every model sees the
same tokens): by default drawn at random (seeded) from the vocabulary without its special tokens;
given texts are tokenised with the first model's tokenizer and repeated (or cut) to that length,
cycling through the texts to fill the batch. Since the same ids go to every model, every model must
have the same vocabulary (config ``vocab_size``, and the same tokenizer where one is saved).

Not measured: CPU memory (the process's RSS is not a reliable per-model figure), energy, and
throughput under a serving engine (vLLM's batching and kernels differ from ``transformers``').
"""

from __future__ import annotations

import gc
import math
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from moekit.arch.view import MoEModelView
from moekit.eval.errors import EvalError
from moekit.model_io import ModelLoadError, load_config, load_model
from moekit.summary import summarize

__all__ = ["WEIGHT_FILE_PATTERNS", "checkpoint_bytes", "format_speed_table", "measure_footprint_and_speed",
           "parameter_bytes"]

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")

CPU_MEMORY_NOTE = ("peak memory is measured on CUDA only (torch.cuda.max_memory_allocated); "
                   "on {device} it is not measured and reported as null")

# Keys of a model's entry that get a ratio to the reference model.
_RATIO_KEYS = (
    "total_bytes", "routed_expert_bytes", "non_expert_bytes", "active_bytes", "checkpoint_bytes",
    "weights_memory_bytes", "peak_memory_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
    "decode_step_tokens_per_s",
)


# ---------------------------------------------------------------------------------------------- sizes


def _bytes_of(params: Sequence[torch.nn.Parameter] | Any) -> int:
    return sum(int(p.numel()) * int(p.element_size()) for p in params)


def parameter_bytes(view: MoEModelView) -> dict[str, int]:
    """Parameter bytes of a loaded model by kind: ``numel x element_size``, each tensor in its own dtype.

    ``total_bytes`` counts every parameter once (tied weights once, as ``model.parameters()`` yields
    them); ``routed_expert_bytes`` the routed experts of every MoE layer; ``shared_expert_bytes`` the
    shared experts; ``non_expert_bytes`` everything but the routed experts (shared experts, attention,
    embeddings, norms, routers); ``active_bytes`` what one token uses, by ``moekit.summary``'s rule:
    everything but the routed experts plus ``params x top_k // num_experts`` of each layer's routed
    experts, times their element size.
    """
    total = _bytes_of(view.model.parameters())
    routed = 0
    shared = 0
    active_routed = 0
    for layer in view.layers:
        params = list(layer.experts.parameters())
        routed += _bytes_of(params)
        shared += _bytes_of(p for m in layer.shared.values() for p in m.parameters())
        by_size: dict[int, int] = {}
        for p in params:
            by_size[int(p.element_size())] = by_size.get(int(p.element_size()), 0) + int(p.numel())
        for size, count in by_size.items():
            active_routed += count * layer.top_k // max(layer.num_experts, 1) * size
    return {
        "total_bytes": total, "routed_expert_bytes": routed, "shared_expert_bytes": shared,
        "non_expert_bytes": total - routed, "active_bytes": total - routed + active_routed,
    }


def checkpoint_bytes(path: str | Path) -> tuple[int, list[str]]:
    """The summed size of a model directory's weight files and their names.

    The ``*.safetensors`` files where there are any (what ``from_pretrained`` loads), else the ``*.bin``
    files, so a directory holding both formats is not counted twice.
    """
    path = Path(path)
    for pattern in WEIGHT_FILE_PATTERNS:
        files = sorted(f for f in path.glob(pattern) if f.is_file())
        if files:
            return sum(f.stat().st_size for f in files), [f.name for f in files]
    return 0, []


# --------------------------------------------------------------------------------------------- checks


def _check_inputs(models: Mapping[str, str | Path], prompts: Sequence[str] | None, batch_size: int,
                  prompt_tokens: int, new_tokens: int, repeats: int) -> dict[str, Path]:
    if not isinstance(models, Mapping) or not models:
        raise EvalError("no models to measure: pass a dict of name -> model directory, "
                        "e.g. {'original': 'MODEL', 'pruned': 'MODEL-pruned'}")
    for name, value in (("batch_size", batch_size), ("prompt_tokens", prompt_tokens),
                        ("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvalError(f"{name} must be a whole number of at least 1, got {value!r}")
    if prompts is not None:
        if isinstance(prompts, str):
            raise EvalError("prompts must be a list of strings, not one string: pass [prompt]")
        if not prompts:
            raise EvalError("prompts is empty: pass at least one text, or None for random token ids")
        for index, text in enumerate(prompts):
            if not isinstance(text, str) or not text:
                raise EvalError(f"prompt {index} is {'empty' if text == '' else repr(type(text).__name__)}: "
                                "every prompt must be a non-empty string")
    paths: dict[str, Path] = {}
    for name, source in models.items():
        path = Path(source)
        if not path.exists():
            raise EvalError(f"model {name!r}: directory {str(path)!r} does not exist")
        if not path.is_dir():
            raise EvalError(f"model {name!r}: {str(path)!r} is not a directory (a model directory is needed, "
                            "to read its weights and measure its size on disk)")
        paths[str(name)] = path
    return paths


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _load_tokenizer(path: Path) -> Any | None:
    """The model's own tokenizer, or None when it saved none (random prompts then need only vocab_size)."""
    from moekit.data.tokenizer import has_tokenizer_files, load_tokenizer

    return load_tokenizer(path) if has_tokenizer_files(path) else None


def _check_configs(paths: dict[str, Path], prompt_tokens: int, new_tokens: int) -> tuple[int, list[Any]]:
    """Read every config and tokenizer before any weights: same vocabulary everywhere, room for the tokens."""
    vocab_sizes: dict[str, int] = {}
    tokenizers: list[Any] = []
    for name, path in paths.items():
        try:
            config = _text_config(load_config(path))
        except ModelLoadError as err:
            raise EvalError(f"model {name!r}: {err}") from None
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            raise EvalError(f"model {name!r}: its config has no vocab_size, so prompts cannot be drawn from it")
        vocab_sizes[name] = vocab
        window = getattr(config, "max_position_embeddings", None)
        if isinstance(window, int) and prompt_tokens + new_tokens > window:
            raise EvalError(f"model {name!r}: prompt_tokens + new_tokens = {prompt_tokens + new_tokens} is more than "
                            f"its {window} positions (max_position_embeddings): lower prompt_tokens or new_tokens")
        tokenizers.append(_load_tokenizer(path))
    names = list(paths)
    first = names[0]
    for name in names[1:]:
        if vocab_sizes[name] != vocab_sizes[first]:
            raise EvalError(f"tokenizer mismatch: models {first!r} and {name!r} have different vocabularies "
                            f"(vocab_size {vocab_sizes[first]} vs {vocab_sizes[name]}); the same token ids would "
                            "mean different text -- compare models that share a tokenizer")
    saved = [(name, tok) for name, tok in zip(names, tokenizers, strict=True) if tok is not None]
    if saved:
        ref_name, ref = saved[0]
        ref_vocab = ref.get_vocab()
        for name, tok in saved[1:]:
            if tok.get_vocab() != ref_vocab:
                raise EvalError(f"tokenizer mismatch: the tokenizers of models {ref_name!r} and {name!r} differ "
                                f"({len(ref_vocab)} vs {len(tok.get_vocab())} tokens, or different ids); the same "
                                "token ids would mean different text -- compare models that share a tokenizer")
    return vocab_sizes[first], tokenizers


# -------------------------------------------------------------------------------------------- prompts


def build_prompt_ids(vocab_size: int, tokenizer: Any | None, prompts: Sequence[str] | None, *,
                     batch_size: int, prompt_tokens: int, seed: int = 0) -> torch.Tensor:
    """The ``[batch_size, prompt_tokens]`` token ids every model runs on (see the module docstring)."""
    if prompts is None:
        special = set(getattr(tokenizer, "all_special_ids", None) or []) if tokenizer is not None else set()
        upper = min(vocab_size, len(tokenizer)) if tokenizer is not None else vocab_size
        allowed = torch.tensor([i for i in range(upper) if i not in special] or list(range(vocab_size)))
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, len(allowed), (batch_size, prompt_tokens), generator=generator)
        return allowed[picks]
    if tokenizer is None:
        raise EvalError("text prompts need a tokenizer, and the first model's directory has none: "
                        "save the tokenizer beside it, or pass prompts=None for random token ids")
    rows = []
    for index in range(batch_size):
        text = prompts[index % len(prompts)]
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise EvalError(f"prompt {index % len(prompts)} tokenises to no tokens: pass a longer text")
        ids = (ids * math.ceil(prompt_tokens / len(ids)))[:prompt_tokens]
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or dev.type


def _accepts(model: Any, argument: str) -> bool:
    import inspect

    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _timed(fn: Any, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times, each synchronised and timed; the seconds."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


@torch.inference_mode()
def _measure_speed(model: Any, ids: torch.Tensor, new_tokens: int, repeats: int, warmup: int) -> dict[str, Any]:
    from transformers import GenerationConfig

    device = _device_of(model)
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    batch, length = ids.shape
    forward_kwargs: dict[str, Any] = {"use_cache": True}
    if _accepts(model, "logits_to_keep"):
        forward_kwargs["logits_to_keep"] = 1

    def prefill() -> None:
        model(input_ids=ids, attention_mask=mask, **forward_kwargs)

    config = model.config
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else (eos if eos is not None else 0)
    generation = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  use_cache=True, num_beams=1, eos_token_id=eos, pad_token_id=pad)
    produced: list[int] = []

    def decode() -> None:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
        produced.append(int(out.shape[1]) - length)

    prefill_seconds = _timed(prefill, device, repeats, warmup)
    decode_seconds = _timed(decode, device, repeats, warmup)
    if any(n != new_tokens for n in produced[warmup:]):
        raise EvalError(f"generate produced {sorted(set(produced))} new tokens instead of {new_tokens}: "
                        "the model stopped early although min_new_tokens was set")
    return speed_summary(prefill_seconds, decode_seconds, batch, length, new_tokens)


def speed_summary(prefill_seconds: list[float], decode_seconds: list[float], batch: int, length: int,
                  new_tokens: int) -> dict[str, Any]:
    """Medians and tokens/s of the timed runs (every run of every round)."""
    prefill_median = statistics.median(prefill_seconds)
    decode_median = statistics.median(decode_seconds)
    steady = decode_median - prefill_median
    return {
        "prefill_seconds": prefill_seconds, "prefill_seconds_median": prefill_median,
        "prefill_tokens_per_s": batch * length / prefill_median,
        "decode_seconds": decode_seconds, "decode_seconds_median": decode_median,
        "decode_tokens_per_s": batch * new_tokens / decode_median,
        "decode_step_tokens_per_s": batch * (new_tokens - 1) / steady if new_tokens > 1 and steady > 0 else None,
    }


# ----------------------------------------------------------------------------------------------- main


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ratios(entry: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in _RATIO_KEYS:
        value, base = entry.get(key), reference.get(key)
        out[key] = value / base if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base else None
    return out


def _warm_up_cuda(device: str) -> None:
    """Create the CUDA context and the cuBLAS workspaces before any baseline is read.

    cuBLAS allocates its workspace on first use and keeps it; without this the first model's
    peak memory would include it and the others' would not.
    """
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.ones(64, 64, device=device, dtype=dtype)
        (a @ a).sum().item()
    torch.cuda.synchronize(device)


def _measure_one(name: str, path: Path, ids: torch.Tensor, *, new_tokens: int, repeats: int, warmup: int,
                 device: str, dtype: str | torch.dtype) -> dict[str, Any]:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    try:
        model = load_model(path, dtype=dtype, device=device)
    except (ModelLoadError, OSError, ValueError) as err:
        raise EvalError(f"model {name!r}: cannot load {str(path)!r}: {err}") from None
    try:
        view = MoEModelView.from_model(model)
        summary = summarize(view)
        size, files = checkpoint_bytes(path)
        dtypes = sorted({_dtype_name(p.dtype) for p in model.parameters()})
        entry: dict[str, Any] = {
            "path": str(path.resolve()), "model_type": summary.model_type, "dtype": ",".join(dtypes),
            "device": str(_device_of(model)), "moe_layers": len(summary.moe_layers),
            "num_experts": summary.num_experts, "top_k": summary.top_k,
            "total_parameters": summary.total_parameters, "active_parameters": summary.active_parameters,
            "routed_expert_parameters": summary.routed_expert_parameters,
            **parameter_bytes(view),
            "checkpoint_bytes": size, "checkpoint_files": files,
            "weights_memory_bytes": None, "peak_memory_bytes": None,
        }
        if cuda:
            entry["weights_memory_bytes"] = torch.cuda.memory_allocated() - baseline
            torch.cuda.reset_peak_memory_stats()
        entry.update(_measure_speed(model, ids, new_tokens, repeats, warmup))
        if cuda:
            entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - baseline
        return entry
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def measure_footprint_and_speed(
    models: Mapping[str, str | Path],
    prompts: Sequence[str] | None = None,
    *,
    batch_size: int = 4,
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    progress: bool = False,
    rounds: int = 2,
) -> dict[str, Any]:
    """Parameter bytes, checkpoint size, peak memory, prefill and decode speed of each model, side by side.

    The models are measured one loaded at a time, in ``rounds`` rounds, the order reversed every other round
    (A B, B A, ...): each model's timed runs of all rounds are pooled, so an effect of the order (warm caches,
    clocks, other load) lands in every model's spread instead of favouring one. Peak memory is the largest of
    the rounds. ``rounds=1`` measures each model once, in the given order.

    ``models`` maps names to model directories; the first is the reference (``ratios`` of every model
    are to it). Every model runs on the same ``[batch_size, prompt_tokens]`` token ids (random,
    seeded, or ``prompts`` tokenised with the first model's tokenizer) and is loaded in ``dtype``
    (``"auto"``: as stored) on ``device``, one at a time. Timings are the median of ``repeats``
    synchronised runs after ``warmup`` untimed ones (raise it on GPUs, where the first model measured
    otherwise pays for kernel selection and allocator growth); see the module docstring for exactly what each number is.

    Everything is checked before weights are loaded; :class:`EvalError` says what is wrong (no models,
    a missing directory, different vocabularies, a batch size or token count below 1, too many tokens
    for the model's positions). Returns a JSON-serialisable dict: the environment (device name,
    dtype, torch / transformers versions, CPU threads), the settings, and per model its numbers and
    ``ratios`` to the reference.
    """
    paths = _check_inputs(models, prompts, batch_size, prompt_tokens, new_tokens, repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise EvalError(f"warmup must be a whole number of at least 0, got {warmup!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise EvalError(f"rounds must be a whole number of at least 1, got {rounds!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {device!r} asked for, but CUDA is not available: use device='cpu'")
    vocab_size, tokenizers = _check_configs(paths, prompt_tokens, new_tokens)
    ids = build_prompt_ids(vocab_size, tokenizers[0], prompts, batch_size=batch_size,
                           prompt_tokens=prompt_tokens, seed=seed)

    dev = torch.device(device)
    if dev.type == "cuda":
        _warm_up_cuda(device)
    result: dict[str, Any] = {
        "device": device, "device_name": _device_name(device), "dtype": _dtype_name(dtype),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "settings": {
            "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "repeats": repeats, "warmup": warmup, "seed": seed, "rounds": rounds,
            "prompts": "random token ids (seeded, special tokens excluded)" if prompts is None
            else f"{len(prompts)} text(s) tokenised with the first model's tokenizer, repeated to prompt_tokens",
            "timing": "median of the repeats of every round, each after warmup untimed runs, synchronised; decode "
                      "includes the prompt's prefill",
        },
        "peak_memory_note": None if dev.type == "cuda" else CPU_MEMORY_NOTE.format(device=dev.type),
        "reference": next(iter(paths)),
        "models": {},
    }
    names = list(paths)
    orders = [names if r % 2 == 0 else names[::-1] for r in range(rounds)]
    result["order"] = orders
    with tqdm(total=rounds * len(names), desc="speed", disable=not progress) as bar:
        for order in orders:
            for name in order:
                entry = _measure_one(name, paths[name], ids, new_tokens=new_tokens, repeats=repeats,
                                     warmup=warmup, device=device, dtype=dtype)
                result["models"][name] = _pool_rounds(result["models"].get(name), entry, ids.shape, new_tokens)
                bar.update()
    reference = result["models"][names[0]]
    for name in names:
        result["models"][name]["ratios"] = _ratios(result["models"][name], reference)
        result["models"][name]["within_noise"] = within_noise(result["models"][name], reference)
    return result


def _pool_rounds(earlier: dict[str, Any] | None, entry: dict[str, Any], shape: torch.Size,
                 new_tokens: int) -> dict[str, Any]:
    """One model's entry over the rounds so far: timed runs pooled, speeds from the pooled runs, peak memory the
    largest of the rounds."""
    if earlier is None:
        return entry
    prefill = earlier["prefill_seconds"] + entry["prefill_seconds"]
    decode = earlier["decode_seconds"] + entry["decode_seconds"]
    pooled = {**earlier, **speed_summary(prefill, decode, shape[0], shape[1], new_tokens)}
    for key in ("peak_memory_bytes", "weights_memory_bytes"):
        values = [v for v in (earlier.get(key), entry.get(key)) if v is not None]
        pooled[key] = max(values) if values else None
    return pooled


def within_noise(entry: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, bool | None]:
    """Per phase (prefill, decode): whether the timed runs of ``entry`` and of ``reference`` overlap (the min .. max
    of one reaches into the other's), so that their ratio says nothing; None without timings."""
    out: dict[str, bool | None] = {}
    for phase in ("prefill", "decode"):
        a, b = entry.get(f"{phase}_seconds"), reference.get(f"{phase}_seconds")
        out[phase] = None if not a or not b else bool(min(a) <= max(b) and min(b) <= max(a))
    return out


# ---------------------------------------------------------------------------------------------- table


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f}"


def _with_ratio(text: str, ratio: float | None, first: bool) -> str:
    return text if first or ratio is None else f"{text} ({ratio:.2f}x)"


def _noise(entry: Mapping[str, Any], phase: str, first: bool) -> str:
    return "" if first or not entry.get("within_noise", {}).get(phase) else " \\*"


def format_speed_table(result: Mapping[str, Any]) -> str:
    """A markdown table of a :func:`measure_footprint_and_speed` result: sizes in MiB, speeds in tokens/s.

    Every cell of a model other than the reference carries its ratio to the reference, ``(0.52x)``.
    """
    s = result["settings"]
    lines = [
        f"Device: {result['device']} ({result['device_name']}), dtype {result['dtype']}, "
        f"torch {result['torch']}, transformers {result['transformers']}; batch {s['batch_size']} x "
        f"{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new tokens, median of {s['repeats']}.",
        "",
        "| model | experts | total MiB | routed experts MiB | active MiB/token | checkpoint MiB | peak memory MiB "
        "| prefill tok/s | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = result.get("reference")
    for name, m in result["models"].items():
        r = m.get("ratios", {})
        first = name == reference

        def cell(key: str, text: str, r: dict[str, Any] = r, first: bool = first) -> str:
            return _with_ratio(text, r.get(key), first)

        lines.append("| " + " | ".join([
            name, f"{m['num_experts']} (top-{m['top_k']})",
            cell("total_bytes", _mib(m["total_bytes"])),
            cell("routed_expert_bytes", _mib(m["routed_expert_bytes"])),
            cell("active_bytes", _mib(m["active_bytes"])),
            cell("checkpoint_bytes", _mib(m["checkpoint_bytes"])),
            cell("peak_memory_bytes", _mib(m["peak_memory_bytes"])),
            cell("prefill_tokens_per_s", f"{m['prefill_tokens_per_s']:.1f}" + _noise(m, "prefill", first)),
            cell("decode_tokens_per_s", f"{m['decode_tokens_per_s']:.1f}" + _noise(m, "decode", first)),
        ]) + " |")
    lines += ["", "Timed runs, seconds (min .. max): " + "; ".join(
        f"{name} prefill {min(m['prefill_seconds']):.4g} .. {max(m['prefill_seconds']):.4g}, decode "
        f"{min(m['decode_seconds']):.4g} .. {max(m['decode_seconds']):.4g}"
        for name, m in result["models"].items() if m.get("prefill_seconds") and m.get("decode_seconds"))]
    rounds = s.get("rounds", 1)
    if rounds > 1:
        lines += ["", f"Models measured in {rounds} rounds, the order reversed every other round "
                  f"({'; '.join(' '.join(o) for o in result.get('order', []))}); every model's runs of all rounds "
                  "are pooled, so an effect of the order is inside the spreads."]
    else:
        lines += ["", "Models measured once each, one after the other (each loaded, warmed up, timed): an effect of "
                  "the order (caches, clocks, other load) is not in these spreads; use more than one round."]
    if any(m.get("within_noise", {}).get(p) for name, m in result["models"].items() if name != reference
           for p in ("prefill", "decode")):
        lines += ["", "\\* within the noise: the timed runs of that model and of the reference overlap, so the "
                  "ratio does not show a difference (repeat with more --repeats, on an idle machine)."]
    if result.get("peak_memory_note"):
        lines += ["", f"Note: {result['peak_memory_note']}."]
    return "\n".join(lines) + "\n"
