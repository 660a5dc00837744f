"""The `reft` command: help, dry runs of every config, and train -> info -> generate -> eval end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from reft.cli import main

from . import disk

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["generate"], ["info"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: reft")
    if command == ["train"]:
        assert "--dry-run" in out and "--set KEY=VALUE" in out
    if command == ["eval"]:
        assert all(flag in out for flag in ("--generate", "--max-new-tokens N", "--batch-size N", "--predictions FILE.jsonl"))


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_console_script_is_declared_and_installed():
    assert 'reft = "reft.cli:main"' in (ROOT / "pyproject.toml").read_text()
    script = Path(sys.executable).parent / "reft"
    if not script.exists():
        pytest.skip("the package was installed before the console script was added: `make install` adds it")
    result = subprocess.run([str(script), "info", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: reft info" in result.stdout


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_passes_dry_run(path, capsys):
    """A recipe whose data file is on this machine passes; one whose data is not (the papers' data sets,
    downloaded by the user) is checked all the same, then refused, naming the missing file."""
    train = yaml.safe_load(path.read_text())["data"]["train"]
    missing = Path(train).suffix in (".json", ".jsonl") and not (ROOT / train).is_file()
    code = main(["train", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    assert "trainable_params" in out
    if missing:
        assert code == 2 and f"data.train: no such file {train!r} (the recipe itself is valid)" in err
        assert main(["train", str(path), "--dry-run", "--set", "data.train=configs/data/pirate.jsonl"]) == 0
        out = capsys.readouterr().out
    else:
        assert code == 0
    assert "OK (dry run, no weights loaded)" in out


def test_bad_recipe_exits_2_with_the_key(capsys):
    code = main(["train", str(ROOT / "configs/smollm2_pirate.yaml"), "--dry-run", "--set", "intervention.typ=red"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("reft train: error: ") and err.count("\n") == 1
    assert "configs/smollm2_pirate.yaml: intervention.typ: unknown key; did you mean 'type'?" in err


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer (and chat template), saved as a model folder."""
    from reft.assets import smollm2_path

    path = tmp_path_factory.mktemp("tiny-lm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_info_generate_eval(tiny_lm, tmp_path, capsys):
    recipe = {
        "name": "tiny",
        "model": {"path": str(tiny_lm), "task": "causal_lm", "device": "cpu"},
        "intervention": {"type": "loreft", "rank": 2, "layers": [1], "positions": "l1"},
        "data": {"train": str(ROOT / "configs/data/pirate.jsonl"), "eval_fraction": 0.2, "max_length": 128},
        "train": {"lr": 1e-2, "max_steps": 3, "batch_size": 4, "log_every": 1, "output_dir": str(tmp_path / "run")},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "tiny.yaml"), "--set", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    adapter = tmp_path / "run" / "adapter"
    assert f"adapter saved to {adapter}" in out and "eval {" in out
    assert (adapter / "adapter_config.json").is_file() and (adapter / "recipe.yaml").is_file()
    assert yaml.safe_load((adapter / "recipe.yaml").read_text())["train"]["seed"] == 3  # the override is recorded
    assert (tmp_path / "run" / "log.jsonl").is_file()

    assert main(["info", str(adapter)]) == 0
    info = capsys.readouterr().out
    assert "layers.1.block_output [l1]: loreft(hidden_size=32, rank=2" in info
    assert f"parameters:     {2 * 2 * 32 + 2:,} (interventions {2 * 2 * 32 + 2:,})" in info
    assert main(["info", str(adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"][0]["site"] == "layers.1.block_output"

    assert main(["generate", str(adapter), "--prompt", "Hi", "--prompt", "Who wrote Hamlet?", "--max-new-tokens", "3", "--compare"]) == 0
    gen = capsys.readouterr().out
    assert gen.count("prompt: ") == 2 and gen.count("base:") == 2 and gen.count("intervened:") == 2

    assert main(["eval", str(adapter)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) >= {"eval_loss", "eval_token_accuracy"}

    shutil.copytree(adapter, tmp_path / "bare")
    (tmp_path / "bare" / "recipe.yaml").unlink()
    assert main(["generate", str(tmp_path / "bare"), "--prompt", "Hi", "--max-new-tokens", "2"]) == 2
    assert "no recipe.yaml beside the adapter" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "bare"), "--model", str(tiny_lm), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0


def test_classification_recipe_trains_and_evaluates(tmp_path, capsys):
    overrides = [
        "data.max_train_examples=16", "data.max_eval_examples=16", "train.max_steps=2", "train.batch_size=8",
        f"train.output_dir={tmp_path}", "model.device=cpu",
    ]
    args = ["train", str(ROOT / "configs/minilm_sentiment_red.yaml")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    assert "eval {" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "adapter")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_info_on_a_folder_without_adapter(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no adapter_config.json; not an adapter folder" in capsys.readouterr().err


def test_eval_generate_scores_answers_and_writes_predictions(tiny_lm, tmp_path, capsys):
    """`reft eval --generate` on a saved (untrained) adapter: the JSON metrics, the predictions file,
    and an accuracy that counts exactly the examples whose gold answer is what the model generates."""
    from reft.recipes import build_intervenable, load_model, parse_recipe

    questions = ["Who wrote Hamlet?", "Name a fruit.", "Why is the sky blue?", "What is 2 + 2?", "Hi"]
    data = tmp_path / "qa.jsonl"

    def write(answers):
        data.write_text("".join(json.dumps({"question": q, "gold": a}) + "\n" for q, a in zip(questions, answers)))

    write(["none"] * 5)
    recipe = {
        "name": "tiny-qa",
        "model": {"path": str(tiny_lm), "task": "causal_lm", "device": "cpu"},
        "intervention": {"type": "loreft", "rank": 2, "layers": [1], "positions": "f1+l1"},
        "data": {"train": str(data), "eval": str(data), "prompt": "Q: {question}", "response": "{gold}"},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    config = tmp_path / "qa.yaml"
    config.write_text(yaml.safe_dump(recipe))
    model, _ = load_model(parse_recipe(recipe))
    torch.manual_seed(0)
    build_intervenable(parse_recipe(recipe), model).save_pretrained(tmp_path / "adapter")

    run = ["eval", str(tmp_path / "adapter"), "--config", str(config), "--generate", "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(run) == 2
    assert "data.answer: the recipe has no gold answers: set data.answer, e.g. --set data.answer={answer}" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "adapter"), "--config", str(config), "--batch-size", "2"]) == 2
    assert "--batch-size goes with --generate" in capsys.readouterr().err

    predictions = tmp_path / "out" / "predictions.jsonl"
    assert main([*run, "--set", "data.answer={gold}", "--predictions", str(predictions)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == {"answer_accuracy": 0.0, "n": 5, "mode": "prompt"}
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Q: {q}" for q in questions]
    assert all(set(r) == {"prompt", "generation", "extracted", "answer", "correct"} for r in rows)
    assert not list(predictions.parent.glob(".*"))  # written through a temporary file, renamed

    write([rows[0]["generation"], rows[1]["generation"].upper(), "none", "none", "none"])  # two now right
    assert main([*run, "--set", "data.answer={gold}", "--predictions", str(predictions)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer_accuracy"] == 0.4
    assert [json.loads(line)["correct"] for line in predictions.read_text().splitlines()] == [True, True, False, False, False]

    # `reft generate` formats prompts as training and `eval --generate` do: the same answers
    generate = ["generate", str(tmp_path / "adapter"), "--model", str(tiny_lm), "--max-new-tokens", "4"]
    assert main([*generate, *(arg for r in rows[:3] for arg in ("--prompt", r["prompt"]))]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if not line.startswith("prompt:")]
    assert printed == [r["generation"].strip().replace("\n", " ") for r in rows[:3]]


# ------------------------------------------------------------------ nothing run, nothing lost
def _tiny_adapter(tiny_lm, folder: Path, data: Path, **recipe_extra) -> dict:
    """A saved (untrained) adapter on the tiny model, with the recipe.yaml `reft train` would write."""
    from reft.recipes import build_intervenable, load_model, parse_recipe

    data.write_text("".join(json.dumps({"instruction": f"Q{i}?", "output": f"A{i}."}) + "\n" for i in range(4)))
    recipe = {
        "name": "tiny",
        "model": {"path": str(tiny_lm), "task": "causal_lm", "device": "cpu"},
        "intervention": {"type": "loreft", "rank": 2, "layers": [1], "positions": "l1"},
        "data": {"train": str(data), "eval": str(data)},
        "train": {"output_dir": str(folder.parent), "batch_size": 2},
        **recipe_extra,
    }
    model, _ = load_model(parse_recipe(recipe, import_modules=False))
    torch.manual_seed(0)
    build_intervenable(parse_recipe(recipe, import_modules=False), model).save_pretrained(folder)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return recipe


def test_eval_from_inside_an_adapter_runs_no_code_of_it(tiny_lm, tmp_path, monkeypatch, capsys):
    """`python -m reft.cli eval .` inside an adapter whose recipe.yaml names `imports: [helpers]`, with a
    helpers.py beside it: before, helpers.py ran. `python -m` puts the working folder on sys.path first."""
    adapter = tmp_path / "run" / "adapter"
    _tiny_adapter(tiny_lm, adapter, tmp_path / "qa.jsonl", imports=["helpers_issue13"])
    marker = tmp_path / "helpers-ran"
    (adapter / "helpers_issue13.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(adapter)
    monkeypatch.syspath_prepend(str(adapter))
    try:
        assert main(["eval", "."]) == 0
        assert "eval_loss" in capsys.readouterr().out
        assert main(["eval", ".", "--import", "helpers_issue13"]) == 2
        err = capsys.readouterr().err
        assert "--import: cannot import 'helpers_issue13': no module named 'helpers_issue13' in the working folder or on " \
            "sys.path (the adapter's folder '.' is never searched)" in err
        assert main(["generate", ".", "--prompt", "Hi", "--max-new-tokens", "1", "--import", "helpers_issue13"]) == 2
        assert not marker.exists() and "helpers_issue13" not in sys.modules
    finally:
        sys.modules.pop("helpers_issue13", None)


def test_train_refuses_an_adapter_folder_with_user_files_before_training(tiny_lm, tmp_path, capsys):
    """`--set train.output_dir=proj` where proj/adapter/ holds a user file: before, training ran and the
    save then removed the file."""
    recipe = _tiny_adapter(tiny_lm, tmp_path / "elsewhere" / "adapter", tmp_path / "qa.jsonl")
    (tmp_path / "proj" / "adapter").mkdir(parents=True)
    (tmp_path / "proj" / "adapter" / "notes.txt").write_text("mine")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "train": {"max_steps": 1}}))
    before = disk.snapshot(tmp_path / "proj")
    capsys.readouterr()
    assert main(["train", str(tmp_path / "r.yaml"), "--set", f"train.output_dir={tmp_path / 'proj'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "proj/adapter: holds 1 entry this library did not write (['notes.txt'])" in err
    assert disk.snapshot(tmp_path / "proj") == before  # nothing trained, logged or saved


def test_pirate_recipe_has_eval_data(tiny_lm, tmp_path, capsys):
    """configs/smollm2_pirate.yaml as shipped (a tiny model and two steps instead of SmolLM2 and 30 epochs): eval works."""
    run = tmp_path / "run"
    tiny = ["--set", f"model.path={tiny_lm}", "--set", "intervention.layers=[1]", "--set", "train.max_steps=2",
            "--set", f"train.output_dir={run}"]
    assert main(["train", str(ROOT / "configs/smollm2_pirate.yaml"), *tiny]) == 0
    assert "eval {" in capsys.readouterr().out  # evaluated on the held-out pairs after training
    assert main(["eval", str(run / "adapter")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) >= {"eval_loss", "eval_token_accuracy"}
    predictions = tmp_path / "p.jsonl"
    assert main(["eval", str(run / "adapter"), "--generate", "--max-new-tokens", "3", "--predictions", str(predictions)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["answer_accuracy"] <= 1
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["Arr"] * 4
    assert all(r["correct"] == (r["extracted"] is not None) for r in rows)  # right exactly when it opens with "Arr"


def test_pirate_answer_pattern():
    from reft.evaluate import extract_answer
    from reft.recipes import load_recipe

    data = load_recipe(str(ROOT / "configs/smollm2_pirate.yaml")).data
    found = {text: extract_answer(text, data.answer_pattern, data.answer_match)
             for text in ("Arr, matey!", " arr! Cats like fish.", "Arrgh", "The tallest mountain. Arr!", "Well, arr")}
    assert found == {"Arr, matey!": "Arr", " arr! Cats like fish.": "arr", "Arrgh": None,
                     "The tallest mountain. Arr!": None, "Well, arr": None}
