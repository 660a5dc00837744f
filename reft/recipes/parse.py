"""Reading a recipe: YAML (bounded in size and alias expansion), `--set` overrides, the recipe's
`imports`, and validation into a `Recipe` with errors that name the key, the bad value and the valid
choices."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import string
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .._errors import short
from ..evaluate import MATCHES, compile_pattern
from ..interventions.base import intervention_class, registered_interventions
from ..positions import PositionSpec
from ..sites import COMPONENTS
from .schema import BUILTIN_DATA, BUILTIN_MODELS, DTYPES, TASKS, DataSection, InterventionSection, ModelSection, Recipe, RecipeError, parse_layers

MAX_RECIPE_BYTES = 2**20  # a recipe is a page of YAML; this bounds the work of reading one
MAX_RECIPE_VALUES = 100_000  # values a recipe may expand to through YAML aliases (&anchor, *alias)
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


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
    from ..train import TrainConfig

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
            parse_layers(iv.layers)
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



def _template_fields(template: str, key: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise RecipeError(f"{key}: malformed template {short(template)}: {e}") from None
    if any(not n or not n.isidentifier() for n in names):
        raise RecipeError(f"{key}: template {short(template)} must name fields, e.g. '{{instruction}}'")
    return names

