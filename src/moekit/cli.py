"""The ``moekit`` command line: thin commands over the Python API."""

from __future__ import annotations

import errno
import json
import logging
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

import moekit
from moekit.errors import UserError
from moekit.registry import UnknownNameError

# What an operating-system error means for the user, and what to do (any other is a bug to report).
_SPACE = "free some space, or write to another disk"
_ACCESS = "choose an output (--out) and inputs this user may read and write"
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", _SPACE), errno.EDQUOT: ("disk quota exceeded", _SPACE),
    errno.EFBIG: ("a file grew beyond what this machine or file system allows", _SPACE),
    errno.EROFS: ("the file system is read-only", _ACCESS), errno.EACCES: ("permission denied", _ACCESS),
    errno.EPERM: ("operation not permitted", _ACCESS),
    errno.ENOENT: ("a file or directory does not exist (or vanished while moekit ran)", "check the paths given"),
    errno.EISDIR: ("a directory was given where a file is needed", "check the paths given"),
    errno.ENOTDIR: ("a file was given where a directory is needed", "check the paths given"),
    errno.ENAMETOOLONG: ("a file name is too long", "choose a shorter path"),
    errno.EIO: ("an input/output error from the disk", "check the disk and run again"),
    errno.ENOMEM: ("out of memory", "free memory or use a larger machine; a profile or NAEE can run layer by layer "
                                    "(--sequential), with a smaller --batch-size"),
}


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (temporaries are removed on the way) and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _control_flow() -> tuple[type[BaseException], ...]:
    """The exceptions typer (and the click it uses: its own copy since typer 0.16) exits through."""
    if hasattr(typer, "TyperException"):
        return (typer.Exit, typer.Abort, typer.TyperException)
    import click

    return (typer.Exit, typer.Abort, click.ClickException)


_CONTROL_FLOW = _control_flow()


class _ErrorBoundary(TyperGroup):
    """The one place errors become messages: a user's mistake (``UserError``) or an operating-system failure
    (disk full, permissions) is one line and exit 2; Ctrl-C or a termination signal is one line and exit
    130/128+N; anything else is a bug in moekit, shown with its traceback and exit 1. Every writer is atomic
    (``moekit.outputs``), so in each case nothing half-written is left at the output."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _CONTROL_FLOW:  # --help, exit codes, usage errors: the framework prints and exits itself
            raise
        except UserError as error:
            _fail(error)
        except Exception as error:
            code = errno.ENOMEM if isinstance(error, MemoryError) else _os_errno(error)
            if code not in _OS_ERRORS:
                _report_bug()
            what, todo = _OS_ERRORS[code]
            filename = getattr(error, "filename", None)
            detail = str(getattr(error, "strerror", None) or error)
            _fail(f"{what}{f' ({filename})' if filename else ''}: {todo}, then run again. Nothing half-written was "
                  f"left at the output.{f' [{detail}]' if detail else ''}")
        except KeyboardInterrupt:
            err.print("interrupted: nothing half-written was left at the output", markup=False, highlight=False)
            raise typer.Exit(130) from None
        except Interrupted as stop:
            err.print(f"stopped by signal {signal.Signals(stop.signum).name}: nothing half-written was left at the "
                      "output", markup=False, highlight=False)
            raise typer.Exit(128 + stop.signum) from None


def _os_errno(error: BaseException) -> int | None:
    """The operating-system error number behind ``error``: an OSError's, or the one a Rust library (safetensors)
    reports in its message as "(os error N)"."""
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def _report_bug() -> None:
    err.print(traceback.format_exc(), markup=False, highlight=False, soft_wrap=True)
    err.print("this is a bug in moekit, not in your input: please report it with the command you ran and the "
              "traceback above", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


app = typer.Typer(
    name="moekit",
    cls=_ErrorBoundary,
    help="Measure, score, prune and explain the experts of Mixture-of-Experts language models.\n\n"
    "MODEL is a Hugging Face model directory (or a hub id where the hub is reachable). No code shipped with a "
    "checkpoint runs unless you pass --trust-remote-code.\n\n"
    "Outputs are written atomically: while a command runs, its output is a hidden .NAME.moekit-tmp-XXXXXXXX "
    "beside the target, renamed onto it when complete; one left by a killed run is removed the next time the "
    "same target is written. An output never replaces a source or an input, and --overwrite only replaces "
    "an earlier moekit output of the same kind.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is printed as written: "[default: ...]" and JSON examples keep their brackets
)
# emoji codes (":b:") and markup in user-given text must print as typed: user text is escaped or printed
# without markup, and emoji replacement is off everywhere
JSON_HELP = "Write the results as JSON to FILE, or - to print them on stdout instead of the tables."
out = Console(emoji=False, highlight=False)
err = Console(stderr=True, emoji=False, highlight=False)


def _fail(error: Exception | str) -> None:
    err.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
    raise typer.Exit(2)


def _wrote(text: str) -> None:
    """``wrote <text>`` on stdout; ``text`` (paths, set names) is printed as it is."""
    out.print(f"[green]wrote[/] {escape(text)}", soft_wrap=True)


def _read_text_input(path: Path, what: str) -> str:
    """The UTF-8 text of a small input file, or a clear error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None


def _dtype_name(value: str) -> str:
    """A --dtype value with the usual aliases (bf16, fp16, fp32) spelled as torch names, or a clear error."""
    from moekit.model_io import DTYPE_ALIASES, check_dtype

    name = DTYPE_ALIASES.get(value.lower(), value)
    check_dtype(name)
    return name


def _note(text: str) -> None:
    """A line about the run (what it needs, what it does), on stderr so that stdout stays the result."""
    err.print(text, markup=False, soft_wrap=True)


def _quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


class _WarningsToConsole(logging.Handler):
    """moekit's log on the console: warnings marked as such, information (what a run chose) as plain notes."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            err.print(f"[yellow]warning:[/] {escape(record.getMessage())}", soft_wrap=True)
        else:
            _note(record.getMessage())


_MOEKIT_LOG = logging.getLogger("moekit")
if not any(isinstance(h, _WarningsToConsole) for h in _MOEKIT_LOG.handlers):
    _MOEKIT_LOG.addHandler(_WarningsToConsole(logging.INFO))
    _MOEKIT_LOG.setLevel(logging.INFO)
    _MOEKIT_LOG.propagate = False


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Allow checkpoints to run their own Python code (configuration_*.py, "
        "modeling_*.py) when loaded. Off by default: such code could do anything on this machine; moekit's "
        "supported families never need it.")] = False,
) -> None:
    if version:
        out.print(f"moekit {moekit.__version__}")
        raise typer.Exit()
    if trust_remote_code:
        from moekit.model_io import trusting_remote_code

        ctx.with_resource(trusting_remote_code())


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    json_out: Annotated[str | None, typer.Option("--json", metavar="FILE|-", help=JSON_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --json file if it exists.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Load the weights and check that moekit's routing function reproduces the model's "
        "own router on random inputs (slower; needed to recognise unlisted families).")] = False,
) -> None:
    """What moekit sees: MoE layers, experts, top-k, routing, shared experts, parameter counts.

    Without --verify only the config is read (the model is built on the meta device), so this is
    instant even for models larger than memory.

    Example: moekit inspect ./tiny-qwen3-moe --json -
    """
    from moekit.arch.view import MoEModelView, routing_mismatch
    from moekit.model_io import load_model, load_structure
    from moekit.summary import format_count, summarize

    _quiet_transformers()
    _check_json_out(json_out, overwrite, [model], [])
    loaded = load_model(model) if verify else load_structure(model)
    view = MoEModelView.from_model(loaded)
    summary = summarize(view)
    result: dict[str, Any] = summary.to_dict()
    result["model"] = model
    if verify:
        import torch

        gen = torch.Generator().manual_seed(0)
        mismatch = {}
        for layer in view.layers:
            weight = layer.router_weight
            hidden = torch.randn(512, weight.shape[-1], generator=gen).to(weight.device, weight.dtype)
            mismatch[layer.index] = routing_mismatch(layer, hidden)
        result["routing_max_gate_difference"] = mismatch
    if _json_to_stdout(json_out, result):
        return

    head = Table(title=f"{escape(model)}  ({summary.model_type}, {summary.architecture})", show_header=False)
    head.add_row("layers", f"{summary.num_layers} ({len(summary.moe_layers)} MoE: {_ranges(summary.moe_layers)})")
    head.add_row("experts per MoE layer", f"{summary.num_experts}, top-{summary.top_k} per token")
    head.add_row("routing", escape(summary.layers[0].routing)
                 + ("" if summary.family_known else "  (probed: unlisted family)"))
    head.add_row("expert layout", escape(summary.layers[0].expert_layout)
                 + f", intermediate size {summary.layers[0].intermediate_size}")
    shared = summary.layers[0].shared_experts
    head.add_row("shared experts", ", ".join(s.rsplit(".", 1)[-1] for s in shared) if shared else "none")
    head.add_row("parameters", f"{format_count(summary.total_parameters)} total, "
                 f"{format_count(summary.active_parameters)} active per token")
    head.add_row("routed experts", f"{format_count(summary.routed_expert_parameters)} "
                 f"({100 * summary.routed_share:.1f}% of all parameters)")
    fields = summary.config_fields
    head.add_row("config fields", "; ".join(
        f"{label}: {' = '.join(keys) if isinstance(keys, list) else keys}"
        for label, keys in (("experts", fields["expert_count"]), ("top-k", fields["top_k"]),
                            ("groups", fields["n_group"]), ("intermediate", fields["intermediate_size"]))
        if keys))
    out.print(head)
    table = Table(title="MoE layers")
    for col in ("layer", "experts", "top-k", "router", "correction bias", "routed params", "shared params"):
        table.add_column(col, justify="right" if col in ("layer", "experts", "top-k") else "left", overflow="fold")
    if verify:
        table.add_column("routing check")
    for layer in summary.layers:
        row = [str(layer.layer), str(layer.num_experts), str(layer.top_k), layer.router,
               layer.correction_bias or "-", format_count(layer.routed_parameters),
               format_count(layer.shared_parameters)]
        if verify:
            diff = result["routing_max_gate_difference"][layer.layer]
            row.append("[green]exact[/]" if diff < 1e-5 else f"[red]max diff {diff:.2g}[/]")
        table.add_row(*row)
    out.print(table)
    _write_json(json_out, result)


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "-"
    parts, start, prev = [], indices[0], indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="New directory for the pruned checkpoint (with --plan-only: the plan JSON file).")],
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="A profile of MODEL (moekit profile) to score experts from.")] = None,
    method: Annotated[str, typer.Option(
        help="Importance criterion: frequency, router_mass, ean_sum, ean_mean, weighted_ean_sum, reap, easy_ep, "
        "random (lowest-scoring experts are removed); stun (STUN's first stage: experts clustered by how often the "
        "router selects them together, each cluster keeping the expert closest to its mean weights); or naee, a "
        "reconstruction-loss search that runs the model on --data instead of reading a profile. Default easy_ep: "
        "the lowest mean rank of the criteria over moekit's "
        "balanced testbeds at 25% and 50% (benchmarks/results/method_summary.md; reap, weighted_ean_sum and ean_sum "
        "come next, often within the spread over calibration seeds).")] = "easy_ep",
    ratio: Annotated[float | None, typer.Option(
        help="Fraction of experts removed from every MoE layer, e.g. 0.5.")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="Experts kept per MoE layer (instead of --ratio).")] = None,
    set_weights: Annotated[str | None, typer.Option(
        "--set-weights", help="Weigh the profile's named sets, e.g. code=2,prose=1 (sets left out get 0); each "
        "set counts per token, whatever its size; with --method naee, the --data sets' shares of --naee-tokens. "
        "Default: every set weight 1.")] = None,
    protect: Annotated[str | None, typer.Option(
        help="Experts never removed: LAYER:EXPERT pairs (3:17,5:2) or a file holding them.")] = None,
    no_protect_super: Annotated[bool, typer.Option(
        "--no-protect-super", help="Allow removing super experts (extreme activations; protected by default).")]
    = False,
    protect_contrast: Annotated[str | None, typer.Option(
        "--protect-contrast", metavar="A:B:N", help="Keep the N experts of every layer that profile set A routes to "
        "most more than set B (moekit contrast), e.g. harmful:harmless:4. A profile with sets named harmful and "
        "harmless is audited anyway: the plan says how many of their top experts it removes.")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help="Also lower the experts each token is routed to (at most the kept experts). NAEE's "
        "dynamic skipping cannot be written into a stock checkpoint and is not offered.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --method random and for the order of --data documents.")] = 0,
    data: Annotated[list[str] | None, typer.Option(
        "--data", help="--method naee: calibration text, NAME=PATH (as for moekit profile).")] = None,
    naee_search: Annotated[str, typer.Option(
        "--naee-search", help="--method naee: exhaustive (every subset; small E), greedy, beam, or auto "
        "(exhaustive when at most 5000 subsets).")] = "auto",
    naee_tokens: Annotated[int, typer.Option(
        "--naee-tokens", help="--method naee: calibration tokens per layer in the loss.")] = 4096,
    progressive: Annotated[bool, typer.Option(
        "--progressive", help="--method naee: re-collect each layer's inputs after pruning the layers before.")]
    = False,
    device: Annotated[str, typer.Option(help="--method naee: cpu, cuda, cuda:N or auto.")] = "cpu",
    sequential: Annotated[bool | None, typer.Option(
        "--sequential/--whole-model", help="--method naee: run the model one decoder layer at a time from its "
        "shards (the same plan, memory of one layer) or whole [default: layer by layer only when the whole model "
        "does not fit the device].", show_default=False)] = None,
    plan_only: Annotated[bool, typer.Option(
        "--plan-only", help="Write the plan (JSON) to --out and stop; apply it later with moekit apply.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Make the plan, print the size of the output and the free space of its disk, and stop "
        "(nothing is written).")] = False,
    keep_json: Annotated[Path | None, typer.Option(
        "--keep-json", help='Instead of a profile: JSON {"<layer index>": [expert ids to keep], ...} covering every '
        "MoE layer, or a moekit_plan.json.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it exists (never the source).")] = False,
    allow_regroup: Annotated[bool, typer.Option(
        "--allow-regroup", help="Group-limited routers (DeepSeek-V3 style, n_group > 1) group experts by index "
        "blocks: allow keeping unequal numbers per group, which re-forms the groups.")] = False,
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="dtype to load and save in: auto (as stored), float32, bfloat16, ...")] = "auto",
    neurons: Annotated[str | None, typer.Option(
        "--neurons", help="Remove neurons inside every routed expert instead of whole experts, scored by this "
        "criterion: camera_p (CAMERA-P; needs a profile with --neuron-stats) or heapr (HEAPr's second-order "
        "importance; needs a profile with --gradients). Every expert keeps the same number "
        "of its own highest-scoring neurons (stock configs hold one expert width), so the checkpoint's expert "
        "tensors really shrink; where the shared experts' width follows the experts' (DeepSeek-V2/V3, GLM-4-MoE, "
        "Llama-4, ...), their neurons are chosen too, by the same criterion. With --ratio/--keep too, those experts "
        "are removed first, in the same plan.")]
    = None,
    neuron_ratio: Annotated[float | None, typer.Option(
        "--neuron-ratio", help="With --neurons: fraction of each expert's neurons removed, e.g. 0.25 (the kept width "
        "is rounded to a multiple of 16 bytes of weights, e.g. 8 bfloat16 neurons, which grouped-GEMM kernels "
        "need).")] = None,
    mode: Annotated[str, typer.Option(
        "--mode", help="With --neurons: uniform (every expert keeps the same number of neurons; they are removed "
        "and the checkpoint shrinks) or masked (the lowest-scoring fraction of each layer's neurons, from any "
        "expert, as CAMERA selects them; zeroed, not removed: it saves nothing on disk, the card says what "
        "a format storing only the kept neurons would save).")] = "uniform",
    shared: Annotated[bool, typer.Option(
        "--shared", help="With --neurons: also remove the same fraction of the shared experts' neurons where the "
        "family sizes them by a key of their own (Qwen2-MoE, Qwen3-Next: shared_expert_intermediate_size), chosen "
        "by the same criterion. Without it they keep their width. (Where their width follows the routed experts', "
        "DeepSeek-V2/V3, GLM-4-MoE, Llama-4, their neurons are always chosen: the config makes them narrower.)")]
    = False,
    sparsity: Annotated[float | None, typer.Option(
        "--sparsity", help="STUN's second stage: set this fraction of every kept routed expert's weights to zero "
        "(gate, up and down; e.g. 0.5), the lowest-scoring ones of each output row (Wanda's comparison). With "
        "--method stun --ratio R this is STUN: experts removed first, in the same plan. Unstructured sparsity saves "
        "memory and time only with a sparse format or kernel: the checkpoint stores the zeros densely and is as large "
        "as without them (the card says so, with the measured sparsity).")] = None,
    sparsity_criterion: Annotated[str, typer.Option(
        "--sparsity-criterion", help="With --sparsity: wanda (|W| x its input's norm over the expert's tokens; "
        "needs a profile with --input-norms) or magnitude (|W|).")] = "wanda",
    sparsity_allocation: Annotated[str | None, typer.Option(
        "--sparsity-allocation", help="With --sparsity: owl (OWL's layer sparsities, more weights kept where a "
        "layer's scores have more outliers, mean --sparsity; as STUN runs it) or uniform (the same in every "
        "layer) [default: owl; uniform with an N:M pattern].", show_default=False)] = None,
    sparsity_pattern: Annotated[str, typer.Option(
        "--sparsity-pattern", help="With --sparsity: unstructured, or N:M (N of every M consecutive weights of a "
        "row, the same sparsity N/M in every layer; 2:4 with --sparsity 0.5 is what sparse tensor cores "
        "accelerate).")] = "unstructured",
    owl_lambda: Annotated[float, typer.Option(
        "--owl-lambda", help="OWL: how far a layer's sparsity may move from --sparsity.")] = 0.08,
    owl_m: Annotated[float, typer.Option(
        "--owl-m", help="OWL: a score above M times its layer's mean counts as an outlier.")] = 5.0,
) -> None:
    """Remove the least important experts and write a standard checkpoint that from_pretrained (and vLLM) loads.

    From a profile: score every expert with --method, keep protected experts (super experts, --protect), and
    remove --ratio of the rest per layer (the same number in every layer, as stock configs need). The plan
    (moekit_plan.json) records every expert's score and why it was kept or removed; the model card records
    method, ratio, data and protections. Or give the experts to keep yourself with --keep-json.

    With --neurons, neurons inside the experts are removed (alone, or after --method's experts in one plan).
    With --sparsity, weights inside the experts are zeroed (STUN's second stage; after --method stun's experts:
    STUN).

    \b
    Examples:
      moekit prune ./model --profile prof --method reap --ratio 0.5 --out ./model-reap50
      moekit prune ./model --profile prof --method frequency --keep 6 --plan-only --out plan.json
      moekit prune ./model --profile prof --neurons camera_p --neuron-ratio 0.25 --out ./model-camera25
      moekit prune ./model --profile prof --method reap --ratio 0.25 --neurons camera_p --neuron-ratio 0.25 \\
        --out ./model-reap25-camera25
      moekit prune ./model --profile prof --method stun --ratio 0.25 --sparsity 0.5 --out ./model-stun
    """
    from moekit.data import DataSpec
    from moekit.edit import PlanError
    from moekit.outputs import check_output
    from moekit.pipeline import RunOptions, kept_per_layer, make_plan, read_inputs
    from moekit.plan import PlanRequest, parse_protect, parse_protect_contrast

    _quiet_transformers()
    protect_file = Path(protect) if protect and Path(protect).is_file() else None
    paths = [profile, keep_json, protect_file, *(DataSpec.parse(d).path for d in data or [])]
    check_output(out_dir, kind="file" if plan_only else "checkpoint", overwrite=overwrite, sources=[model],
                 inputs=paths)
    if plan_only and keep_json is not None:
        raise PlanError("--plan-only needs --profile; a --keep-json file already is a plan")
    neuron_run = neurons is not None or neuron_ratio is not None
    if sparsity is not None:
        _check_sparsity_options(profile, method, {"--keep-json": keep_json, "--data": data or None,
                                                  "--neurons": neurons, "--neuron-ratio": neuron_ratio})
    if shared and not neuron_run:
        raise PlanError("--shared removes shared-expert neurons, so it goes with --neurons CRITERION --neuron-ratio R")
    if neuron_run:
        _check_neuron_options(neurons, neuron_ratio, profile, method,
                              {"--keep-json": keep_json, "--data": data or None})
    protect_text = _read_text_input(protect_file, "--protect file") if protect_file else protect
    inputs = read_inputs(profile, data or [], keep_json, run=RunOptions(device=device, dtype=dtype,
                                                                       sequential=sequential, say=_note),
                         options={"search": naee_search, "tokens": naee_tokens, "progressive": progressive})
    request = PlanRequest(method=method, ratio=ratio, keep=keep, protect_super=not no_protect_super,
                          protect=parse_protect(protect_text), set_weights=inputs.set_weights(set_weights),
                          seed=seed, top_k=top_k, allow_regroup=allow_regroup,
                          protect_contrast=parse_protect_contrast(protect_contrast))
    if neuron_run or sparsity is not None:  # with --ratio/--keep the experts are pruned first, in the same plan
        experts_plan = make_plan(model, request, inputs) if ratio is not None or keep is not None else None
    if sparsity is not None:
        return _sparsify_command(model, out_dir, inputs, profile, sparsity, sparsity_criterion, sparsity_allocation,
                                 sparsity_pattern, owl_lambda, owl_m, set_weights, plan_only, dry_run, overwrite,
                                 dtype, paths, experts_plan)
    if neuron_run:
        return _prune_neurons_command(model, out_dir, inputs, profile, neurons, neuron_ratio, mode, set_weights,
                                      plan_only, dry_run, overwrite, dtype, paths, experts_plan, shared)
    plan = make_plan(model, request, inputs)
    if dry_run:
        return _print_prune_needs(model, out_dir, kept_per_layer(plan), dtype)
    _write_or_apply(model, plan, out_dir, plan_only, overwrite, dtype, paths,
                    f"keep {plan['num_experts']['after']} of {plan['num_experts']['before']} experts per layer "
                    f"({method})")


def _write_or_apply(model: str, plan: dict[str, Any], out_dir: Path, plan_only: bool, overwrite: bool, dtype: str,
                    paths: list[Any], what: str) -> None:
    """The end of moekit prune and moekit merge: write the plan (--plan-only), or apply it and say what changed
    (with the contrast audit's warnings first)."""
    from moekit.pipeline import apply_plan, write_plan
    from moekit.plan import audit_warnings

    for warning in audit_warnings(plan):
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)

    if plan_only:
        write_plan(plan, out_dir, overwrite=overwrite, sources=[model], inputs=paths)
        _wrote(f"plan {out_dir}: {what}; apply it with moekit apply {model} {out_dir} --out DIR")
        return
    _print_pruned(apply_plan(model, plan, out_dir, overwrite=overwrite, dtype=dtype,
                             reproduce=" ".join(["moekit", *sys.argv[1:]])))


def _check_neuron_options(criterion: str | None, ratio: float | None, profile: Path | None, method: str,
                          refused: dict[str, Any]) -> None:
    """What ``moekit prune --neurons`` needs, checked before anything is read."""
    from moekit.edit import PlanError

    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise PlanError(f"--neurons scores neurons from a profile, so it takes no {', '.join(given)}; to prune "
                        "experts in the same plan, give --method with --ratio or --keep")
    if method == "naee":
        raise PlanError("--neurons with --method naee is not supported: prune experts with naee first (moekit "
                        "prune --method naee ... --out A), then neurons of A")
    if criterion is None or ratio is None:
        raise PlanError("give both --neurons CRITERION (camera_p, heapr) and --neuron-ratio R (fraction of each "
                        "expert's neurons removed, e.g. 0.25)")
    if profile is None:
        raise PlanError("--neurons scores neurons from a profile: give --profile PROFILE (moekit profile MODEL "
                        "--data NAME=PATH --neuron-stats --out PROFILE; --gradients instead of --neuron-stats for "
                        "heapr)")


def _prune_neurons_command(model: str, out_dir: Path, inputs: Any, profile: Path, criterion: str, ratio: float,
                           mode: str, set_weights: str | None, plan_only: bool, dry_run: bool, overwrite: bool,
                           dtype: str, paths: list[Any], experts_plan: dict[str, Any] | None,
                           shared: bool = False) -> None:
    """``moekit prune --neurons``: a neuron plan from the profile (after ``experts_plan``'s experts are removed,
    when given), written or applied."""
    from moekit.arch import MoEModelView
    from moekit.edit.neurons import make_neuron_plan
    from moekit.model_io import describe_source, load_structure

    view = MoEModelView.from_model(load_structure(model))
    plan = make_neuron_plan(model, view, inputs.profile, criterion, ratio, inputs.set_weights(set_weights),
                            str(Path(profile).resolve()), describe_source(model), progress=True, mode=mode,
                            experts_plan=experts_plan, shrink_shared=shared)
    width = plan["width"]
    also = (f" and {width['shared']['after']} of {width['shared']['before']} in the shared experts"
            if "shared" in width else "")
    what = (f"keep {width['after']} of {width['before']} neurons in every routed expert{also} ({criterion})"
            if mode == "uniform" else f"zero {plan['masked_neurons']['per_layer']} of the "
            f"{plan['masked_neurons']['of']} routed-expert neurons of every MoE layer ({criterion}; saves nothing on "
            "disk)")
    _finish_inner_plan(model, plan, experts_plan, what, dry_run, out_dir, plan_only, overwrite, dtype, paths)


def _finish_inner_plan(model: str, plan: dict[str, Any], experts_plan: dict[str, Any] | None, what: str,
                       dry_run: bool, out_dir: Path, plan_only: bool, overwrite: bool, dtype: str,
                       paths: list[Any]) -> None:
    """The end of ``prune --neurons`` and ``prune --sparsity``: say what the plan does (after its expert pruning,
    when it has one) and stop (--dry-run), or write or apply it."""
    if experts_plan is not None:
        what = (f"keep {plan['num_experts']['after']} of {plan['num_experts']['before']} experts per layer "
                f"({experts_plan['method']}), then " + what)
    if dry_run:
        _note(what)
        out.print("dry run: nothing was written", highlight=False)
        return
    _write_or_apply(model, plan, out_dir, plan_only, overwrite, dtype, paths, what)


def _check_sparsity_options(profile: Path | None, method: str, refused: dict[str, Any]) -> None:
    """What ``moekit prune --sparsity`` needs, checked before anything is read."""
    from moekit.edit import PlanError

    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise PlanError(f"--sparsity zeroes weights scored from a profile, so it takes no {', '.join(given)}; to "
                        "prune experts first in the same plan (STUN), give --method stun with --ratio or --keep")
    if method == "naee":
        raise PlanError("--sparsity with --method naee is not supported: prune experts with naee first (moekit "
                        "prune --method naee ... --out A), then sparsify A")
    if profile is None:
        raise PlanError("--sparsity scores weights from a profile: give --profile PROFILE (moekit profile MODEL "
                        "--data NAME=PATH --input-norms --out PROFILE)")


def _sparsify_command(model: str, out_dir: Path, inputs: Any, profile: Path, sparsity: float, criterion: str,
                      allocation: str | None, pattern: str, owl_lambda: float, owl_m: float, set_weights: str | None,
                      plan_only: bool, dry_run: bool, overwrite: bool, dtype: str, paths: list[Any],
                      experts_plan: dict[str, Any] | None) -> None:
    """``moekit prune --sparsity``: a sparsity plan from the profile (after ``experts_plan``'s experts are removed,
    when given: STUN), written or applied."""
    from moekit.arch import MoEModelView
    from moekit.edit.sparsity import make_sparsity_plan
    from moekit.model_io import describe_source, load_structure

    view = MoEModelView.from_model(load_structure(model))
    plan = make_sparsity_plan(model, view, inputs.profile, criterion, sparsity, allocation=allocation,
                              pattern=pattern, set_weights=inputs.set_weights(set_weights),
                              profile_path=str(Path(profile).resolve()), source_name=describe_source(model),
                              progress=True, experts_plan=experts_plan, owl_m=owl_m, owl_lambda=owl_lambda)
    layers = [entry["sparsity"] for entry in plan["layers"].values()]
    owl = plan["details"]["allocation"] == "owl"
    what = (f"zero {sparsity:g} of every kept routed expert's weights ({criterion}, {pattern}, "
            + (f"OWL layer sparsities {min(layers):.3f} to {max(layers):.3f}" if owl else "uniform")
            + "; dense zeros save nothing on disk)")
    _finish_inner_plan(model, plan, experts_plan, what, dry_run, out_dir, plan_only, overwrite, dtype, paths)


def _print_prune_needs(model: str, out_dir: Path, kept: int, dtype: str) -> None:
    """What ``moekit prune --dry-run`` says: the plan's size against the output disk (refused if it cannot fit)."""
    from moekit.needs import format_bytes, prune_needs

    needs = prune_needs(model, out_dir, kept=kept, dtype=dtype)
    _note(f"keep {kept} experts per MoE layer: output about {format_bytes(needs.output_bytes)}; {needs.output_dir} "
          f"has {format_bytes(needs.output_free_bytes)} free")
    needs.check(needs_device=False)
    out.print("dry run: nothing was written", highlight=False)


def _print_pruned(result: Any) -> None:
    from moekit.summary import format_count

    b, a = result.before, result.after
    if isinstance(result.plan, dict) and result.plan.get("details", {}).get("mechanism") in ("correction_bias",
                                                                                              "router_bias"):
        count = sum(len(e.get("masked", [])) for e in result.plan["layers"].values())
        _wrote(f"{result.out}: {count} experts masked (never selected; their {result.plan['details']['mechanism']} "
               "entries are -inf); every weight kept")
        return
    width = result.plan.get("width") if isinstance(result.plan, dict) else None
    masked = result.plan.get("masked_neurons") if isinstance(result.plan, dict) else None
    measured = result.plan.get("measured_sparsity") if isinstance(result.plan, dict) else None
    experts = f"{b.num_experts} -> {a.num_experts} experts, " if a.num_experts != b.num_experts else ""
    if measured:
        _wrote(f"{result.out}: {experts}{100 * measured['routed_expert_weights']:.2f}% of the routed-expert weights "
               f"of {len(a.moe_layers)} MoE layers are zero (stored densely: no memory saved without a sparse format "
               "or kernel)")
        return
    if masked:
        _wrote(f"{result.out}: {experts}{masked['per_layer']} of the {masked['of']} routed-expert neurons of each of "
               f"{len(a.moe_layers)} MoE layers zeroed (masked: zeroed neurons save nothing on disk)")
        return
    if width:  # a neuron plan
        _wrote(f"{result.out}: {experts}{width['before']} -> {width['after']} neurons in every routed expert of "
               f"{len(a.moe_layers)} MoE layers; routed-expert parameters {format_count(b.routed_expert_parameters)} "
               f"-> {format_count(a.routed_expert_parameters)}, parameters {format_count(b.total_parameters)} -> "
               f"{format_count(a.total_parameters)}")
        return
    top_k = f", top-{b.top_k} -> top-{a.top_k}" if a.top_k != b.top_k else ""
    _wrote(f"{result.out}: {b.num_experts} -> {a.num_experts} experts in each of "
              f"{len(a.moe_layers)} MoE layers{top_k}; parameters {format_count(b.total_parameters)} -> "
              f"{format_count(a.total_parameters)}, active per token {format_count(b.active_parameters)} -> "
              f"{format_count(a.active_parameters)}")


@app.command()
def apply(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    plan: Annotated[Path, typer.Argument(help="A plan written by moekit prune --plan-only or moekit merge "
                                         "--plan-only (or a moekit_plan.json, or a keep-json file).")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the edited checkpoint.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (never the source).")]
    = False,
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="dtype to load and save in: auto (as stored), float32, ...")] = "auto",
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="A sparsity plan (moekit prune --sparsity --plan-only) computes its masks from the "
        "profile it was made from, read from the path the plan records; give it here if it has moved.")] = None,
) -> None:
    """Apply a saved pruning, merge, neuron, sparsity or routing-mask plan to a model: the same plan gives the
    same checkpoint, byte for byte.

    Example: moekit apply ./model plan.json --out ./model-pruned
    """
    from moekit.outputs import check_output
    from moekit.pipeline import apply_plan, read_plan
    from moekit.profile.profile_file import Profile

    _quiet_transformers()
    check_output(out_dir, kind="checkpoint", overwrite=overwrite, sources=[model], inputs=[plan, profile])
    result = apply_plan(model, read_plan(plan), out_dir, overwrite=overwrite, dtype=dtype,
                        reproduce=" ".join(["moekit", *sys.argv[1:]]),
                        profile=Profile.load(profile) if profile is not None else None)
    _print_pruned(result)


@app.command()
def merge(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="New directory for the merged checkpoint (with --plan-only: the plan JSON file).")],
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="A profile of MODEL (moekit profile; m_smoe, hc_smoe and sub_moe need --merge-stats).")]
    = None,
    method: Annotated[str, typer.Option(
        help="hc_smoe (cluster experts by mean output, average linkage; frequency-weighted average), m_smoe "
        "(dominant experts by frequency, the others by router-logit similarity, neurons aligned by weight "
        "matching), sub_moe (k-means on outputs, joint-SVD merge), dern (drop by router importance, move the "
        "dropped experts' neurons into the most similar neurons of the kept ones).")] = "hc_smoe",
    ratio: Annotated[float | None, typer.Option(
        help="Fraction of experts removed from every MoE layer by merging, e.g. 0.5.")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="Experts per MoE layer after merging.")] = None,
    set_weights: Annotated[str | None, typer.Option(
        "--set-weights", help="Weigh the profile's named sets, e.g. code=2,prose=1 (sets left out get 0).")] = None,
    protect: Annotated[str | None, typer.Option(
        help="Experts kept alone (nothing merged into them): LAYER:EXPERT pairs (3:17,5:2) or a file holding them.")]
    = None,
    no_protect_super: Annotated[bool, typer.Option(
        "--no-protect-super", help="Allow merging super experts (kept alone by default).")] = False,
    protect_contrast: Annotated[str | None, typer.Option(
        "--protect-contrast", metavar="A:B:N", help="Keep alone the N experts of every layer that profile set A "
        "routes to most more than set B (moekit contrast), e.g. harmful:harmless:4.")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help="Also lower the experts each token is routed to.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of sub_moe's k-means seeding.")] = 0,
    svd_rank: Annotated[int | None, typer.Option(
        "--svd-rank", help="sub_moe: rebuild each merged projection at this rank from the cluster's shared singular "
        "vectors (default: full rank, which equals the frequency-weighted average).")] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="dern: a dropped expert's neuron moves only if its cosine to the best-matching kept "
        "neuron exceeds this, else it is discarded.")] = 0.6,
    device: Annotated[str, typer.Option(
        help="dern: where its neuron cosines are computed (every dropped neuron against every kept one; ~20 TFLOP "
        "per Qwen3-30B-A3B layer at 50%): cpu, cuda, cuda:N or auto (the first GPU).")] = "cpu",
    plan_only: Annotated[bool, typer.Option(
        "--plan-only", help="Write the plan (JSON) to --out and stop; apply it later with moekit apply.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it exists (never the source).")] = False,
    allow_regroup: Annotated[bool, typer.Option(
        "--allow-regroup", help="Group-limited routers (n_group > 1): allow merging across routing groups and "
        "unequal counts per group.")] = False,
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="dtype to load and save in: auto (as stored), float32, bfloat16, ...")] = "auto",
) -> None:
    """Merge experts into fewer and write a standard checkpoint with fewer experts on disk.

    Each MoE layer's experts are grouped by --method; each group becomes one expert (the weighted average of its
    members, neurons aligned where the method aligns them) that keeps the router row of one member. The output
    has --ratio fewer experts in config.json and in its tensors, so it is as small as a pruned checkpoint of the
    same budget. The plan (moekit_plan.json) lists every group, the weights and each expert's reason.

    \b
    Examples:
      moekit profile ./model --data code=./src --merge-stats --out prof
      moekit merge ./model --profile prof --method hc_smoe --ratio 0.5 --out ./model-hc50
      moekit merge ./model --profile prof --method m_smoe --keep 4 --plan-only --out plan.json
    """
    from moekit.edit import PlanError
    from moekit.model_io import check_device
    from moekit.outputs import check_output
    from moekit.pipeline import RunOptions, make_plan, read_inputs
    from moekit.plan import PlanRequest, parse_protect, parse_protect_contrast

    _quiet_transformers()
    protect_file = Path(protect) if protect and Path(protect).is_file() else None
    paths = [profile, protect_file]
    check_output(out_dir, kind="file" if plan_only else "checkpoint", overwrite=overwrite, sources=[model],
                 inputs=paths)
    if profile is None:
        raise PlanError("moekit merge groups experts by a profile of the model: give --profile PROFILE (moekit "
                        "profile MODEL --data NAME=PATH --merge-stats --out PROFILE)")
    protect_text = _read_text_input(protect_file, "--protect file") if protect_file else protect
    check_device(device)
    inputs = read_inputs(profile, run=RunOptions(device=device, dtype=dtype, say=_note))
    from moekit.merge.methods import method_options

    extra = method_options(method, svd_rank, threshold)
    request = PlanRequest(method=method, ratio=ratio, keep=keep, protect_super=not no_protect_super,
                          protect=parse_protect(protect_text), set_weights=inputs.set_weights(set_weights),
                          seed=seed, top_k=top_k, allow_regroup=allow_regroup, extra=extra,
                          protect_contrast=parse_protect_contrast(protect_contrast))
    plan = make_plan(model, request, inputs, kind="merge")
    _write_or_apply(model, plan, out_dir, plan_only, overwrite, dtype, paths,
                    f"merge {plan['num_experts']['before']} experts into {plan['num_experts']['after']} per layer "
                    f"({method})")


@app.command()
def mask(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="New directory for the masked checkpoint (with --plan-only: the plan JSON file).")],
    experts: Annotated[str | None, typer.Option(
        "--experts", help="Experts never selected: LAYER:EXPERT pairs, e.g. 3:17,3:40,5:2.")] = None,
    from_contrast: Annotated[str | None, typer.Option(
        "--from-contrast", metavar="A:B:N", help="Mask the N experts of every layer that profile set A routes to "
        "most more than set B (moekit contrast), e.g. harmful:harmless:2 (an ablation of those experts).")] = None,
    profile: Annotated[Path | None, typer.Option(help="The profile --from-contrast reads.")] = None,
    allow_remove: Annotated[bool, typer.Option(
        "--allow-remove", help="Where the family has no selection bias to hold a mask, remove the experts instead "
        "(a prune: the same number in every layer; the card says so).")] = False,
    plan_only: Annotated[bool, typer.Option("--plan-only", help="Write the plan JSON only.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it is an earlier moekit output.")]
    = False,
) -> None:
    """Write a stock checkpoint whose routers never select the given experts (a routing mask).

    Exact where the family has a selection bias: the masked experts' entries of the correction bias
    (DeepSeek-V3, GLM-4-MoE, ERNIE-4.5, ...) or of the router's logit bias (GPT-OSS) become -inf, so
    they are never chosen; every weight stays. Families without one cannot hold a mask in a stock
    config: --allow-remove removes the experts instead. Streamed one decoder layer at a time.

    Example: moekit mask MODEL --from-contrast harmful:harmless:2 --profile prof --out masked
    """
    from moekit.arch import MoEModelView
    from moekit.edit import PlanError
    from moekit.edit.mask import check_mask, make_mask_plan, make_mask_removal_plan, mask_mechanism, parse_mask
    from moekit.model_io import describe_source, load_structure
    from moekit.outputs import check_output

    _quiet_transformers()
    check_output(out_dir, kind="file" if plan_only else "checkpoint", overwrite=overwrite, sources=[model],
                 inputs=[profile])
    if (experts is None) == (from_contrast is None):
        raise PlanError("give the experts to mask: --experts LAYER:EXPERT,... or --from-contrast A:B:N --profile P "
                        "(one of the two)")
    view = MoEModelView.from_model(load_structure(model))
    if experts is not None:
        masked, why = parse_mask(experts), "named by the user"
    else:
        from moekit.plan import parse_protect_contrast
        from moekit.profile import Profile
        from moekit.profile.contrast import top_contrast_experts

        a, b, per_layer = parse_protect_contrast(from_contrast) or ("", "", 0)
        if profile is None:
            raise PlanError("--from-contrast reads a profile: give --profile PROFILE")
        loaded = Profile.load(profile)
        loaded.check_model(view)
        masked = top_contrast_experts(loaded, a, b, per_layer)
        why = f"the {per_layer} experts per layer that {a!r} routes to most more than {b!r} (moekit contrast)"
    check_mask(view, masked)
    source = describe_source(model)
    if mask_mechanism(view) is None:
        if not allow_remove:
            raise PlanError(f"{view.model_type} has no selection bias (correction bias or router logit bias) in which "
                            "a stock config can hold a mask: give --allow-remove to remove the experts instead (a "
                            "prune)")
        plan = make_mask_removal_plan(view, masked, source, why)
        what = (f"remove {plan['num_experts']['before'] - plan['num_experts']['after']} experts per layer ({why}; no "
                "selection bias to hold a mask)")
    else:
        plan = make_mask_plan(view, masked, source, why)
        what = f"mask {sum(len(set(v)) for v in masked.values())} experts ({why}) through the {mask_mechanism(view)}"
    _write_or_apply(model, plan, out_dir, plan_only, overwrite, "auto", [profile], what)


class _DefaultCollectGroup(TyperGroup):
    """``moekit profile MODEL ...`` means ``moekit profile collect MODEL ...``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["collect", *args]
        return super().parse_args(ctx, args)


profile_app = typer.Typer(
    cls=_DefaultCollectGroup, no_args_is_help=True,
    help="Measure how the routers use the experts on calibration text; save a reusable profile.\n\n"
    "moekit profile MODEL --data NAME=PATH ... --out DIR   (short for: moekit profile collect ...)\n\n"
    "moekit profile merge A B --out C   (add up profiles of disjoint data)",
)
app.add_typer(profile_app, name="profile")


@profile_app.command("collect")
def profile_collect(
    model: Annotated[str, typer.Argument(help="Model directory or hub id.")],
    data: Annotated[list[str], typer.Option(
        "--data", help="A named calibration set, NAME=PATH (repeat for several; each is kept separately). PATH: "
        "a text file, a directory of files, .jsonl with a 'text' field or chat 'messages', .parquet, or a "
        "datasets.save_to_disk directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the profile.")],
    seq_len: Annotated[int | None, typer.Option(
        "--seq-len", help="Tokens per packed sequence [default: 2048, or the model's maximum if smaller].")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Token budget per set (documents are shuffled with --seed, then packed).")] = 262_144,
    seed: Annotated[int, typer.Option(help="Seed for the document order.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 8,
    device: Annotated[str, typer.Option(
        help="cpu, cuda, cuda:N, or auto (spread over every GPU of this host with accelerate).")] = "cpu",
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="auto (as stored), bfloat16, float16, float32.")] = "auto",
    neuron_stats: Annotated[bool, typer.Option(
        "--neuron-stats", help="Also keep per-neuron sums of (g*a)^2 and max |g*a| (for neuron-level "
        "criteria; E x I numbers per layer and set).")] = False,
    merge_stats: Annotated[bool, typer.Option(
        "--merge-stats", help="Also keep what the merging methods read: router-logit products (m_smoe) and every "
        "expert's mean output over all tokens (hc_smoe, sub_moe). Runs all E experts on every token: the experts "
        "do E/top_k times their usual work.")] = False,
    gradients: Annotated[bool, typer.Option(
        "--gradients", help="Also run a backward pass per batch from its next-token loss and keep, per neuron, the "
        "squared output gradient along its down-projection column (HEAPr's second-order statistic; includes "
        "--neuron-stats). Needs the whole model on the device with a batch's activations of every layer (no "
        "--sequential); use a smaller --batch-size if it does not fit.")] = False,
    input_norms: Annotated[bool, typer.Option(
        "--input-norms", help="Also keep, per expert, the squared norm of every input feature of its projections "
        "over the tokens routed to it (Wanda's input norms, for moekit prune --sparsity; E x (hidden + expert width) "
        "numbers per layer and set).")] = False,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory, if not the model's.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the inputs and print the memory and disk the run needs, then stop.")] = False,
    sequential: Annotated[bool | None, typer.Option(
        "--sequential/--whole-model", help="Run one decoder layer at a time from the checkpoint's shards (memory of "
        "one layer; same profile) or the whole model at once [default: layer by layer only when the whole model "
        "does not fit the device].", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted layer-by-layer profile from the last saved layer (its state is "
        "kept beside OUT, in .OUT.moekit-resume, saved every 5 minutes; MOEKIT_RESUME_INTERVAL=seconds changes "
        "that). Give the same command and options as before.")] = False,
) -> None:
    """Run calibration text through the model and save what routers and experts did (a profile).

    One pass serves every criterion: counts, gate and router-probability sums, expert output norms
    (plain and gate-weighted), maxima for super-expert detection, EASY-EP token weights,
    co-activation and chunk sparsity, per MoE layer, per expert and per named set. Padding never
    counts. Score and prune from the profile as often as you like without running the model again.

    \b
    Data parallel over N processes (GPUs, or CPU processes with gloo; several nodes with --nnodes):
    torchrun --nproc-per-node N -m moekit profile MODEL --data ... --device cuda --out prof
    (each rank runs every N-th batch; rank 0 writes the profile of all of them).

    \b
    Models larger than the GPU or the RAM run layer by layer (--sequential): the embedding and one
    decoder layer at a time are loaded from the safetensors shards (the next one read meanwhile), and
    every batch's hidden states wait between layers, on the device or in CPU memory.

    Example: moekit profile ./tiny-qwen3-moe --data code=./src --data prose=notes.txt --seq-len 128 --out prof
    """
    from moekit.distributed import is_main_process
    from moekit.profile import profile_model

    _quiet_transformers()
    result = profile_model(model, data, out_dir, seq_len=seq_len, max_tokens=max_tokens, seed=seed,
                           batch_size=batch_size, device=device, dtype=dtype, neuron_stats=neuron_stats,
                           merge_stats=merge_stats, gradients=gradients, input_norms=input_norms,
                           overwrite=overwrite, tokenizer=tokenizer,
                           dry_run=dry_run,
                           sequential=sequential, resume=resume, say=_note if is_main_process() else None)

    if result is None:
        out.print("dry run: nothing was loaded or written", highlight=False)
        return

    if not is_main_process():  # under torchrun rank 0 alone writes and reports
        return
    timing = result.meta["timing"]
    sets = ", ".join(f"{s['name']} {s['tokens']:,} tokens" for s in result.meta["sets"])
    _wrote(f"{out_dir}: {sets}; {timing['seconds']:.1f} s, "
              f"{timing['tokens_per_second']:,.0f} tokens/s")


@profile_app.command("merge")
def profile_merge(
    profiles: Annotated[list[Path], typer.Argument(help="Two or more profile directories of the same model.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the merged profile.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Add up profiles of disjoint data (other runs, machines or shards) into one.

    Sets with the same name combine (sums add, maxima take the larger); other sets stay separate.
    Profiles of the same data (same content hash and draw) are refused: their tokens would count twice.
    Options that differ between the profiles (seed, sequence length, dtype, ...) are kept per source
    in the merged profile's metadata (merged_from, options_differ).

    Example: moekit profile merge prof-part1 prof-part2 --out prof
    """
    from moekit.outputs import check_output
    from moekit.profile import Profile, ProfileError, merge_profiles

    if len(profiles) < 2:
        raise ProfileError("give at least two profiles to merge")
    check_output(out_dir, kind="profile", overwrite=overwrite, inputs=profiles)
    loaded = [Profile.load(path) for path in profiles]
    models = [p.meta["model"].get("source") for p in loaded]  # never written into the profiled model
    merged = loaded[0]
    for other in loaded[1:]:
        merged = merge_profiles(merged, other)
    merged.save(out_dir, overwrite=overwrite, sources=models, inputs=profiles)
    sets = ", ".join(f"{s['name']} {s['tokens']:,} tokens" for s in merged.meta["sets"])
    _wrote(f"{out_dir}: {sets}")


@app.command()
def analyze(
    profile: Annotated[Path, typer.Argument(help="A profile directory written by moekit profile.")],
    json_out: Annotated[str | None, typer.Option("--json", metavar="FILE|-", help=JSON_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --json file if it exists.")] = False,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="Analyse only these named sets (repeatable); default: all together.")] = None,
    similarity_to: Annotated[str | None, typer.Option(
        "--similarity-to", metavar="SET", help="Also every other set's routing similarity to this one per layer (1 - "
        "JS divergence of their routing shares; e.g. each language to en on parallel text).")] = None,
    similarity_sets: Annotated[list[str] | None, typer.Option(
        "--similarity-sets", metavar="PATTERN", help="With --similarity-to: only the sets matching these names or "
        "shell-style patterns (e.g. 'parallel-*'); repeatable. Default: every set.")] = None,
) -> None:
    """Explain routing from a profile: load balance, entropy, sparsity, super experts, specialisation.

    Load CV is the coefficient of variation of expert counts (0 = even); entropies are normalised
    by log E (1 = uniform); TLS / CLS-L are token- and chunk-level sparsity (1 - share of experts
    used per token / per chunk of L tokens). Super experts follow Su et al. (2025). Specialisation
    lists, per named set, the experts it uses most relative to all sets (lift) and how much the
    sets' most-used experts overlap (Jaccard).

    Example: moekit analyze prof --json -
    """
    from moekit.profile import Profile
    from moekit.profile.analyze import analyze_profile

    _check_json_out(json_out, overwrite, [profile], [])
    if similarity_sets and similarity_to is None:
        raise typer.BadParameter("--similarity-sets chooses the sets compared with --similarity-to SET: give that too")
    loaded = Profile.load(profile)
    for name in sets or []:
        loaded.set_index(name)
    report = analyze_profile(loaded, sets or None)
    if similarity_to is not None:
        from moekit.profile.contrast import routing_similarity

        report["similarity"] = routing_similarity(loaded, similarity_to, similarity_sets)
    if _json_to_stdout(json_out, report):
        return
    _print_analysis(report)
    if similarity_to is not None:
        sim = report["similarity"]
        table = Table(title=f"routing similarity to {sim['reference']} per layer (1 - JS divergence, bits)")
        table.add_column("set")
        for layer in sim["layers"]:
            table.add_column(str(layer), justify="right")
        for name, values in sim["similarity"].items():
            table.add_row(escape(name), *(f"{v:.3f}" for v in values))
        out.print(table)
    _write_json(json_out, report)


def _print_analysis(report: dict[str, Any]) -> None:
    sets = ", ".join(f"{s['name']} ({s['tokens']:,} tokens)" for s in report["sets"])
    out.print(f"[bold]{escape(str(report['model']['source']))}[/] ({report['model']['fingerprint']['model_type']})"
              f"  sets: {escape(sets)}")
    table = Table(title=f"routing per MoE layer ({', '.join(report['analysed_sets'])})")
    chunk_sizes = list(report["layers"][0]["chunk_sparsity"])
    for col in ("layer", "load CV", "max/mean", "load entropy", "router entropy", "dead", "< 1/4 mean", "TLS",
                *(f"CLS-{c}" for c in chunk_sizes)):
        table.add_column(col, justify="right")
    for row in report["layers"]:
        table.add_row(str(row["layer"]), f"{row['load_cv']:.3f}", f"{row['max_over_mean']:.2f}",
                      f"{row['load_entropy']:.3f}", f"{row['router_entropy']:.3f}", str(len(row["dead_experts"])),
                      str(len(row["starved_experts"])), f"{row['token_sparsity']:.3f}",
                      *(f"{row['chunk_sparsity'][c]:.3f}" for c in chunk_sizes))
    out.print(table)
    for warning in report["warnings"]:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    supers = report["super_experts"]
    out.print("super experts: " + (", ".join(f"layer {s['layer']} expert {s['expert']} (max |act| "
                                             f"{s['act_max']:.3g} > {s['threshold']:.3g})" for s in supers)
                                   if supers else "none"))
    spec = report["specialisation"]
    if len(spec["sets"]) > 1:
        pref = Table(title="experts each set prefers (highest lift first), per layer")
        pref.add_column("layer", justify="right")
        for name in spec["sets"]:
            pref.add_column(name)
        layers = [entry["layer"] for entry in next(iter(spec["sets"].values()))]
        for i, layer in enumerate(layers):
            pref.add_row(str(layer), *(", ".join(f"{e} (x{lift:.2f})" for e, lift in
                                                  zip(spec["sets"][n][i]["experts"][:3], spec["sets"][n][i]["lift"][:3],
                                                      strict=True)) for n in spec["sets"]))
        out.print(pref)
        for pair, value in spec["overlap"].items():
            a, b = pair.split("|")
            out.print(f"overlap of most-used experts, {a} vs {b}: mean Jaccard {value['mean_jaccard']:.3f}")


@app.command()
def contrast(
    profile: Annotated[Path, typer.Argument(help="A profile directory written by moekit profile with two or more "
                                                 "named sets (--data NAME=PATH ...).")],
    a: Annotated[str, typer.Option("--a", help="The set whose experts are looked for (e.g. harmful, code, de).")],
    b: Annotated[str, typer.Option("--b", help="The set it is compared with (e.g. harmless, prose, en).")],
    top: Annotated[int, typer.Option("--top", help="Experts listed per layer and direction.")] = 5,
    prior: Annotated[float, typer.Option(
        "--prior", help="Pseudo-selections per expert of the Dirichlet prior: larger pulls rarely routed experts "
        "harder toward no difference.")] = 10.0,
    json_out: Annotated[str | None, typer.Option("--json", metavar="FILE|-", help=JSON_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --json file if it exists.")] = False,
) -> None:
    """Which experts set A routes to more than set B, per MoE layer, from a profile alone.

    Per expert: the log-odds ratio of its routing selections in A against B with an informative
    Dirichlet prior (Monroe et al. 2008: rarely routed experts are pulled toward 0 instead of topping
    the list) and its z-score. The z-score takes selections as independent; tokens of one sequence
    route alike, so it overstates significance: read it as a ranking, not a p-value. Per layer: the
    Jensen-Shannon divergence of the two sets' routing shares (bits: 0 = alike, 1 = disjoint experts),
    the total variation, and how many experts carry 50% / 90% of the difference.

    Example: moekit profile MODEL --data code=code.txt --data prose=prose.txt --out prof;
    moekit contrast prof --a code --b prose --json contrast.json
    """
    from moekit.profile import Profile
    from moekit.profile.contrast import check_contrast_sets, contrast_profile

    _check_json_out(json_out, overwrite, [profile], [])
    loaded = Profile.load(profile)
    check_contrast_sets(loaded, a, b)
    report = contrast_profile(loaded, a, b, prior=prior, top=top)
    if _json_to_stdout(json_out, report):
        return
    table = Table(title=f"routing of {a} against {b} ({report['tokens'][a]:,} and {report['tokens'][b]:,} tokens)")
    for col in ("layer", "JS bits", "50/90%"):
        table.add_column(col, justify="right", no_wrap=True)
    for col in (f"more in {a}", f"more in {b}"):
        table.add_column(col)

    def listed(entries: list[dict[str, Any]]) -> str:  # expert id and log-odds
        return " ".join(f"{e['expert']}:{e['log_odds']:+.1f}" for e in entries[:3])
    for row in report["layers"]:
        carrying = row["experts_carrying"]
        table.add_row(str(row["layer"]), f"{row['js_divergence_bits']:.3f}",
                      f"{carrying['50%']}/{carrying['90%']}", escape(listed(row["top_a"])),
                      escape(listed(row["top_b"])))
    out.print(table)
    out.print(f"expert:log-odds, top 3 each way; 50/90%: experts carrying that share of the difference. Mean JS "
              f"divergence {report['mean_js_divergence_bits']:.3f} bits; most divergent layer "
              f"{report['most_divergent_layer']}. --json has every expert, its z-score (which treats routing "
              "selections as independent, so it overstates significance) and the total variation.", highlight=False)
    _write_json(json_out, report)


@app.command("run")
def run_recipe_command(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML file (see moekit.recipe for every key).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the recipe's out directory.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only validate the recipe and print it resolved.")] = False,
) -> None:
    """Run the pipeline (profile, prune or merge, evaluate, report) from one YAML file; unknown keys are errors.

    The resolved recipe (every default filled in) is saved in the output directory beside the profile
    (profile/), the pruned or merged model (model/), the evaluations (eval/) and the report (report/), so the
    run can be repeated exactly. A merge: step instead of prune: takes moekit merge's methods and options
    (merge: {method: hc_smoe, ratio: 0.5}; hc_smoe, m_smoe and sub_moe need profile: {merge_stats: true}).

    Example recipe:

    \b
      model: ./tiny-qwen3-moe
      out: runs/reap50
      profile: {data: {code: ./src, prose: README.md}, seq_len: 128, max_tokens: 20000}
      prune: {method: reap, ratio: 0.5}
      eval: {text: {code: ./held_out_code}, prompts: ["def add("]}
    """
    from moekit.recipe import read_recipe, resolved_yaml, run_recipe  # pydantic only here

    _quiet_transformers()
    loaded = read_recipe(recipe)
    if check:
        out.print(resolved_yaml(loaded), markup=False, soft_wrap=True)
        return
    written = run_recipe(loaded, overwrite=overwrite, recipe_file=recipe)
    _wrote(", ".join(f"{k}: {v}" for k, v in written.items()))


def _check_json_out(target: str | None, overwrite: bool, sources: list[Any], inputs: list[Any]) -> None:
    """Check a --json file before the work starts (not after an hour of evaluation); ``-`` is stdout."""
    from moekit.outputs import check_output

    if target not in (None, "-"):
        check_output(Path(target), kind="file", overwrite=overwrite, sources=sources, inputs=inputs)


def _json_to_stdout(target: str | None, data: Any) -> bool:
    """``--json -`` (every command): print ``data`` on stdout and say so (True: print nothing else)."""
    if target != "-":
        return False
    sys.stdout.write(json.dumps(data, indent=1) + "\n")
    return True


def _write_json(target: str | None, data: Any) -> None:
    """``--json FILE`` (every command): write ``data`` there, atomically (checked before the work by
    ``_check_json_out``)."""
    from moekit.outputs import write_json_file

    if target not in (None, "-"):
        write_json_file(Path(target), data)
        _wrote(target)


@app.command("eval")
def eval_command(
    model: Annotated[str | None, typer.Argument(help="Model directory or hub id.")] = None,
    task: Annotated[list[str] | None, typer.Option(
        "--task", help="A built-in task (arc_easy, arc_challenge, piqa, hellaswag, winogrande, mmlu, "
        "lambada_openai, gsm8k: lm-evaluation-harness's prompts and metrics on local files; GSM8K's few-shot "
        "exemplars: the first other test items), a task YAML file (kinds multiple_choice, generation, perplexity, and "
        "refusal: the share of requests refused, e.g. benchmarks/data/safety/harmful_refusal.yaml), or -- with "
        "lm-evaluation-harness installed "
        "(pip install 'moekit[lm-eval]') -- any of its registered task names, run by lm-eval itself on this model "
        "(its datasets download from the hub unless cached); repeatable.")] = None,
    text: Annotated[list[str] | None, typer.Option(
        "--text", help="Perplexity on your own text: NAME=PATH (any format moekit profile reads); repeatable.")]
    = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items of each task (per MMLU subject).")]
    = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples (mmlu, gsm8k).")]
    = None,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", help="Context window for scoring and perplexity [default: the model's].")] = None,
    stride: Annotated[int | None, typer.Option(
        help="Perplexity: tokens the window advances (< --max-length gives every token more context) "
        "[default: the window, lm-eval's rolling windows].")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="auto (as stored), bfloat16, float32.")] = "auto",
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", help="A fixed prompt to complete greedily (generation sample; repeatable).")] = None,
    json_out: Annotated[str | None, typer.Option("--json", metavar="FILE|-", help=JSON_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --json file if it exists.")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Folder of the built-in tasks' benchmark files [default: $MOEKIT_EVAL_DATA or "
        "../shared/data/eval; without either and without the files there, the same benchmarks from the hub, "
        "through datasets].")]
    = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory, if not the model's.")] = None,
    allow_task_data_outside: Annotated[bool, typer.Option(
        "--allow-task-data-outside", help="Let a task YAML's data_path point outside the YAML's folder (absolute "
        "paths, ..); refused by default so that a task file you were given cannot read your other files.")]
    = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the inputs and print the memory the run needs, then stop.")] = False,
    list_tasks: Annotated[bool, typer.Option(
        "--list-tasks", help="List the built-in tasks (what each measures, the file it reads) and, when "
        "lm-evaluation-harness is installed, its registered tasks; then stop.")] = False,
    lm_eval_include: Annotated[list[Path] | None, typer.Option(
        "--lm-eval-include", help="A folder of lm-eval task YAMLs of your own (lm-eval's --include_path); "
        "repeatable.")] = None,
) -> None:
    """Measure a model: benchmark accuracy (acc / acc_norm as lm-eval defines them) and perplexity.

    --task takes a name or a comma-separated list (--task arc_easy,piqa), repeatable.

    Example: moekit eval ./model --task arc_easy --task piqa --limit 200 --text code=./src --json results.json
    """
    from moekit.data import DataSpec
    from moekit.pipeline import evaluate_model

    if list_tasks:
        from moekit.eval.tasks import TASK_DESCRIPTIONS

        for name, description in TASK_DESCRIPTIONS.items():
            out.print(f"{name:<16} {description}", markup=False, soft_wrap=True)
        out.print("or the path of a task YAML file of your own (see the README's evaluation section)", markup=False,
                  soft_wrap=True)
        from moekit.eval.harness import INSTALL_HINT, harness_available, harness_tasks, harness_version

        if not harness_available():
            out.print(f"lm-evaluation-harness's registered tasks: not installed ({INSTALL_HINT})", markup=False,
                      soft_wrap=True)
            return
        names = harness_tasks(lm_eval_include)
        out.print(f"\nlm-evaluation-harness {harness_version()}: {len(names):,} registered tasks, groups and tags "
                  "(run by lm-eval on the model; their datasets download from the hub unless cached):", markup=False,
                  soft_wrap=True)
        for name in names:
            out.print(name, markup=False, soft_wrap=True)
        return
    if model is None:
        raise typer.BadParameter("give the model to evaluate (a directory or hub id), or --list-tasks",
                                 param_hint="MODEL")
    _quiet_transformers()
    # comma lists; a YAML path is taken whole (a file name may hold a comma)
    task = [part.strip() for item in task or []
            for part in ([item] if item.endswith((".yaml", ".yml")) else item.split(",")) if part.strip()]
    specs = [DataSpec.parse(t) for t in text or []]
    task_files = [Path(t) for t in task or [] if t.endswith((".yaml", ".yml"))]
    _check_json_out(json_out, overwrite, [model], [*(s.path for s in specs), *task_files, data_dir, tokenizer,
                                                   *(lm_eval_include or [])])
    results = evaluate_model(model, task, {spec.name: spec.path for spec in specs}, limit=limit,
                             num_fewshot=num_fewshot, max_length=max_length, batch_size=batch_size,
                             device=device, dtype=dtype, data_dir=data_dir, prompts=prompt, stride=stride,
                             tokenizer=tokenizer, allow_task_data_outside=allow_task_data_outside,
                             dry_run=dry_run, say=_note, lm_eval_include=lm_eval_include)
    if results is None:
        out.print("dry run: nothing was loaded or written", highlight=False)
        return
    if _json_to_stdout(json_out, results):
        return
    table = Table(title=escape(model))
    for col in ("task", "metric", "value", "stderr", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, entry in results.get("tasks", {}).items():
        for metric, value in entry["metrics"].items():
            stderr = (entry.get("stderr") or {}).get(metric)
            table.add_row(escape(name), metric, f"{value:.4f}", f"{stderr:.4f}" if stderr is not None else "-",
                          str(entry.get("n", "")))
    for name, entry in results["perplexity"].items():
        table.add_row(f"text:{name}", "perplexity", f"{entry['ppl']:.3f}", "-", f"{entry['tokens']} tok")
    out.print(table)
    for sample in results.get("samples", []):
        out.print(f"[bold]{escape(sample['prompt'])}[/]{escape(sample['completion'])}", soft_wrap=True)
    _write_json(json_out, results)


@app.command()
def speed(
    models: Annotated[list[str], typer.Argument(
        help="Model directories, the original first (NAME=DIR names a column; default: the folder name).")],
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length (prefill).")] = 256,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="Greedy tokens generated (decode).")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (median reported).")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs first (use 2+ on a GPU).")] = 1,
    rounds: Annotated[int, typer.Option(
        help="Measure every model this many times, the order reversed every other round (A B, B A), runs pooled: "
        "an effect of the order then shows in the spread instead of favouring one model.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="auto (as stored), bfloat16, float32.")] = "auto",
    json_out: Annotated[str | None, typer.Option("--json", metavar="FILE|-", help=JSON_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --json file if it exists.")] = False,
) -> None:
    """Memory and speed of the original and compressed models, in one run, on the same prompts and batch.

    Parameter bytes (total, routed experts, shared, active per token), checkpoint size on disk, peak GPU
    memory (on CUDA), prefill and decode tokens/s. Times on a busy machine are noise: measure on an idle one.

    Example: moekit speed ./model ./model-reap50 --device cuda --json speed.json
    """
    from moekit.eval.speed import format_speed_table, measure_footprint_and_speed

    _quiet_transformers()
    named: dict[str, str] = {}
    for item in models:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name or item, item)
        named[name if name not in named else f"{name}-{len(named)}"] = path
    _check_json_out(json_out, overwrite, list(named.values()), [])
    result = measure_footprint_and_speed(named, batch_size=batch_size, prompt_tokens=prompt_tokens,
                                         new_tokens=new_tokens, repeats=repeats, warmup=warmup, rounds=rounds,
                                         device=device, dtype=dtype, progress=True)
    if _json_to_stdout(json_out, result):
        return
    out.print(format_speed_table(result), soft_wrap=True, markup=False)
    _write_json(json_out, result)


@app.command()
def report(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for report.md, report.html and figures/.")],
    profile: Annotated[Path | None, typer.Option(help="A profile: expert load per layer for each named set.")]
    = None,
    plan: Annotated[list[Path] | None, typer.Option(
        "--plan", help="A plan (moekit_plan.json) or pruned checkpoint directory: score distributions with the cut; "
        "repeatable.")] = None,
    result: Annotated[list[str] | None, typer.Option(
        "--result", help="LABEL:METHOD:RATIO=EVAL.json (moekit eval --json), e.g. reap50:reap:0.5=r.json or "
        "original:original:0=o.json: quality against compression; repeatable.")] = None,
    speed_json: Annotated[Path | None, typer.Option(
        "--speed", help="A moekit speed --json file: the memory and speed table.")] = None,
    demo_dir: Annotated[Path | None, typer.Option(
        "--demo", help="Everything from a moekit demo output directory.")] = None,
    contrast: Annotated[list[str] | None, typer.Option(
        "--contrast", metavar="A:B", help="With --profile: the routing contrast of set A against set B (moekit "
        "contrast) as heatmaps and a table; repeatable. Default: harmful:harmless when the profile has both.")]
    = None,
    similarity_to: Annotated[str | None, typer.Option(
        "--similarity-to", metavar="SET", help="With --profile: every set's routing similarity to this one per layer "
        "(e.g. each language to en on parallel text). Default: en when the profile has it.")] = None,
    similarity_sets: Annotated[list[str] | None, typer.Option(
        "--similarity-sets", metavar="PATTERN", help="The sets the similarity plot compares: names or shell-style "
        "patterns (e.g. 'parallel-*'); repeatable. Default: every set.")] = None,
    title: Annotated[str, typer.Option(help="Report title.")] = "moekit report",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace OUT if it holds an earlier moekit report.")] = False,
) -> None:
    """Write a report: markdown plus a self-contained HTML page with figures.

    Sections appear for what you give: expert load heatmaps, routing contrasts, co-activation and
    token/chunk sparsity (--profile, --contrast), score distributions with
    the pruning cut (--plan), quality against compression across methods and ratios (--result),
    and everything from a demo run (--demo).

    \b
    Example:
      moekit report --profile prof --plan pruned/ --result orig:original:0=o.json --result r:reap:0.5=r.json --out r
    """
    from moekit.report import ReportError, build_report, report_inputs_from_demo, result_point
    from moekit.report.build import require_profile_for_sets
    from moekit.report.inputs import read_json

    if profile is None and demo_dir is None:  # before any input is read
        require_profile_for_sets(contrast, similarity_to, similarity_sets)
    inputs: dict[str, Any] = report_inputs_from_demo(demo_dir) if demo_dir else {}
    read: list[Any] = [demo_dir, speed_json]
    if profile is not None:
        inputs["profile"] = profile
    if plan:
        inputs["plans"] = [*inputs.get("plans", []), *plan]
    for item in result or []:
        spec, sep, path = item.partition("=")
        parts = spec.split(":")
        if not sep or len(parts) != 3:
            raise ReportError(f"--result {item!r}: expected LABEL:METHOD:RATIO=EVAL.json")
        try:
            ratio = float(parts[2])
        except ValueError:
            raise ReportError(f"--result {item!r}: RATIO must be a number (fraction of experts removed)") from None
        inputs["results"] = [*inputs.get("results", []), result_point(parts[0], parts[1], ratio, path)]
        read.append(path)
    if speed_json is not None:
        if not speed_json.is_file():
            raise ReportError(f"speed results {speed_json} do not exist (moekit speed --json writes them)")
        inputs["speed"] = read_json(speed_json, "speed results file")
    inputs["title"] = title if title != "moekit report" else inputs.get("title", title)
    pairs = []
    for item in contrast or []:
        a, sep, b = item.partition(":")
        if not sep or not a or not b or ":" in b:
            raise ReportError(f"--contrast {item!r}: expected SET_A:SET_B, e.g. code:prose")
        pairs.append((a, b))
    demo_contrasts = inputs.pop("contrasts", [])
    md, html = build_report(out_dir, **inputs, overwrite=overwrite, inputs=read, contrasts=pairs or demo_contrasts,
                            reference=similarity_to, similarity_sets=similarity_sets)
    _wrote(f"{md} and {html}")


COMPARE_FORMATS = ("table", "markdown", "csv", "json")


@app.command()
def compare(
    results: Annotated[list[Path], typer.Argument(help="Result files written by moekit eval --json.")],
    output_format: Annotated[str, typer.Option(
        "--format", help="table (on the terminal), markdown, csv or json.")] = "table",
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write to this file instead of printing (markdown, csv or json).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --out file if it exists.")] = False,
) -> None:
    """One table across several evaluation runs (a column per run, a row per task metric or perplexity).

    Example: moekit compare original.json reap50.json frequency50.json --format markdown --out compare.md
    """
    import csv
    import io

    from moekit.errors import UserError
    from moekit.outputs import check_output, write_text_file
    from moekit.report import compare_results, format_compare_table

    if output_format not in COMPARE_FORMATS:
        raise UserError(f"--format {output_format!r}: choose one of {', '.join(COMPARE_FORMATS)}")
    if out_file is not None and output_format == "table":
        raise UserError("--out writes markdown, csv or json: add --format markdown (or csv, json)")
    if out_file is not None:
        check_output(out_file, kind="file", overwrite=overwrite, inputs=results)
    columns, rows = compare_results(results)
    if output_format == "table":
        table = Table()
        table.add_column("metric")
        for column in columns:
            table.add_column(column, justify="right")
        for metric, values in rows:
            table.add_row(metric, *("-" if v is None else f"{v:.4f}" for v in values))
        out.print(table)
        return
    if output_format == "json":
        text = json.dumps({"runs": columns, "metrics": {metric: dict(zip(columns, values, strict=True))
                                                        for metric, values in rows}}, indent=1) + "\n"
    elif output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["metric", *columns])
        writer.writerows([metric, *("" if v is None else repr(v) for v in values)] for metric, values in rows)
        text = buffer.getvalue()
    else:
        text = format_compare_table(columns, rows)
    if out_file is None:
        sys.stdout.write(text)
    else:
        write_text_file(out_file, text)
        _wrote(f"{out_file}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for everything the demo writes.")]
    = Path("moekit-demo"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """The whole job on the bundled model, offline, on CPU (about a minute).

    Inspect the bundled Qwen3-MoE testbed (trained here on code and prose), profile it on two
    calibration sets, prune half of its experts three ways (frequency on both sets, frequency on
    code only, REAP on both sets), measure per-domain perplexity before and after, print the table and write a report
    (report.md with figures) next to the pruned checkpoints.
    """
    from moekit.demo import VARIANTS, run_demo

    _quiet_transformers()
    results = run_demo(out_dir, overwrite=overwrite, say=lambda text: out.print(text, soft_wrap=True))
    table = Table(title="perplexity on held-out text (lower is better)")
    table.add_column("model")
    table.add_column("parameters", justify="right")
    domains = list(next(iter(results["perplexity"].values())))
    for domain in domains:
        table.add_column(domain, justify="right")
    for variant in VARIANTS:
        row = results["perplexity"][variant.name]
        table.add_row(variant.label, f"{results['parameters'][variant.name]:,}", *(f"{row[d]:.2f}" for d in domains))
    out.print(table)
    _wrote(f"{out_dir}/report.md, the profile and the pruned checkpoints")


@app.command()
def moefy(
    model: Annotated[str, typer.Argument(help="A dense Llama-style model directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the MoE checkpoint.")],
    experts: Annotated[int, typer.Option(help="Experts per layer; must divide the FFN size.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts per token.")] = 2,
    router: Annotated[str, typer.Option(
        help="Router initialisation: centroid (mean gate row of each expert's neurons) or zero (uniform; exact "
        "when --top-k equals --experts).")] = "centroid",
    seed: Annotated[int, typer.Option(help="Seed for the neuron clustering.")] = 0,
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="dtype to load and save in.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Turn a dense model into a Mixtral-style MoE by splitting every FFN's neurons into experts.

    Neurons are grouped by balanced k-means of their weights; attention, norms and embeddings are kept
    bit for bit; the result is a stock Mixtral checkpoint. No recovery training is done here.

    Example: moekit moefy ./dense-llama --experts 16 --top-k 4 --out ./llama-moe
    """
    from moekit.moefy import moefy_to_checkpoint

    _quiet_transformers()
    path = moefy_to_checkpoint(model, out_dir, experts, top_k, router, seed,  # type: ignore[arg-type]
                               overwrite=overwrite, dtype=dtype)
    _wrote(f"{path}: {experts} experts per layer, top-{top_k}, router {router}")


@app.command()
def upcycle(
    model: Annotated[str, typer.Argument(help="A dense Llama/Mistral/Qwen3 model, or an MoE checkpoint.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the upcycled checkpoint.")],
    experts: Annotated[int | None, typer.Option(
        help="Dense model: experts per layer, each a copy of the FFN.")] = None,
    factor: Annotated[int | None, typer.Option(
        help="MoE: copies of every expert (E experts become factor x E).")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help="Experts per token [default: 2 for a dense model; unchanged for an MoE, which is not exact "
        "at step 0 -- factor x the old top-k is].", show_default=False)] = None,
    router_std: Annotated[float | None, typer.Option(
        "--router-std", help="Dense model: std of the random router (0: zero router) [default: the config's "
        "initializer_range].", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random router.")] = 0,
    dtype: Annotated[str, typer.Option(callback=_dtype_name, help="dtype to load and save in.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    utility_data: Annotated[list[str] | None, typer.Option(
        "--utility-data", help="MoE: duplicate by utility instead of uniformly -- calibration text NAME=PATH "
        "(repeatable) on which every expert's gradient importance is measured; every expert keeps one copy and "
        "the other copies go to the most important experts.")] = None,
    utility_tokens: Annotated[int, typer.Option(
        "--utility-tokens", help="--utility-data: tokens per set (one forward and backward pass per 4 sequences).")]
    = 16384,
    seq_len: Annotated[int, typer.Option("--seq-len", help="--utility-data: tokens per packed sequence.")] = 512,
    reinit_ratio: Annotated[float, typer.Option(
        "--reinit-ratio", help="Dense model: Drop-Upcycling -- this share of every expert's FFN neurons (its own "
        "random choice, seeded) drawn anew from the statistics of the weights they replace, so the experts differ "
        "from the start and can specialise in training; their pairwise cosine starts near (1 - R)^2. Not exact at "
        "step 0: the paper uses 0.5 for training on hundreds of billions of tokens; on SmolLM2-135M 0.1 costs 2.5x "
        "the perplexity before training, 0.5 everything (benchmarks/results/smollm2_upcycled8x2-reinit-step0.md).")] \
        = 0.0,
) -> None:
    """Upcycle: copy a dense model's FFN into experts, or duplicate an MoE's experts (no training here).

    \b
    Dense -> MoE (sparse upcycling): every expert a copy of the FFN, a random router; the top-k
    weights sum to 1, so the MoE computes the dense model at step 0. Llama/Mistral become Mixtral,
    Qwen3 becomes Qwen3-MoE, as stock checkpoints.
    E -> factor x E: every expert copied factor times with its router row. Exact at step 0 with
    --top-k factor x the old top-k (for softmax or renormalised routing); with the top-k unchanged
    each token picks copies of fewer experts. The record gives the measured logit difference.
    With --utility-data, copies go to the experts with the largest gradient importance (first-order
    Taylor score on that text; never exact at step 0: unequal copies change the router's softmax).
    Then train with moekit recover, which breaks the symmetry between the copies. Copies diverge
    slowly; --reinit-ratio (Drop-Upcycling) starts them apart at the cost of step-0 exactness.

    \b
    Examples:
      moekit upcycle ./smollm2-135m --experts 8 --top-k 2 --out ./smollm2-8x
      moekit upcycle ./smollm2-135m --experts 8 --top-k 2 --reinit-ratio 0.1 --out ./smollm2-8x-drop
      moekit upcycle ./olmoe --factor 2 --utility-data code=./code.jsonl --out ./olmoe-2x
    """
    from moekit.data import DataSpec
    from moekit.outputs import check_output
    from moekit.upcycle import upcycle_to_checkpoint

    _quiet_transformers()
    check_output(out_dir, kind="checkpoint", overwrite=overwrite, sources=[model],
                 inputs=[DataSpec.parse(d).path for d in utility_data or []])
    path, record = upcycle_to_checkpoint(model, out_dir, experts=experts, factor=factor, top_k=top_k,
                                         router_std=router_std, seed=seed, dtype=dtype, overwrite=overwrite,
                                         utility_data=utility_data, utility_tokens=utility_tokens, seq_len=seq_len,
                                         progress=True, reinit_ratio=reinit_ratio)
    difference = record["step0_max_logit_difference"]
    if record["mode"] == "duplicate" and record["duplication"] == "utility":
        _note(f"duplicated by utility: not exact at step 0 (logits moved by up to {difference:.3g}); train it with "
              "moekit recover")
    elif record["mode"] == "duplicate" and difference > 1e-3:
        _note(f"not exact at step 0: the logits moved by up to {difference:.3g} (each token now picks copies of "
              f"fewer experts); --top-k {record['factor'] * record['top_k']['before']} keeps the model exact")
    if record["mode"] == "dense" and record["reinit_ratio"]:
        _note(f"{record['reinit_ratio']:.0%} of each expert's neurons re-initialised (Drop-Upcycling): not exact at "
              f"step 0 (logits moved by up to {difference:.3g}); train it with moekit recover")
    if record["mode"] == "dense" and record["reinit_ratio"]:
        what = (f"{record['experts']} experts per layer from the FFN, {record['reinit_ratio']:.0%} of each redrawn, "
                f"top-{record['top_k']}")
    elif record["mode"] == "dense":
        what = f"{record['experts']} copies of the FFN per layer, top-{record['top_k']}"
    else:
        what = (f"{record['experts']['before']} -> {record['experts']['after']} experts per layer, "
                f"top-{record['top_k']['after']}")
    _wrote(f"{path}: {what}; largest logit difference to the source at step 0 {difference:.3g}")


@app.command()
def recover(
    model: Annotated[str, typer.Argument(help="An MoE checkpoint (from moekit moefy or moekit prune, or any).")],
    data: Annotated[list[str], typer.Option(
        "--data", help="Training text, NAME=PATH (repeat for several; pooled). PATH as for moekit profile: a text "
        "file, a directory, .jsonl, .parquet or a datasets.save_to_disk directory.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New directory for the trained checkpoint.")],
    teacher: Annotated[str | None, typer.Option(
        help="The dense or unpruned original (same tokenizer): train to match its next-token distributions "
        "(distillation). Without it: plain next-token loss.")] = None,
    train: Annotated[str, typer.Option(
        help="router (only the routers learn; experts keep their weights) or all (every weight).")] = "all",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per packed sequence.")] = 1024,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", help="Token budget per --data set (documents shuffled with --seed, then packed).")] = 4_194_304,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate [default: 1e-3 for --train router, 1e-4 for all].")] = None,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps (then cosine decay to 10%).")] = 20,
    balance_coef: Annotated[float, typer.Option(
        "--balance-coef", help="Weight of the load-balancing loss of every MoE layer (the Switch loss, per layer; "
        "0: off).")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed for the document order and the batches.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (bf16 autocast on CUDA).")] = "cpu",
    dtype: Annotated[str, typer.Option(
        callback=_dtype_name, help="dtype to save in: auto (the source's), bfloat16, float32.")] = "auto",
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory, if not the model's.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Recover quality after moefy or pruning with a short training on real text.

    Trains the routers only, or every weight, for --steps steps; with --teacher it distils the
    original's next-token distributions (KL), which recovers faster than the plain language-model
    loss. The output is a standard checkpoint with the training record (and the source's own moefy
    or prune record) in moekit_plan.json and the loss curve in recovery_loss.png. Use a GPU. After
    moefy, train all weights: on SmolLM2-135M with 16 experts, routers alone recovered little
    (benchmarks/results/smollm2_moe16x4.md).

    Example: moekit moefy ./dense --experts 16 --top-k 8 --out ./moe && moekit recover ./moe --teacher ./dense
    --data web=./text --steps 600 --batch-size 16 --device cuda --out ./moe-recovered
    """
    from moekit.recover import RecoverySettings, recover_to_checkpoint

    _quiet_transformers()
    settings = RecoverySettings(train=train, steps=steps, batch_size=batch_size, lr=lr,  # type: ignore[arg-type]
                                warmup=warmup, balance_coef=balance_coef, seed=seed)
    path = recover_to_checkpoint(model, data, out_dir, settings=settings, teacher=teacher, seq_len=seq_len,
                                 max_tokens=max_tokens, device=device, dtype=dtype, tokenizer=tokenizer,
                                 overwrite=overwrite)
    record = json.loads((path / "moekit_plan.json").read_text())
    _wrote(f"{path}: {record['tokens_seen']:,} tokens, loss {record['loss_curve'][0]['loss']:.4f}"
              f" -> {record['loss_curve'][-1]['loss']:.4f} ({record['objective']})")


@app.command("tiny-model")
def tiny_model(
    model_type: Annotated[str, typer.Argument(help="A transformers model type, e.g. qwen3_moe, mixtral.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    experts: Annotated[int, typer.Option(help="Routed experts per MoE layer.")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts per token.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a tiny random MoE model (hidden 64, 3 layers, 8192 positions) of a stock family, for trying moekit.

    llama and qwen3 give a tiny dense model instead (for moefy and upcycle; --experts and --top-k do not apply).

    Example: moekit tiny-model qwen3_moe --out ./tiny-qwen3-moe
    """
    from moekit.outputs import check_output, writing_directory
    from moekit.tiny import TINY_DENSE_FAMILIES, TINY_FAMILIES, save_tiny_model

    _quiet_transformers()
    if model_type not in TINY_FAMILIES + TINY_DENSE_FAMILIES:
        raise UnknownNameError(f"no tiny config for {model_type!r}; choose one of: "
                               f"{', '.join(TINY_FAMILIES + TINY_DENSE_FAMILIES)}")
    path = check_output(out_dir, kind="checkpoint", offers_overwrite=False)
    with writing_directory(path, "checkpoint") as tmp:
        save_tiny_model(model_type, tmp, num_experts=experts, top_k=top_k, seed=seed)
    dense = model_type in TINY_DENSE_FAMILIES
    _wrote(f"{out_dir} ({model_type}, " + ("dense)" if dense else f"{experts} experts, top-{top_k})"))


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def main() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    app()


if __name__ == "__main__":
    main()
