"""Recovery training: a short continued training of an MoE checkpoint on real text, after moefy or pruning.

A converted (``moekit moefy``) or pruned model has lost part of what its dense/unpruned original
computed. A few hundred steps of training on real text recover much of it. Two choices:

- what trains (``train``): ``router`` -- only the routers' weights (and biases), everything else frozen:
  the experts keep their original neurons and only the choice of experts is learnt (MoEfication's
  learnt router, trained end to end instead of on activation targets); ``all`` -- every weight.
- the objective: with a ``teacher`` (the dense or unpruned original, same tokenizer), distillation: the
  mean over real tokens of KL(teacher || student) of the next-token distributions (temperature 1),
  which tells the student about every token of the vocabulary, not only the observed one, and so
  recovers faster than the language-modelling loss (Hinton et al. 2015; the recipe compression papers
  use to heal pruned models). Without a teacher: next-token cross-entropy. In both cases, where the
  family returns a load-balancing loss (Switch/Mixtral style), ``balance_coef`` times it is added so
  that a learnt router does not collapse onto a few experts.

The loop is our own (AdamW, linear warm-up then cosine decay to 10%, gradient clipping at 1, bf16
autocast on CUDA over float32 weights) rather than ``transformers.Trainer``: it needs a frozen subset, a
second model's logits per batch and an exact step count, and stays a screenful that is easy to check.
Batches are drawn from the packed rows of every named set, pooled and shuffled with the seed; the
padding of the last row is masked out of the loss. A run stops (``RecoveryError``, nothing written) at
the first step whose loss or gradient norm is NaN or infinite, and refuses weights that are not finite
before training, after it, or once cast to the dtype they are saved in.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moekit.arch import MoEModelView
from moekit.data import CalibrationSet, DataError, DataSpec, load_calibration_set
from moekit.environment import versions
from moekit.errors import UserError
from moekit.model_io import describe_source, load_config, load_model, load_structure
from moekit.outputs import shown_path

Trainable = Literal["router", "all"]
TRAINABLE = ("router", "all")
DEFAULT_LR = {"router": 1e-3, "all": 1e-4}


class RecoveryError(UserError):
    """A recovery run that cannot start as asked; the message says why and what to change."""


@dataclass(frozen=True)
class RecoverySettings:
    """What a recovery run does; every field is recorded in the output."""

    train: Trainable = "all"
    steps: int = 200
    batch_size: int = 8
    lr: float | None = None  # None: DEFAULT_LR[train]
    warmup: int = 20
    balance_coef: float = 0.01
    seed: int = 0
    log_every: int = 10

    def checked(self) -> RecoverySettings:
        if self.train not in TRAINABLE:
            raise RecoveryError(f"unknown --train {self.train!r}; choose one of: {', '.join(TRAINABLE)}")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise RecoveryError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.balance_coef < 0 or (self.lr is not None and self.lr <= 0):
            raise RecoveryError("warmup and balance coefficient must be >= 0 and the learning rate > 0")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.train]


def trainable_parameters(model: nn.Module, train: Trainable) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` for a recovery run and return the (name, parameter) pairs that train.

    ``router``: the parameters of every MoE layer's router module (weight, and bias where the family has
    one); DeepSeek-style selection-correction biases are buffers updated by their own rule, not trained.
    """
    if train == "all":
        for param in model.parameters():
            param.requires_grad_(True)
        return list(model.named_parameters())
    view = MoEModelView.from_model(model)
    routers = {id(p) for layer in view.layers for p in layer.router.parameters()}
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in routers)
        if id(param) in routers:
            chosen.append((name, param))
    if not chosen:
        raise RecoveryError("found no router parameters to train in this model")
    return chosen


def _rows(sets: Sequence[CalibrationSet]) -> tuple[torch.Tensor, torch.Tensor]:
    if not sets:
        raise DataError("no training text: pass --data NAME=PATH (one or more)")
    lengths = {s.input_ids.shape[1] for s in sets}
    if len(lengths) != 1:
        raise DataError(f"every set must be packed to the same sequence length, got {sorted(lengths)}")
    return torch.cat([s.input_ids for s in sets]), torch.cat([s.attention_mask for s in sets])


def _lr_scale(step: int, settings: RecoverySettings) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    span = max(settings.steps - settings.warmup, 1)
    progress = min((step - settings.warmup) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def per_layer_balance_loss(router_logits: Sequence[torch.Tensor], view: MoEModelView,
                           token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer load-balancing loss of every MoE layer, averaged over layers: for a layer,
    ``E * sum_j f_j * P_j`` with ``f_j`` the share of the layer's top-k selections that went to expert j (the
    family's own selection, ``MoELayer.route_logits``: correction biases, groups) and ``P_j`` the mean router
    probability of j (softmax; for sigmoid-scored families the sigmoid scores normalised to sum 1, as DeepSeek-V3's
    sequence-wise balance loss does); 1 when balanced. Counted over the tokens ``token_mask`` keeps (padding out).

    transformers' own ``load_balancing_loss_func`` adds the counts and probabilities of all layers into one vector
    before balancing, so a layer can starve experts while another compensates (measured on the testbeds,
    ``benchmarks/results/testbeds/balance.md``); this is the per-layer form Switch and Megatron use."""
    from moekit.arch.routing import router_scoring

    if len(router_logits) != len(view.layers):
        raise RecoveryError(f"the model returned router logits for {len(router_logits)} layers, moekit found "
                            f"{len(view.layers)} MoE layers: cannot balance each layer (pass --balance-coef 0)")
    losses = []
    for layer, logits in zip(view.layers, router_logits, strict=True):
        logits = logits.reshape(-1, logits.shape[-1]).float()
        experts, top_k = logits.shape[-1], layer.top_k
        if router_scoring(layer.routing) == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
        with torch.no_grad():
            index = layer.route_logits(logits.detach()).index
        chosen = torch.zeros_like(probs).scatter_(1, index, 1.0)
        weight = (token_mask.reshape(-1, 1).float() if token_mask is not None and token_mask.numel() == len(logits)
                  else torch.ones(len(logits), 1, device=logits.device))
        count = weight.sum().clamp(min=1.0)
        share = (chosen * weight).sum(0) / (count * top_k)
        mean_prob = (probs * weight).sum(0) / count
        losses.append(experts * (share * mean_prob).sum())
    return torch.stack(losses).mean()


def token_losses(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                 teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """Mean loss over the real next-token positions: KL(teacher || student) with a teacher, else cross-entropy.

    ``logits``/``teacher_logits`` [B, T, V] predict ``labels`` [B, T] (already shifted); ``mask`` [B, T] is 1
    where the position and its label are real text.
    """
    logits = logits.float()
    weight = mask.float()
    if teacher_logits is None:
        per_token = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    else:
        log_student = torch.log_softmax(logits, dim=-1)
        log_teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
        per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).flatten()
    return (per_token * weight.flatten()).sum() / weight.sum().clamp(min=1)


ADVICE = ("Nothing was written. Try a lower --lr, --dtype float32 (bfloat16/float16 overflow sooner), and check "
          "the data (and that the source model and teacher are sound).")


def _stop_if_not_finite(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, settings: RecoverySettings,
                        history: list[dict[str, float]]) -> None:
    """Raise before the optimizer step if this step's loss or gradient norm is NaN or infinite.

    One more step would spread the NaN into every trained weight (and every later loss), so the run
    stops at the first such step instead of writing a model of NaNs. One host sync per step."""
    loss_ok, grad_ok = torch.stack([torch.isfinite(loss), torch.isfinite(grad_norm)]).tolist()
    if loss_ok and grad_ok:
        return
    what = f"the training loss is {float(loss)}" if not loss_ok else \
        f"the gradient norm is {float(grad_norm)} (loss {float(loss):.4g})"
    last = f"; the last logged loss was {history[-1]['loss']:.4g} at step {history[-1]['step']}" if history else ""
    raise RecoveryError(f"recovery stopped at step {step} of {settings.steps}: {what}{last} (peak learning "
                        f"rate {settings.learning_rate:g}). {ADVICE}")


def check_finite_parameters(model: nn.Module, when: str, what: str = "the model's") -> None:
    """Refuse a model with NaN or infinite weights: training it (or saving it) only spreads the garbage."""
    bad = [name for name, param in model.named_parameters() if not bool(torch.isfinite(param.detach()).all())]
    if bad:
        total = sum(1 for _ in model.parameters())
        raise RecoveryError(f"{when}, {len(bad)} of {total} parameter tensors hold NaN or infinite values "
                            f"(first: {what} {bad[0]}). {ADVICE}")


def recover_training(model: nn.Module, sets: Sequence[CalibrationSet], settings: RecoverySettings = RecoverySettings(),
                     teacher: nn.Module | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in place on the packed rows of ``sets``; return the record (settings, loss curve, timing).

    ``teacher`` (optional, same vocabulary, on the same device) switches the objective to distillation.
    """
    from tqdm.auto import tqdm

    settings = settings.checked()
    input_ids, attention_mask = _rows(sets)
    if input_ids.shape[1] < 2:
        raise DataError("sequences must hold at least 2 tokens to predict the next one; raise --seq-len")
    device = model.get_input_embeddings().weight.device
    if teacher is not None and teacher.get_input_embeddings().weight.shape[0] != \
            model.get_input_embeddings().weight.shape[0]:
        raise RecoveryError("the teacher's vocabulary differs from the model's; distillation needs the same "
                            "tokenizer (pass the dense or unpruned original the model was made from)")
    check_finite_parameters(model, "before training")
    if teacher is not None:
        check_finite_parameters(teacher, "before training", what="the teacher's")
    params = trainable_parameters(model, settings.train)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=settings.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=0.0 if settings.train == "router" else 0.01)
    gen = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(input_ids), generator=gen)
    cursor = 0
    autocast = device.type == "cuda"
    history: list[dict[str, float]] = []
    model.train()
    if teacher is not None:
        teacher.eval()
    tokens_seen = 0
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=f"recover ({settings.train})", unit="step", disable=not progress)
    view = MoEModelView.from_model(model)
    divergence = [{"step": 0, **_divergence_point(view)}]  # before the first update
    for step in bar:
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(input_ids), generator=gen), 0
        pick = order[cursor:cursor + settings.batch_size]
        cursor += settings.batch_size
        ids, mask = input_ids[pick].to(device), attention_mask[pick].to(device)
        target_mask = mask[:, 1:] * mask[:, :-1]
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * _lr_scale(step, settings)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            output = model(input_ids=ids, attention_mask=mask, use_cache=False,
                           output_router_logits=settings.balance_coef > 0)
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        loss = token_losses(output.logits[:, :-1], ids[:, 1:], target_mask, teacher_logits)
        router_logits = getattr(output, "router_logits", None) if settings.balance_coef > 0 else None
        aux = per_layer_balance_loss(router_logits, view, mask) if router_logits else None
        total = loss + settings.balance_coef * aux if aux is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        _stop_if_not_finite(step, total.detach(), grad_norm, settings, history)
        optimizer.step()
        tokens_seen += int(target_mask.sum())
        if step % settings.log_every == 0 or step == settings.steps - 1:
            entry = {"step": step, "loss": float(loss.detach()), "grad_norm": float(grad_norm),
                     "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - start, 2)}
            if aux is not None:
                entry["balance_loss"] = float(aux.detach())
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            divergence.append({"step": step + 1, **_divergence_point(view)})
    for param in model.parameters():
        param.requires_grad_(True)
    model.eval()
    check_finite_parameters(model, "after training")
    seconds = time.perf_counter() - start
    return {"settings": {**asdict(settings), "lr": settings.learning_rate},
            "objective": "distillation KL(teacher || student)" if teacher is not None else "next-token cross-entropy",
            "trained_parameters": sum(p.numel() for _, p in params),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "tokens_seen": tokens_seen, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens_seen / max(seconds, 1e-9), 1),
            "balancing": "per-layer Switch loss (per_layer_balance_loss), coefficient "
                         f"{settings.balance_coef}" if settings.balance_coef > 0 else "none",
            "sets": [{"name": s.name, "tokens": s.num_tokens, "sequences": s.num_sequences, **s.description}
                     for s in sets],
            "loss_curve": history,
            "expert_divergence": {"what": "pairwise cosine of the experts' flattened weights per MoE layer "
                                          "(moekit.score.similarity), mean over layers of the layer means and the "
                                          "largest; step = optimizer steps taken", "curve": divergence}}


def _divergence_text(record: dict[str, Any]) -> str:
    """The card's sentence on how far the experts moved apart (pairwise weight cosine, first and last point)."""
    curve = (record.get("expert_divergence") or {}).get("curve") or []
    if len(curve) < 2 or curve[0]["mean_pairwise_cosine"] is None:
        return ""
    return (f"Experts' pairwise weight cosine (mean over layers): {curve[0]['mean_pairwise_cosine']:.4f} before, "
            f"{curve[-1]['mean_pairwise_cosine']:.4f} after (1 = copies of each other). ")


def _divergence_point(view: MoEModelView) -> dict[str, Any]:
    from moekit.score.similarity import expert_divergence

    summary = expert_divergence(view)
    return {key: summary[key] for key in ("mean_pairwise_cosine", "max_pairwise_cosine")}


def plot_loss_curves(curves: dict[str, Sequence[dict[str, float]]], path: str | Path, title: str,
                     ylabel: str = "loss (nats/token)") -> None:
    """Training-loss curves of recovery runs (label -> loss curve) as one PNG, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, history in curves.items():
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recovery_record(source: str, teacher: str | None, run: dict[str, Any], previous: dict[str, Any] | None,
                    **details: Any) -> dict[str, Any]:
    """The ``moekit_plan.json`` record of a recovered checkpoint: ``run`` (from ``recover_training``), where the
    model and teacher came from, any ``details``, and the source's own record under ``previous``."""
    return {"format": "moekit.recover/1", "source": source, "teacher": teacher, **details, **run,
            "previous": previous}


def recover_to_checkpoint(source: str | Path, data: Sequence[str | DataSpec], out: str | Path, *,
                          settings: RecoverySettings = RecoverySettings(), teacher: str | Path | None = None,
                          seq_len: int = 1024, max_tokens: int | None = 4_194_304, device: str = "cpu",
                          dtype: str = "auto", tokenizer: str | Path | None = None, overwrite: bool = False,
                          progress: bool = True) -> Path:
    """Load the MoE at ``source``, train it on ``data`` (``NAME=PATH``), write the result to ``out``.

    Checked before any weight loads: settings, output directory, the data (read and packed), that the
    source is an MoE and that the teacher has the same vocabulary. The output holds the trained weights,
    the source's tokenizer, ``moekit_plan.json`` (the recovery record, with the source's own record under
    ``"previous"`` so that a moefy partition or prune plan is not lost), a card and ``recovery_loss.png``.
    Weights are saved in the source's dtype (``dtype`` other than auto: that one).
    """
    import tempfile

    from moekit.data import load_tokenizer
    from moekit.edit.checkpoint import PLAN_FILE, check_output_dir, write_checkpoint
    from moekit.profile.collect import max_positions

    settings = settings.checked()
    specs = [d if isinstance(d, DataSpec) else DataSpec.parse(d) for d in data]
    check_output_dir(out, source, overwrite, sources=[teacher], inputs=[tokenizer, *(spec.path for spec in specs)])
    if not specs:
        raise DataError("no training text: pass --data NAME=PATH (one or more)")
    structure = load_structure(source)
    MoEModelView.from_model(structure)  # refuses a model without MoE layers, with the reason
    config = structure.config
    limit = max_positions(config)
    if seq_len < 2 or (limit is not None and seq_len > limit):
        raise DataError(f"--seq-len {seq_len} is outside what the model handles (2 to {limit} positions)")
    if teacher is not None:
        teacher_vocab = getattr(load_config(teacher), "vocab_size", None)
        if teacher_vocab != getattr(config, "vocab_size", None):
            raise RecoveryError(f"the teacher's vocabulary ({teacher_vocab}) differs from the model's "
                                f"({config.vocab_size}); distillation needs the same tokenizer")
    tok = load_tokenizer(tokenizer or source)
    sets = [load_calibration_set(spec, tok, seq_len, max_tokens, settings.seed) for spec in specs]
    compute = "float32" if device.startswith("cuda") else dtype  # master weights in fp32 under bf16 autocast
    model = load_model(source, dtype=compute, device=device)
    save_dtype = saved_dtype(config, dtype)
    teacher_model = load_model(teacher, dtype=compute, device=device) if teacher is not None else None
    record = recover_training(model, sets, settings, teacher_model, progress)
    del teacher_model
    previous_plan = Path(source) / PLAN_FILE
    record = recovery_record(describe_source(source), describe_source(teacher) if teacher is not None else None,
                             record, json.loads(previous_plan.read_text()) if previous_plan.is_file() else None,
                             seq_len=seq_len, max_tokens=max_tokens, device=device, versions=versions())
    model.to(save_dtype)
    check_finite_parameters(model, f"in {save_dtype}")
    final = record["loss_curve"][-1]["loss"]
    card = (f"# {Path(out).name}\n\nRecovered by `moekit recover` from `{shown_path(source, out)}`: "
            f"{settings.steps} steps of {settings.batch_size} x {seq_len} tokens ({record['tokens_seen']:,} tokens), "
            f"training {'the routers only' if settings.train == 'router' else 'every weight'} "
            f"({record['trained_parameters']:,} of {record['total_parameters']:,} parameters) on "
            f"{', '.join(s.name for s in sets)} with {record['objective']}"
            + (f" from `{shown_path(teacher, out)}`" if teacher is not None else "")
            + f". Final training loss {final:.4f}. {_divergence_text(record)}The full record is in moekit_plan.json; "
            "the curve in recovery_loss.png.\n")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "recovery_loss.png"
        plot_loss_curves({settings.train: record["loss_curve"]}, png,
                         f"moekit recover ({settings.train}): {Path(out).name}")
        return write_checkpoint(model, out, source, record, card, overwrite=overwrite,
                                extra_files={"recovery_loss.png": png.read_bytes()})


def saved_dtype(config: Any, dtype: str) -> torch.dtype:
    """The dtype to save in: ``dtype`` unless auto, else the one ``config`` records (float32 if none)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, str(stored).replace("torch.", "")) if stored is not None else torch.float32
