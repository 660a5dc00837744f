"""A recipe's schema: the `Recipe` dataclass and its sections, with a comment on every key.

`reft.recipes.parse` reads YAML into these and validates them; `build` and `sources` turn them into
a model and data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from .._errors import short

BUILTIN_MODELS = ("smollm2", "minilm")  # `builtin:<name>`: the offline models of `reft.assets`
BUILTIN_DATA = ("rotten_tomatoes",)  # `builtin:<name>`: the offline data of `reft.assets`
TASKS = ("causal_lm", "classification")
DTYPES = ("float32", "bfloat16", "float16")
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


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
        indices = parse_layers(layers)
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



def parse_layers(layers: Any) -> list[int]:
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



def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

