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

The package: `schema` (the `Recipe` dataclasses), `parse` (YAML -> a validated `Recipe`), `build`
(model, `ReftConfig`, `IntervenableModel`, dry run) and `sources` (the data).
"""

from .build import build_intervenable, dry_run, head_path, load_model, missing_paths, model_config, reft_config, resolve_device
from .parse import MAX_RECIPE_BYTES, MAX_RECIPE_VALUES, import_recipe_modules, load_recipe, parse_recipe, set_key
from .schema import (
    BUILTIN_DATA,
    BUILTIN_MODELS,
    DATA_SUFFIXES,
    DTYPES,
    TASKS,
    DataSection,
    InterventionSection,
    ModelSection,
    Recipe,
    RecipeError,
)
from .sources import NO_EVAL_DATA, answer_data, build_data, read_rows

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_MODELS",
    "DATA_SUFFIXES",
    "DTYPES",
    "MAX_RECIPE_BYTES",
    "MAX_RECIPE_VALUES",
    "NO_EVAL_DATA",
    "TASKS",
    "DataSection",
    "InterventionSection",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "answer_data",
    "build_data",
    "build_intervenable",
    "dry_run",
    "head_path",
    "import_recipe_modules",
    "load_model",
    "load_recipe",
    "missing_paths",
    "model_config",
    "parse_recipe",
    "read_rows",
    "reft_config",
    "resolve_device",
    "set_key",
]
