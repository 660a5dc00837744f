"""Bad inputs across the API, the data, adapter files, recipes and the command line.

Each case raises a clear error of the stated type, whose message names the bad value (or the file
that holds it), and changes nothing on disk: the test snapshots its folder before and after. Command
line cases exit with status 2 and print one line. `test_small_inputs_never_allocate_much` checks, in a
fresh process, that the small inputs which used to allocate gigabytes stay under 100 MB.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import reft
import reft.checkpoint as ck
import reft.train as train_module
from reft.cli import main
from reft.data import Collator, build_classification_data, build_generation_data
from reft.positions import PositionSpec, resolve
from reft.recipes import RecipeError, load_recipe, parse_recipe, set_key
from reft.train import Trainer, TrainConfig

from . import disk, tiny, tiny_text
from .test_recipes import ALIAS_BOMB, base_raw
from .train_worker import build, pairs

ROOT = Path(__file__).resolve().parents[1]
nan, inf = math.nan, math.inf


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread."""


class CommandFailed(Exception):
    """`reft ...` exited with a non-zero status; the message is what it printed on stderr."""


def cli(*argv: str) -> Callable[[], None]:
    def run() -> None:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in argv])
        text = err.getvalue()
        if code != 0:
            assert code == 2 and text.startswith(f"reft {argv[0]}: error: ") and text.count("\n") == 1, (code, text)
            raise CommandFailed(text)

    return run


# ----------------------------------------------------------------------------- fixtures
def _adapter(folder: Path) -> Path:
    """A saved LoReFT adapter on the tiny Llama, with the recipe.yaml `reft train` would write."""
    torch.manual_seed(0)
    rm = reft.IntervenableModel(tiny.causal_lm(), {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="l1")
    rm.save_pretrained(folder)
    (folder / "recipe.yaml").write_text(json.dumps(base_raw()))  # JSON is YAML
    return folder


def _edit(folder: Path, edit) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


def _iv_config(c: dict) -> dict:
    return c["sites"][0]["interventions"][0]["config"]


def _checkpointed_run(tmp: Path, **config) -> tuple[TrainConfig, object]:
    """A run of 4 steps that saved checkpoints 1 and 2 and was then killed (3 and 4 removed)."""
    rm, tok = build()
    data = build_generation_data(tok, pairs(16))
    cfg = TrainConfig(**{**dict(lr=1e-2, batch_size=4, max_steps=4, save_every=1, output_dir=str(tmp / "run")), **config})
    Trainer(rm, cfg, data).fit()
    for step in (3, 4):
        shutil.rmtree(tmp / "run" / f"checkpoint-{step}", ignore_errors=True)
    return cfg, data


def _patched_nan_loss(run: Callable[[], None]) -> Callable[[], None]:
    def patched() -> None:
        from reft.objectives import CrossEntropy

        real = CrossEntropy.loss_sum
        CrossEntropy.loss_sum = lambda self, model, rm, batch: real(self, model, rm, batch) * nan
        try:
            run()
        finally:
            CrossEntropy.loss_sum = real

    return patched


def _in_folder(folder: Path, run: Callable[[], None]) -> Callable[[], None]:
    def inside() -> None:
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            run()
        finally:
            os.chdir(cwd)

    return inside


def _lm_data(n: int = 8):
    return build_generation_data(tiny_text.tokenizer(), pairs(n))


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _recipe(tmp: Path, name: str = "r.yaml", **sections) -> Path:
    return _write(tmp / name, json.dumps(base_raw(**sections)))


# ----------------------------------------------------------------------------- the cases
# Each: (setup(tmp) -> the failing call, exception type, a fragment of the message naming the value).
CASES: dict[str, tuple[Callable[[Path], Callable[[], None]], type, str]] = {}


def case(name: str, error: type, fragment: str):
    def register(setup):
        assert name not in CASES
        CASES[name] = (setup, error, fragment)
        return setup

    return register


# --- TrainConfig
for name, kwargs, fragment in [
    ("config_epochs_inf", dict(epochs=inf), "TrainConfig.epochs = inf: must be a positive finite number"),
    ("config_lr_nan", dict(lr=nan), "TrainConfig.lr = nan: must be a number in (0, 1)"),
    ("config_epochs_bool", dict(epochs=True), "TrainConfig.epochs = True"),
    ("config_weight_decay_inf", dict(weight_decay=inf), "TrainConfig.weight_decay = inf: must be a finite number >= 0"),
    ("config_max_grad_norm_nan", dict(max_grad_norm=nan), "TrainConfig.max_grad_norm = nan"),
    ("config_batch_size_bool", dict(batch_size=True), "TrainConfig.batch_size = True: must be an int >= 1"),
    ("config_warmup_nan", dict(warmup_ratio=nan), "TrainConfig.warmup_ratio = nan: must be a number in [0, 1)"),
    ("config_max_steps_bool", dict(max_steps=True), "TrainConfig.max_steps = True"),
    ("config_base_dropout_str", dict(base_dropout="yes"), "TrainConfig.base_dropout = 'yes': must be True or False"),
    ("config_seed_float", dict(seed=1.5), "TrainConfig.seed = 1.5: must be an int"),
    ("config_schedule_list", dict(schedule=["linear"]), "TrainConfig.schedule = ['linear']: must be one of"),
]:
    case(name, ValueError, fragment)(lambda tmp, kwargs=kwargs: lambda: TrainConfig(**kwargs))

# --- interventions
for name, build_iv, fragment in [
    ("iv_hidden_size_bool", lambda: reft.LoReFT(hidden_size=True, rank=1), "hidden_size must be a positive int, got True"),
    ("iv_dropout_one", lambda: reft.LoReFT(32, rank=4, dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
    ("iv_dropout_nan", lambda: reft.DiReFT(32, 4, dropout=nan), "dropout must be a number in [0, 1), got nan"),
    ("iv_dropout_negative", lambda: reft.ConsReFT(32, 2, dropout=-0.1), "got -0.1"),
    ("iv_rank_bool", lambda: reft.LoReFT(32, rank=True), "rank must be an int in 1..32 (the hidden size), got True"),
    ("iv_rank_too_big", lambda: reft.NoReFT(32, rank=33), "rank must be an int in 1..32 (the hidden size), got 33"),
    ("iv_activation", lambda: reft.LoReFT(32, 4, act="swish"), "unknown activation 'swish'"),
    ("iv_dtype", lambda: reft.RED(32, dtype="int8"), "unsupported intervention dtype 'int8'"),
    ("iv_unknown_name", lambda: reft.make_intervention("os.system", hidden_size=4), "unknown intervention 'os.system'"),
]:
    case(name, ValueError, fragment)(lambda tmp, build_iv=build_iv: build_iv)

# --- positions
case("spec_5000_digits", ValueError, "malformed position spec 'l99999")(lambda tmp: lambda: PositionSpec.parse("l" + "9" * 5000))
case("spec_negative", ValueError, "malformed position spec 'f-1'")(lambda tmp: lambda: PositionSpec.parse("f-1"))
case("spec_field_negative", ValueError, "PositionSpec.first must be an int >= 0, got -2")(lambda tmp: lambda: PositionSpec(first=-2))
case("spec_empty_batch", ValueError, "the mask has shape (0, 5)")(
    lambda tmp: lambda: resolve(PositionSpec(last=1), torch.ones(0, 5, dtype=torch.bool))
)

# --- data
_TOK = tiny_text.tokenizer()
for name, call, fragment in [
    ("data_bool_positions", lambda: build_generation_data(_TOK, [("w1 w2", "w3", [True, False])]), "positions must be a list of ints, got [True, False]"),
    ("data_position_range", lambda: build_generation_data(_TOK, [("w1 w2", "w3", [0, 99])]), "position 99 is out of range"),
    ("data_nan_regression", lambda: build_classification_data(_TOK, ["w1"], [nan], num_labels=1), "must be a finite number, got nan"),
    ("data_num_labels_bool", lambda: build_classification_data(_TOK, ["w1"], [0], num_labels=True), "num_labels must be a positive int, got True"),
    ("data_multiple_bool", lambda: Collator(_TOK, pad_to_multiple_of=True), "pad_to_multiple_of must be a positive int or None, got True"),
    ("data_zero_length", lambda: Collator(_TOK)([{"input_ids": torch.tensor([], dtype=torch.long), "labels": torch.tensor([], dtype=torch.long), "prompt_length": torch.tensor(0)}]),
     "example 0 of the batch has 0 tokens (input_ids tensor([]"),
    ("data_on_too_long", lambda: build_generation_data(_TOK, [("w1", "w2")], on_too_long="truncate"), "got 'truncate'"),
    ("data_label_count", lambda: build_classification_data(_TOK, ["w1", "w2"], [0]), "2 texts but 1 labels"),
    ("data_max_length_bool", lambda: build_generation_data(_TOK, [("w1", "w2")], max_length=True), "max_length must be an int >= 2 or None, got True"),
    ("data_label_string", lambda: build_classification_data(_TOK, ["w1"], ["0"]), "label must be an int class index, got '0'"),
]:
    case(name, ValueError, fragment)(lambda tmp, call=call: call)


# --- training
@case("train_no_labelled_token", ValueError, "none of its 8 examples has a labelled token (every label is -100)")
def _(tmp):
    rm, _ = build()
    data = _lm_data()
    for e in data.examples:
        e["labels"] = torch.full_like(e["labels"], -100)
    return lambda: Trainer(rm, TrainConfig(max_steps=1, output_dir=str(tmp / "out")), data).fit()


@case("train_fresh_run_over_checkpoints", ValueError, "holds checkpoints of an earlier run (['checkpoint-1', 'checkpoint-2'])")
def _(tmp):
    cfg, data = _checkpointed_run(tmp)
    return lambda: Trainer(build()[0], cfg, data).fit()


@case("train_resume_changed_lr", ValueError, "saved with lr=0.01, this run has lr=0.02")
def _(tmp):
    cfg, data = _checkpointed_run(tmp)
    return lambda: Trainer(build()[0], TrainConfig(**{**cfg.__dict__, "lr": 0.02}), data).fit(resume_from="latest")


@case("train_resume_other_data", ValueError, "this run's train_data has 12")
def _(tmp):
    cfg, _ = _checkpointed_run(tmp)
    return lambda: Trainer(build()[0], cfg, _lm_data(12)).fit(resume_from="latest")


@case("train_resume_past_max_steps", ValueError, "checkpoint-2 is at step 2, and this run trains 2 steps (max_steps=2)")
def _(tmp):
    cfg, data = _checkpointed_run(tmp, max_steps=2)
    shutil.rmtree(tmp / "run" / "checkpoint-1")
    return lambda: Trainer(build()[0], cfg, data).fit(resume_from=tmp / "run" / "checkpoint-2")


@case("train_allow_changes_batch_size", ValueError, "allow_changes: ['batch_size'] cannot change when a run resumes")
def _(tmp):
    cfg, data = _checkpointed_run(tmp)
    return lambda: Trainer(build()[0], cfg, data).fit(resume_from="latest", allow_changes=["batch_size"])


@case("train_bad_process_rng", ValueError, "process 0's saved RNG state cannot be restored (expected a list of 1 dicts, got 'x')")
def _(tmp):
    cfg, data = _checkpointed_run(tmp)
    file = tmp / "run" / "checkpoint-2" / "training_state.json"
    record = json.loads(file.read_text())
    record["state"]["process_rng"] = "x"
    file.write_text(json.dumps(record))
    return lambda: Trainer(build()[0], cfg, data).fit(resume_from="latest")


@case("train_nonfinite_loss", FloatingPointError, "the loss (or a parameter) at step 1 is not finite (nan or inf)")
def _(tmp):
    rm, _ = build()
    return _patched_nan_loss(lambda: Trainer(rm, TrainConfig(max_steps=3, log_every=1), _lm_data()).fit())


@case("train_no_gradient", ValueError, "no trainable parameter received a gradient in the first step (all 2 have grad None)")
def _(tmp):
    import warnings

    model = torch.ao.quantization.quantize_dynamic(tiny.causal_lm(), {torch.nn.Linear}, dtype=torch.qint8)
    rm = reft.IntervenableModel(model, {"layers.0.block_output": reft.RED(tiny.HIDDEN)}, positions="l1")

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(rm, TrainConfig(max_steps=2), _lm_data()).fit()

    return run


@case("train_resume_missing_folder", FileNotFoundError, "resume_from='nope': no such checkpoint folder")
def _(tmp):
    return _in_folder(tmp, lambda: Trainer(build()[0], TrainConfig(max_steps=1), _lm_data()).fit(resume_from="nope"))


# --- saving
def _user_files(folder: Path) -> Path:
    _write(folder / "notes.txt", "mine")
    _write(folder / "src" / "main.py", "print(1)")
    return folder


def _rm():
    torch.manual_seed(0)
    return reft.IntervenableModel(tiny.causal_lm(), {"layers.1.block_output": reft.RED(tiny.HIDDEN)}, positions="all")


for name, shape in [("forward_empty_batch", (0, 5)), ("forward_empty_sequence", (2, 0))]:
    case(name, ValueError, f"the inputs have [batch, seq] = {shape}: an empty batch or sequence has nothing to edit")(
        lambda tmp, shape=shape: lambda: _rm()(input_ids=torch.zeros(shape, dtype=torch.long), attention_mask=torch.ones(shape, dtype=torch.long))
    )


@case("save_over_user_files", ValueError, "holds 2 entries this library did not write (['notes.txt', 'src/'])")
def _(tmp):
    folder = _user_files(tmp / "d")
    return lambda: _rm().save_pretrained(folder)


@case("save_through_symlink_to_user_files", ValueError, "real: holds 2 entries this library did not write")
def _(tmp):
    _user_files(tmp / "real")
    (tmp / "link").symlink_to(tmp / "real")
    return lambda: _rm().save_pretrained(tmp / "link")


@case("save_into_working_folder", ValueError, "save path '.' is the working folder")
def _(tmp):
    rm = _rm()
    return _in_folder(tmp, lambda: rm.save_pretrained("."))


@case("save_onto_a_file", ValueError, "f.txt: exists and is not a folder")
def _(tmp):
    _write(tmp / "f.txt", "x")
    return lambda: _rm().save_pretrained(tmp / "f.txt")


@case("save_over_adapter_with_symlinked_entry", ValueError, "(['log.jsonl'])")
def _(tmp):
    folder = _adapter(tmp / "a")
    (folder / "log.jsonl").symlink_to(folder / "recipe.yaml")
    return lambda: _rm().save_pretrained(folder)


# --- adapter files
def _load(folder: Path) -> Callable[[], None]:
    return lambda: reft.IntervenableModel.from_pretrained(tiny.causal_lm(), folder)


for name, edit, fragment in [
    ("adapter_hidden_size_huge", lambda c: _iv_config(c).update(hidden_size=200_000_000), "loreft has hidden_size 200000000, but the site's hidden size is 32"),
    ("adapter_hidden_size_bool", lambda c: _iv_config(c).update(hidden_size=True), "loreft has hidden_size True, but the site's hidden size is 32"),
    ("adapter_rank_huge", lambda c: _iv_config(c).update(rank=10**9), "loreft rank must be an int in 1..32 (the hidden size), got 1000000000"),
    ("adapter_no_checksum", lambda c: c.pop("files"), "adapter_model.safetensors: its config records no size and checksum"),
    ("adapter_checksum_record", lambda c: c["files"]["adapter_model.safetensors"].update(bytes="abc"), "malformed size and checksum record {'bytes': 'abc'"),
    ("adapter_long_positions", lambda c: c["sites"][0].update(positions="l" + "9" * 5000), "malformed position spec 'l9999"),
    ("adapter_sites_huge_string", lambda c: c.update(sites="x" * 1_000_000), "'sites' must be a non-empty list of sites, got 'xxxx"),
    ("adapter_newer_format", lambda c: c.update(format_version=99), "format_version 99 was written by a newer reft"),
    ("adapter_unknown_site", lambda c: c["sites"][0].update(site="layers.9.block_output"), "layers.9.block_output"),
    ("adapter_head_missing", lambda c: c.update(head=["no_such_head"]), "head module 'no_such_head' not found"),
    ("adapter_format_name", lambda c: c.update(format="pickle"), "'format' is 'pickle', expected 'reft-adapter'"),
]:
    case(name, ValueError, fragment)(lambda tmp, edit=edit: (_edit(_adapter(tmp / "a"), edit), _load(tmp / "a"))[1])


@case("adapter_tensor_file_symlinked_to_3gb", ValueError, "has 3221225472 bytes, but the config records")
def _(tmp):
    folder = _adapter(tmp / "a")
    with open(tmp / "big.bin", "wb") as f:
        f.truncate(3 * 2**30)  # sparse
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(tmp / "big.bin")
    return _load(folder)


@case("adapter_json_deep", ValueError, "adapter_config.json: JSON nested deeper than 32 levels")
def _(tmp):
    folder = _adapter(tmp / "a")
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    return _load(folder)


@case("adapter_config_is_a_fifo", ValueError, "adapter_config.json: not a regular file")
def _(tmp):
    folder = _adapter(tmp / "a")
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    return _load(folder)


@case("checkpoint_python_rng", ValueError, "the saved RNG state cannot be restored")
def _(tmp):
    cfg, data = _checkpointed_run(tmp)
    file = tmp / "run" / "checkpoint-2" / "training_state.json"
    record = json.loads(file.read_text())
    record["rng"]["python"]["__tuple__"][1] = "x"
    file.write_text(json.dumps(record))
    rm, _ = build()
    return lambda: ck.load_training_checkpoint(tmp / "run" / "checkpoint-2", rm)


@case("checkpoint_state_not_object", ValueError, "'state' is [1, 2], expected a JSON object")
def _(tmp):
    cfg, data = _checkpointed_run(tmp)
    file = tmp / "run" / "checkpoint-2" / "training_state.json"
    record = json.loads(file.read_text())
    record["state"] = [1, 2]
    file.write_text(json.dumps(record))
    return lambda: Trainer(build()[0], cfg, data).fit(resume_from="latest")


@case("checkpoint_tensor_symlinked", ValueError, "training_state.safetensors: has 3221225472 bytes")
def _(tmp):
    _checkpointed_run(tmp)
    with open(tmp / "big.bin", "wb") as f:
        f.truncate(3 * 2**30)
    file = tmp / "run" / "checkpoint-2" / "training_state.safetensors"
    file.unlink()
    file.symlink_to(tmp / "big.bin")
    rm, _ = build()
    return lambda: ck.load_training_checkpoint(tmp / "run" / "checkpoint-2", rm)


# --- recipes
@case("recipe_alias_bomb", RecipeError, "bomb.yaml': expands to more than 100,000 values through YAML aliases")
def _(tmp):
    file = _write(tmp / "bomb.yaml", ALIAS_BOMB)
    return lambda: load_recipe(file)


@case("recipe_recursive_alias", RecipeError, "loop.yaml': a YAML alias refers to a value that contains it")
def _(tmp):
    file = _write(tmp / "loop.yaml", "model: &m {a: [*m]}\n")
    return lambda: load_recipe(file)


@case("recipe_too_big", RecipeError, "big.yaml': 1,048,586 bytes; a recipe is at most 1,048,576 bytes")
def _(tmp):
    file = _write(tmp / "big.yaml", "name: x\n# " + "x" * 2**20)
    return lambda: load_recipe(file)


@case("recipe_not_utf8", RecipeError, "latin.yaml': not UTF-8 text")
def _(tmp):
    file = _write(tmp / "latin.yaml", "name: caf\xe9\n".encode("latin-1"))
    return lambda: load_recipe(file)


for name, change, fragment in [
    ("recipe_import_missing", {"imports": ["no_such_module_xyz"]}, "imports: cannot import 'no_such_module_xyz'"),
    ("recipe_import_not_a_name", {"imports": ["os; rm -rf ~"]}, "imports: 'os; rm -rf ~' is not a module name"),
    ("recipe_dropout_nan", {"intervention": {"dropout": nan}}, "intervention.dropout: nan must be in [0, 1)"),
    ("recipe_epochs_inf", {"train": {"epochs": inf}}, "TrainConfig.epochs = inf"),
    ("recipe_positions_long", {"intervention": {"positions": "l" + "9" * 30}}, "malformed position spec 'l9999"),
    ("recipe_layers_nested", {"intervention": {"layers": [[1] * 1000] * 1000}}, "intervention.layers: [[1, 1, 1, 1, ...]"),
    ("recipe_model_path_type", {"model": {"path": ["a"] * 10**6}}, "model.path: expected a string, got ['a', 'a', 'a', 'a', ...]"),
]:
    def _setup(tmp, change=change):
        raw = base_raw()
        for key, value in change.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
        return lambda: parse_recipe(raw)

    case(name, RecipeError, fragment)(_setup)

case("recipe_set_empty_key", RecipeError, "--set 'train..lr=1': the key 'train..lr' has an empty part")(
    lambda tmp: lambda: set_key({}, "train..lr=1")
)


# --- the command line
@case("cli_temperature_nan", CommandFailed, "--temperature nan: must be a finite number >= 0")
def _(tmp):
    return cli("generate", _adapter(tmp / "a"), "--prompt", "w1", "--temperature", "nan", "--model", "builtin:smollm2")


@case("cli_max_new_tokens_zero", CommandFailed, "--max-new-tokens 0: must be an int >= 1")
def _(tmp):
    return cli("generate", _adapter(tmp / "a"), "--prompt", "w1", "--max-new-tokens", "0", "--model", "builtin:smollm2")


@case("cli_eval_batch_size_zero", CommandFailed, "--batch-size 0: must be an int >= 1")
def _(tmp):
    return cli("eval", _adapter(tmp / "a"), "--generate", "--batch-size", "0")


@case("cli_dry_run_missing_data", CommandFailed, "data.train: no such file 'missing.jsonl' (the recipe itself is valid)")
def _(tmp):
    return cli("train", _recipe(tmp, data={"train": "missing.jsonl"}), "--dry-run")


@case("cli_dry_run_missing_model", CommandFailed, "model.path: no such folder './no-such-model'")
def _(tmp):
    return cli("train", _recipe(tmp, model={"path": "./no-such-model", "architecture": "llama"}), "--dry-run")


@case("cli_recipe_error_names_file", CommandFailed, "r.yaml: intervention.typ: unknown key; did you mean 'type'?")
def _(tmp):
    return cli("train", _recipe(tmp, intervention={"typ": "red"}), "--dry-run")


@case("cli_allow_change_batch_size", CommandFailed, "allow_changes: ['batch_size'] cannot change when a run resumes")
def _(tmp):
    return cli("train", _recipe(tmp), "--resume", "latest", "--allow-change", "batch_size")


@case("cli_allow_change_without_resume", CommandFailed, "--allow-change lr: goes with --resume")
def _(tmp):
    return cli("train", _recipe(tmp), "--allow-change", "lr")


@case("cli_info_sites_not_a_list", CommandFailed, "'sites' must be a non-empty list of sites, got 5")
def _(tmp):
    folder = _adapter(tmp / "a")
    _edit(folder, lambda c: c.update(sites=5))
    return cli("info", folder)


@case("cli_info_config_a_list", CommandFailed, "adapter_config.json: expected a JSON object, got list")
def _(tmp):
    folder = _adapter(tmp / "a")
    (folder / "adapter_config.json").write_text("[1, 2]")
    return cli("info", folder)


@case("cli_info_garbage_weights", CommandFailed, "adapter_model.safetensors: not a valid safetensors file")
def _(tmp):
    folder = _adapter(tmp / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    return cli("info", folder)


@case("cli_eval_data_line", CommandFailed, "qa.jsonl:2: not valid JSON")
def _(tmp):
    data = _write(tmp / "qa.jsonl", '{"instruction": "a", "output": "b", "answer": "b"}\n{"instruction": \n')
    recipe = _recipe(tmp, data={"train": str(data), "eval": str(data), "answer": "{answer}"})
    return cli("eval", _adapter(tmp / "a"), "--config", recipe, "--generate")


@case("cli_import_missing", CommandFailed, "--import: cannot import 'nowhere_module_13'")
def _(tmp):
    return cli("eval", _adapter(tmp / "a"), "--import", "nowhere_module_13")


@case("cli_info_missing_folder", CommandFailed, "nowhere: no adapter_config.json; not an adapter folder")
def _(tmp):
    return cli("info", tmp / "nowhere")


def test_there_are_at_least_sixty_distinct_bad_inputs():
    assert len(CASES) >= 60, len(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_clear_error_and_changes_nothing_on_disk(name, tmp_path):
    setup, error, fragment = CASES[name]
    call = setup(tmp_path)
    before = disk.snapshot(tmp_path)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert fragment in message, (fragment, message)
    assert len(message) < 1000 and "\n" not in message.rstrip("\n"), message  # one short line
    assert disk.snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- memory
MEMORY_CHECK = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import torch, reft
    from reft.recipes import RecipeError, load_recipe
    from tests import tiny
    from tests.test_recipes import ALIAS_BOMB

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    ids = torch.randint(3, 90, (2, 8))

    def lm_with(spec):
        torch.manual_seed(0)
        return reft.IntervenableModel(tiny.causal_lm(), {{"layers.1.block_output": reft.LoReFT(32, 4)}}, positions=spec)

    lm_with("l1")(input_ids=ids)  # warm up every allocation a forward makes
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * 2**30, resource.RLIM_INFINITY))  # a regression fails, not the machine
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak():
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # MB above the baseline

    out = {{}}

    def check(name, run):
        try:
            run()
            out[name] = ["ok", peak()]
        except Exception as e:
            out[name] = [type(e).__name__ + ": " + str(e)[:200], peak()]

    (tmp / "bomb.yaml").write_text(ALIAS_BOMB)
    check("recipe of nested aliases", lambda: load_recipe(tmp / "bomb.yaml"))

    lm_with("l1").save_pretrained(tmp / "a")
    config = json.loads((tmp / "a" / "adapter_config.json").read_text())
    config["sites"][0]["interventions"][0]["config"]["hidden_size"] = 200000000
    (tmp / "a" / "adapter_config.json").write_text(json.dumps(config))
    check("adapter hidden_size 200000000", lambda: reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp / "a"))

    check("positions l100000000 (API)", lambda: lm_with("l100000000")(input_ids=ids))

    lm_with("l1").save_pretrained(tmp / "b")
    config = json.loads((tmp / "b" / "adapter_config.json").read_text())
    config["sites"][0]["positions"] = "l100000000"
    (tmp / "b" / "adapter_config.json").write_text(json.dumps(config))
    check("positions l100000000 (file)", lambda: reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp / "b")(input_ids=ids))

    lm_with("l1").save_pretrained(tmp / "c")
    with open(tmp / "big.bin", "wb") as f:
        f.truncate(3 * 2**30)
    (tmp / "c" / "adapter_model.safetensors").unlink()
    (tmp / "c" / "adapter_model.safetensors").symlink_to(tmp / "big.bin")
    check("tensor file symlinked to 3 GB", lambda: reft.IntervenableModel.from_pretrained(tiny.causal_lm(), tmp / "c"))
    print(json.dumps(out))
    """
)


def test_small_inputs_never_allocate_much():
    """In a fresh process (its peak RSS is its own): each of the audit's small inputs that allocated
    0.7 to 25.6 GB stays under 100 MB above the baseline (ru_maxrss), and fails or works as it should."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_CHECK.format(root=str(ROOT))], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["recipe of nested aliases"][0].startswith("RecipeError: ") and "100,000 values" in result["recipe of nested aliases"][0]
    assert result["adapter hidden_size 200000000"][0].startswith("ValueError: ") and "200000000" in result["adapter hidden_size 200000000"][0]
    assert result["positions l100000000 (API)"][0] == "ok"  # the spec takes the whole sequence
    assert result["positions l100000000 (file)"][0] == "ok"
    assert result["tensor file symlinked to 3 GB"][0].startswith("ValueError: ") and "3221225472 bytes" in result["tensor file symlinked to 3 GB"][0]
    peaks = {name: mb for name, (_, mb) in result.items()}
    assert all(mb < 100 for mb in peaks.values()), peaks
