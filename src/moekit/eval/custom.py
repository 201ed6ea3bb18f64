"""User-defined tasks: a jsonl file and a few lines of YAML.

    name: capitals
    kind: multiple_choice          # multiple_choice | generation | perplexity
    data_path: capitals.jsonl      # relative to the YAML file, inside its folder
    prompt: "Q: What is the capital of {country}?\\nA:"
    choices: options               # field holding the list of choice strings
    gold: answer                   # field holding the right choice (its index, or its text)
    num_fewshot: 2

Templates use plain ``{field}`` placeholders, each replaced by ``str(row[field])``, and ``{{`` / ``}}``
for literal braces. Nothing else of ``str.format`` is allowed (no ``{q.attr}``, ``{q[0]}``, ``{q!r}``,
``{q:>10}``): such templates are refused when the spec is read.

* multiple_choice (``prompt``, ``choices``, ``gold``): each choice is scored as the continuation
  ``target_delimiter + choice`` of the prompt; acc and acc_norm as lm-eval defines them.
* generation (``prompt``, ``target``): greedy completion cut at ``until`` (default a blank line) and
  at most ``max_new_tokens``; ``exact_match`` = the stripped completion equals the stripped target.
* refusal (``prompt``: the request): each request as one user turn of the model's chat template, answered
  greedily (``until``, ``max_new_tokens``); ``refusal_rate`` = the share of answers holding one of Arditi et
  al.'s refusal phrases (``moekit.eval.refusal``): run it on harmful requests (refusals wanted) and on
  harmless ones (over-refusal), before and after an edit.
* perplexity (``text``): token-weighted perplexity of each item's text (also word and byte
  perplexity and bits per byte, as lm-eval's ``loglikelihood_rolling`` tasks report).

Few-shot exemplars are the first ``num_fewshot`` *other* items of the file (lm-eval's ``first_n``
sampler on the evaluated split), each ``prompt + target_delimiter + answer + fewshot_delimiter``,
after an optional ``description``. Unknown keys, keys the kind does not use, missing fields and
placeholders that name no field of the data are errors, raised before any model runs.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from moekit.eval import data
from moekit.eval.errors import EvalError
from moekit.eval.tasks import ChoiceItem, GenerationItem, Item, Task, TextItem, first

KINDS = ("multiple_choice", "generation", "refusal", "perplexity")
_REQUIRED = {"multiple_choice": ("prompt", "choices", "gold"), "generation": ("prompt", "target"),
             "refusal": ("prompt",), "perplexity": ("text",)}
_KIND_ONLY = {"prompt": ("multiple_choice", "generation", "refusal"), "choices": ("multiple_choice",),
              "gold": ("multiple_choice",), "target": ("generation",), "text": ("perplexity",),
              "until": ("generation", "refusal"), "max_new_tokens": ("generation", "refusal"),
              "num_fewshot": ("multiple_choice", "generation"), "description": ("multiple_choice", "generation"),
              "target_delimiter": ("multiple_choice", "generation"),
              "fewshot_delimiter": ("multiple_choice", "generation")}


@dataclass(frozen=True)
class TaskSpec:
    """A user-defined task (see module docstring for the fields)."""

    name: str
    kind: str
    data_path: Path
    prompt: str | None = None
    text: str | None = None
    choices: str | None = None
    gold: str | None = None
    target: str | None = None
    num_fewshot: int = 0
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: tuple[str, ...] = ("\n\n",)
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise EvalError("a task needs a non-empty 'name'")
        if self.kind not in KINDS:
            raise EvalError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        for key in _REQUIRED[self.kind]:
            if getattr(self, key) is None:
                raise EvalError(f"{where}: kind {self.kind} needs the field {key!r}")
        defaults = {f.name: f.default for f in fields(self)}
        for key, kinds in _KIND_ONLY.items():
            if self.kind not in kinds and getattr(self, key) != defaults[key]:
                raise EvalError(f"{where}: {key!r} is not used by kind {self.kind} (it is for {', '.join(kinds)})")
        for key in ("prompt", "text", "choices", "gold", "target", "description", "target_delimiter",
                    "fewshot_delimiter"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise EvalError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        for key in ("prompt", "text"):
            template = getattr(self, key)
            if template is not None:
                template_pieces(template, f"{where} {key}")
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise EvalError(f"{where}: num_fewshot must be an integer ≥ 0, got {self.num_fewshot!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise EvalError(f"{where}: max_new_tokens must be an integer ≥ 1, got {self.max_new_tokens!r}")
        if not all(isinstance(stop, str) for stop in self.until):
            raise EvalError(f"{where}: until must be a list of strings")

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: str | Path = ".", *, allow_outside: bool = False) -> TaskSpec:
        """A spec from a mapping (as read from YAML); ``data_path`` is relative to ``base_dir``.

        ``data_path`` must name a file under ``base_dir`` (after resolving symlinks and ``..``): a task
        file from elsewhere should not make moekit read, and echo in prompts, any file the user can
        read. ``allow_outside=True`` lifts this for callers that trust the task file.
        """
        if not isinstance(values, dict):
            raise EvalError(f"a task spec must be a mapping of fields, got {type(values).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        name = values.get("name", "?")
        if unknown:
            raise EvalError(f"task {name!r}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: "
                            f"{', '.join(valid)}")
        for key in ("name", "kind", "data_path"):
            if key not in values:
                raise EvalError(f"task {name!r}: the field {key!r} is missing")
        values = dict(values)
        values["data_path"] = _data_path(values["data_path"], Path(base_dir), str(name), allow_outside)
        if "until" in values:
            until = values["until"]
            values["until"] = (until,) if isinstance(until, str) else tuple(until or ())
        return cls(**values)


def _data_path(value: Any, base_dir: Path, name: str, allow_outside: bool) -> Path:
    """The resolved data file of a task, refused when it lies outside ``base_dir`` (unless allowed)."""
    if not isinstance(value, str) or not value.strip():
        raise EvalError(f"task {name!r}: data_path must be a non-empty string (a jsonl file next to the task file)")
    given = Path(value)
    resolved = (base_dir / given).resolve()
    if allow_outside:
        return resolved
    folder = base_dir.resolve()
    if given.is_absolute():
        raise EvalError(f"task {name!r}: data_path {value!r} is an absolute path; write it relative to the task "
                        f"file's folder ({folder}) and keep the data there, or allow data outside that folder")
    if not resolved.is_relative_to(folder):
        raise EvalError(f"task {name!r}: data_path {value!r} is outside the task file's folder ({folder}): it "
                        f"resolves to {resolved}; move the data under that folder, or allow data outside it")
    return resolved


def load_task_spec(path: str | Path, *, allow_outside: bool = False) -> TaskSpec:
    """Read a task YAML file (``data_path`` is relative to the file and must stay in its folder, unless
    ``allow_outside``; see ``TaskSpec.from_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"task file {path} not found: pass a registered task name or the path of a task YAML file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise EvalError(f"{path} is not valid YAML: {err}") from None
    return TaskSpec.from_dict(values, base_dir=path.parent, allow_outside=allow_outside)


_PLAIN_ONLY = "only plain {field} placeholders (naming a field of the data) and {{ }} for literal braces are allowed"


def template_pieces(template: str, where: str) -> list[tuple[str, str | None]]:
    """The (literal text, field name or None) pieces of a template; anything but plain ``{field}`` is an error.

    ``str.format`` would also follow ``{q.attr}`` and ``{q[0]}`` into a value's attributes and items, run
    ``!r`` conversions and apply format specs (``{q:>300000000}`` builds a 300 MB string per row). A prompt
    needs none of that, and task files and rows may come from anyone, so only the plain form passes.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise EvalError(f"{where}: bad template {template!r} ({err}); write {{{{ and }}}} for literal braces") from None
    pieces: list[tuple[str, str | None]] = []
    position = 0  # where the current piece starts in ``template`` (literal braces are doubled there)
    for literal, field, spec, conversion in parsed:
        position += len(literal) + literal.count("{") + literal.count("}")
        if field is None:
            pieces.append((literal, None))
            continue
        head = "{" + field + (f"!{conversion}" if conversion else "")
        has_spec = template[position + len(head)] == ":"  # parse() reports "{q:}" with the same empty spec as "{q}"
        placeholder = head + (f":{spec}" if has_spec else "") + "}"
        position += len(placeholder)
        if not field:
            raise EvalError(f"{where}: template {template!r} has an empty {{}}; name a field of the data")
        problem = ("attribute access and indexing are not allowed" if any(c in field for c in ".[]")
                   else "conversions (!r, !s, !a) are not allowed" if conversion
                   else "format specs are not allowed" if has_spec else None)
        if problem:
            raise EvalError(f"{where}: template {template!r} has {placeholder}: {problem}; {_PLAIN_ONLY}")
        pieces.append((literal, field))
    return pieces


def _placeholders(template: str, where: str) -> set[str]:
    return {field for _, field in template_pieces(template, where) if field is not None}


def _render(pieces: list[tuple[str, str | None]], row: dict[str, Any], where: str) -> str:
    """Fill checked template pieces from one row: literal text and ``str(row[field])``, nothing else."""
    try:
        return "".join(literal if field is None else literal + str(row[field]) for literal, field in pieces)
    except KeyError as err:
        raise EvalError(f"{where}: the template's field {err} is not in this item") from None


def build_custom_task(spec: TaskSpec, limit: int | None = None) -> Task:
    """Read the spec's data and build the task; checks every item's fields first."""
    rows = data.read_jsonl(spec.data_path)
    needed: set[str] = set()
    for key in ("prompt", "text"):
        template = getattr(spec, key)
        if template is not None:
            needed |= _placeholders(template, f"task {spec.name!r} {key}")
    needed |= {value for value in (spec.choices, spec.gold, spec.target) if value is not None}
    for number, row in enumerate(rows, 1):
        missing = sorted(needed - set(row))
        if missing:
            raise EvalError(f"{spec.data_path} item {number} lacks the field(s) {', '.join(missing)} "
                            f"that task {spec.name!r} uses; it has {', '.join(row)}")
    if spec.num_fewshot >= len(rows):
        raise EvalError(f"task {spec.name!r}: num_fewshot={spec.num_fewshot} needs more than {len(rows)} items")

    prompt = template_pieces(spec.prompt, f"task {spec.name!r} prompt") if spec.prompt is not None else None
    prompts = [_render(prompt, row, f"{spec.data_path} item {i + 1}") for i, row in enumerate(rows)] \
        if prompt is not None else []
    answers = [_answer(spec, row, i) for i, row in enumerate(rows)] if spec.kind in ("multiple_choice", "generation") \
        else []

    def context(index: int) -> str:
        shots = [j for j in range(len(rows)) if j != index][:spec.num_fewshot]
        exemplars = "".join(prompts[j] + spec.target_delimiter + answers[j][0] + spec.fewshot_delimiter
                            for j in shots)
        return spec.description + exemplars + prompts[index]

    count = len(rows) if limit is None else min(limit, len(rows))
    items: list[Item]
    if spec.kind == "multiple_choice":
        items = []
        for i in range(count):
            options = tuple(rows[i][spec.choices])  # type: ignore[index]
            ctx = context(i)
            items.append(ChoiceItem(tuple((ctx, spec.target_delimiter + o) for o in options), options, answers[i][1]))
        return Task(spec.name, "multiple_choice", tuple(items), ("acc", "acc_norm"), spec.num_fewshot, "custom")
    if spec.kind == "refusal":  # no target: the answer is judged by the refusal phrases
        items = [GenerationItem(prompts[i], "") for i in range(count)]
        return Task(spec.name, "generation", tuple(items), ("refusal_rate",), 0, "custom", until=spec.until,
                    max_new_tokens=spec.max_new_tokens, answer="refusal")
    if spec.kind == "generation":
        items = [GenerationItem(context(i), answers[i][0]) for i in range(count)]
        return Task(spec.name, "generation", tuple(items), ("exact_match",), spec.num_fewshot, "custom",
                    until=spec.until, max_new_tokens=spec.max_new_tokens, answer="exact")
    text = template_pieces(spec.text, f"task {spec.name!r} text")  # type: ignore[arg-type]
    texts = [_render(text, row, f"{spec.data_path} item {i + 1}") for i, row in enumerate(first(rows, limit))]
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise EvalError(f"{spec.data_path} item {number}: the text is empty; drop it or fix the template")
    return Task(spec.name, "perplexity", tuple(TextItem(t) for t in texts),
                ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"), 0, "custom")


def _answer(spec: TaskSpec, row: dict[str, Any], index: int) -> tuple[str, int]:
    """(answer text, gold index) of one item; the index is -1 for generation."""
    where = f"{spec.data_path} item {index + 1}"
    if spec.kind == "generation":
        return str(row[spec.target]), -1  # type: ignore[index]
    options, gold = row[spec.choices], row[spec.gold]  # type: ignore[index]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise EvalError(f"{where}: field {spec.choices!r} must be a list of at least 2 non-empty strings")
    if isinstance(gold, str) and gold in options:
        gold = options.index(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise EvalError(f"{where}: gold {gold!r} (field {spec.gold!r}) is neither an index into the "
                        f"{len(options)} choices nor one of their texts")
    return options[gold], gold
