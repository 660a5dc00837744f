"""YAML recipes: every shipped config validates and dry-runs; bad recipes fail with a clear message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

import reft
from reft.evaluate import extract_answer, same_answer
from reft.recipes import RecipeError, answer_data, build_data, dry_run, load_recipe, parse_recipe, read_rows, set_key

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))  # each dry-runs in test_cli.py


def base_raw(**sections) -> dict:
    raw = {
        "name": "t",
        "model": {"path": "builtin:smollm2"},
        "intervention": {"type": "loreft", "rank": 4, "layers": [3], "positions": "l1"},
        "data": {"train": "configs/data/pirate.jsonl"},
        "train": {"lr": 1e-3, "epochs": 1},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value}
    return raw


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"commonsense_loreft", "math_loreft", "instruction_loreft", "glue_loreft_roberta", "glue_red_roberta"} <= names
    assert {"smollm2_pirate", "minilm_sentiment_loreft", "minilm_sentiment_red"} <= names


def test_papers_settings_are_the_papers():
    """Parameter counts from the papers' formulas, not from the code: LoReFT has 2·r·d + r per intervention."""
    commonsense = load_recipe("configs/commonsense_loreft.yaml")
    assert (commonsense.intervention.rank, commonsense.intervention.positions, commonsense.intervention.tied) == (8, "f7+l7", True)
    assert (commonsense.train.lr, commonsense.train.epochs, commonsense.train.batch_size, commonsense.train.grad_accum) == (9e-4, 6, 16, 2)
    assert commonsense.train.warmup_ratio == 0.1
    assert dry_run(commonsense)["trainable_params"] == 32 * (2 * 8 * 4096 + 8)  # 0.031% of LLaMA-7B
    assert load_recipe("configs/math_loreft.yaml").train.epochs == 12

    instruction = load_recipe("configs/instruction_loreft.yaml")
    summary = dry_run(instruction)
    assert summary["sites"] == [f"layers.{i}.block_output" for i in (3, 9, 18, 24)]
    assert summary["trainable_params"] == 4 * 2 * (2 * 4 * 4096 + 4)  # untied: a prefix and a suffix intervention
    assert (instruction.intervention.positions, instruction.intervention.tied, instruction.train.lr) == ("f5+l5", False, 9e-4)

    glue = load_recipe("configs/glue_loreft_roberta.yaml")
    summary = dry_run(glue)
    assert summary["positions"] == "f1" and summary["head"] == ["classifier"]
    head = 768 * 768 + 768 + 768 * 2 + 2  # RobertaClassificationHead: dense + out_proj
    assert summary["trainable_params"] == 12 * (2 * 1 * 768 + 1) + head

    red = dry_run(load_recipe("configs/glue_red_roberta.yaml"))
    assert red["sites"] == [f"layers.{i}.mlp_output" for i in range(12)] and red["positions"] == "all"
    assert red["trainable_params"] == 12 * 2 * 768 + head


def test_overrides_are_yaml_and_coerced():
    recipe = load_recipe(
        "configs/smollm2_pirate.yaml",
        ["train.lr=9e-4", "intervention.layers=[3, 9]", "intervention.tied=false", "train.max_steps=5", "data.max_length=64"],
    )
    assert recipe.train.lr == 9e-4 and isinstance(recipe.train.lr, float)  # YAML reads "9e-4" as a string
    assert recipe.intervention.layers == [3, 9] and recipe.intervention.tied is False
    assert recipe.train.max_steps == 5 and recipe.data.max_length == 64
    assert dry_run(recipe)["sites"] == ["layers.3.block_output", "layers.9.block_output"]


def test_pyreft_layer_syntax():
    recipe = parse_recipe(base_raw(intervention={"layers": "3;9;18"}))
    assert recipe.layer_indices(30) == [3, 9, 18]
    assert parse_recipe(base_raw(intervention={"layers": "all"})).layer_indices(4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"pathh": "x"}}, "model.pathh: unknown key; did you mean 'path'?"),
        ({"model": {"path": "builtin:smollm3"}}, "model.path: 'builtin:smollm3' is not valid; did you mean 'builtin:smollm2'?"),
        ({"model": {"task": "seq2seq"}}, "model.task: 'seq2seq' is not valid (valid: causal_lm, classification)"),
        ({"model": {"dtype": "fp8"}}, "model.dtype: 'fp8' is not valid (valid: float32, bfloat16, float16)"),
        ({"intervention": {"type": "lorefft"}}, "intervention.type: 'lorefft' is not valid; did you mean 'loreft'?"),
        ({"intervention": {"component": "mlp"}}, "intervention.component: 'mlp' is not valid"),
        ({"intervention": {"positions": "last7"}}, "intervention.positions: malformed position spec 'last7'"),
        ({"intervention": {"layers": "three"}}, "intervention.layers: 'three' is not valid (valid: all, an index"),
        ({"intervention": {"rank": "four"}}, "intervention.rank: expected an integer, got 'four'"),
        ({"intervention": {"type": "red"}}, "intervention.rank: intervention 'red' takes no 'rank' (it takes: dtype)"),
        ({"intervention": {"rank": None}}, "intervention.rank: intervention 'loreft' needs 'rank'"),
        ({"intervention": {"args": {"alpha": 2}}}, "intervention.args.alpha: intervention 'loreft' takes no 'alpha'"),
        ({"intervention": {"dropout": 1.5}}, "intervention.dropout: 1.5 must be in [0, 1)"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction: 1.0 must be in [0, 1)"),
        ({"data": {"train": "builtin:imdb"}}, "data.train: 'builtin:imdb' is not valid (valid: builtin:rotten_tomatoes)"),
        ({"data": {"prompt": "{}"}}, "data.prompt: template '{}' must name fields"),
        ({"data": {"answer": "{}"}}, "data.answer: template '{}' must name fields"),
        ({"data": {"answer_pattern": "answer(1|2"}}, "data.answer_pattern: pattern 'answer(1|2' is not a valid regular expression"),
        ({"data": {"answer_match": "middle"}}, "data.answer_match: 'middle' is not valid (valid: first, last)"),
        (
            {"model": {"path": "builtin:minilm", "task": "classification"}, "data": {"answer": "{label}"}},
            "data.answer: answers are generated by causal LMs; model.task is 'classification'",
        ),
        ({"train": {"lr": 3}}, "train: TrainConfig.lr = 3.0: must be a number in (0, 1)"),
        ({"train": {"lrate": 3}}, "train.lrate: unknown key"),
        ({"train": {"schedule": "step"}}, "train: TrainConfig.schedule = 'step': must be one of linear, cosine, constant"),
    ],
)
def test_bad_recipes_name_the_key_and_the_choices(change, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(base_raw(**change))
    assert message in str(e.value)


def test_missing_sections_and_files(tmp_path):
    with pytest.raises(RecipeError, match="data: missing section"):
        parse_recipe({"model": {"path": "x"}, "intervention": {"rank": 1}})
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="expected key=value"):
        set_key({}, "train.lr")


def test_layer_out_of_range_names_the_range():
    recipe = parse_recipe(base_raw(intervention={"layers": [3, 30]}))
    with pytest.raises(RecipeError, match=r"intervention.layers: \[30\] out of range; the model has 30 layers \(0–29\)"):
        dry_run(recipe)


def test_unknown_module_site_is_reported_with_the_key():
    recipe = parse_recipe(base_raw(intervention={"sites": ["model.layers.3.mlpp"]}))
    with pytest.raises(RecipeError, match="intervention.sites: site 'model.layers.3.mlpp': no module"):
        dry_run(recipe)


def test_own_intervention_through_imports(tmp_path, monkeypatch):
    (tmp_path / "my_interventions.py").write_text(
        "import torch, reft\n"
        "@reft.register_intervention('test_shift')\n"
        "class Shift(reft.Intervention):\n"
        "    def __init__(self, hidden_size, scale=1.0):\n"
        "        super().__init__(hidden_size=hidden_size, scale=scale)\n"
        "        self.b = torch.nn.Parameter(torch.zeros(hidden_size))\n"
        "    def forward(self, h):\n"
        "        return h + self.b\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = base_raw(intervention={"type": "test_shift", "rank": None, "args": {"scale": 2.0}})
    raw["imports"] = ["my_interventions"]
    summary = dry_run(parse_recipe(raw))
    assert summary["trainable_params"] == 576
    with pytest.raises(RecipeError, match="imports: cannot import 'no_such_module_xyz'"):
        parse_recipe({**raw, "imports": ["no_such_module_xyz"]})


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe("configs/instruction_loreft.yaml")
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    again = load_recipe(tmp_path / "r.yaml")
    assert again.to_dict() == recipe.to_dict()
    assert yaml.safe_load(recipe.to_yaml())["intervention"]["layers"] == "3;9;18;24"


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path):
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(50)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = base_raw(data={"train": str(path), "eval_fraction": 0.2})
    raw["model"] = {"path": "builtin:minilm", "task": "classification"}
    raw["intervention"] = {"type": "red", "layers": "all", "component": "mlp_output", "positions": "all"}
    recipe = parse_recipe(raw)
    train, evaluation = read_rows(recipe, "train"), read_rows(recipe, "eval")
    assert len(train) == 40 and len(evaluation) == 10
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in evaluation)
    assert read_rows(parse_recipe(raw), "eval") == evaluation  # the same split every time
    raw["data"]["seed"] = 1
    assert read_rows(parse_recipe(raw), "eval") != evaluation


def test_templates_fill_from_fields_and_name_missing_ones(tmp_path):
    from transformers import AutoTokenizer

    from reft.assets import smollm2_path

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "Add", "input": "2 and 2", "output": "4"}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    recipe = parse_recipe(base_raw(data={"train": str(path), "prompt": "{instruction}: {input}", "response": "{output}"}))
    train, evaluation = build_data(recipe, tokenizer)
    assert evaluation is None and len(train) == 1
    text = tokenizer.decode(train[0]["input_ids"])
    assert "Add: 2 and 2" in text and text.endswith("4<|im_end|>")
    recipe = parse_recipe(base_raw(data={"train": str(path), "prompt": "{question}"}))
    with pytest.raises(RecipeError, match="data.prompt: example 0 has no field 'question' .*instruction, input, output"):
        build_data(recipe, tokenizer)


def test_recipe_builds_the_same_model_as_the_api():
    """The recipe path and the Python API give the same sites, positions and parameter count."""
    import torch
    import transformers

    from reft.recipes import build_intervenable

    recipe = load_recipe("configs/smollm2_pirate.yaml")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    rm = build_intervenable(recipe, model)
    assert rm.sites == ["layers.15.block_output"]
    assert rm.site_positions() == {"layers.15.block_output": ("l1", True)}
    assert isinstance(rm["layers.15.block_output"], reft.LoReFT)
    assert sum(p.numel() for p in rm.trainable_parameters()) == 2 * 4 * 576 + 4


def test_output_dir_defaults_to_runs_name():
    assert parse_recipe(base_raw()).train.output_dir == "runs/t"
    assert parse_recipe(base_raw(train={"output_dir": "out/x"})).train.output_dir == "out/x"


def test_papers_recipes_score_generated_answers_as_the_papers():
    math = load_recipe("configs/math_loreft.yaml").data
    assert (math.answer, math.answer_match) == ("{answer}", "last")
    number = extract_answer("3 boxes of 250 pens make 1,250 pens. The answer is 1,250.", math.answer_pattern, math.answer_match)
    assert number == "1,250" and same_answer(number, "1250.0")
    commonsense = load_recipe("configs/commonsense_loreft.yaml").data
    assert (commonsense.answer, commonsense.answer_match) == ("{answer}", "first")
    for word in ["true", "false", "solution2", "answer5", "ending4", "option1"]:
        assert extract_answer(f"the correct answer is {word}, not option2", commonsense.answer_pattern, "first") == word


def test_answer_data_fills_the_templates_and_names_what_is_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"What is {i} + {i}?", "output": f"{i} + {i} = {2 * i}", "answer": str(2 * i)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"data.train={path}", f"data.eval={path}", "data.answer={answer}", "data.prompt=Q: {instruction}"]
    recipe = load_recipe("configs/smollm2_pirate.yaml", overrides)  # {answer} is a template, not a YAML mapping
    assert answer_data(recipe) == (["Q: What is 0 + 0?", "Q: What is 1 + 1?", "Q: What is 2 + 2?"], ["0", "2", "4"])
    with pytest.raises(RecipeError, match=r"data.answer: the recipe has no gold answers: set data.answer, e.g. --set data.answer=\{answer\}"):
        answer_data(load_recipe("configs/smollm2_pirate.yaml", [*overrides[:2], "data.answer=null"]))
    with pytest.raises(RecipeError, match="the recipe has no eval data"):
        answer_data(load_recipe("configs/smollm2_pirate.yaml", [f"data.train={path}", "data.eval=null", "data.answer={answer}"]))
    with pytest.raises(RecipeError, match="data.answer: example 0 has no field 'gold'"):
        answer_data(load_recipe("configs/smollm2_pirate.yaml", [*overrides[:2], "data.answer={gold}"]))


# ------------------------------------------------------------------ bounded reading
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)
) + "model: *j\nintervention: {}\ndata: {}\n"


def test_a_recipe_of_nested_aliases_is_refused_before_it_expands(tmp_path):
    """A 667-byte recipe that names 9^10 values: before, its error message alone took 157 MB."""
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 700
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "bomb.yaml")
    assert "expands to more than 100,000 values through YAML aliases" in str(e.value) and len(str(e.value)) < 300
    (tmp_path / "loop.yaml").write_text("model: &m [1, *m]\n")
    with pytest.raises(RecipeError, match="a YAML alias refers to a value that contains it"):
        load_recipe(tmp_path / "loop.yaml")
    flow = "{" + ", ".join(line for line in ALIAS_BOMB.splitlines()[:10]) + "}"  # the same aliases on one line
    with pytest.raises(RecipeError, match="--set 'intervention.args=.*: expands to more than 100,000 values"):
        set_key({}, "intervention.args=" + flow)


def test_bad_values_are_shown_short(tmp_path):
    long = "x" * 1_000_000
    with pytest.raises(RecipeError) as e:
        parse_recipe(base_raw(intervention={"positions": long}))
    assert "malformed position spec 'xxxx" in str(e.value) and len(str(e.value)) < 400
    with pytest.raises(RecipeError) as e:
        parse_recipe(base_raw(intervention={"layers": [[1] * 1000] * 1000}))
    assert "intervention.layers: [[1, 1, 1, 1, ...]" in str(e.value) and len(str(e.value)) < 400


def test_imports_are_found_as_python_dash_m_finds_them(tmp_path, monkeypatch):
    """Under the `reft` console script sys.path[0] is the script's folder, not the working folder: a
    module beside the user's recipe was not found there."""
    from reft.interventions import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    (tmp_path / "cwd_interventions.py").write_text(
        "import reft\n"
        "@reft.register_intervention('test_cwd_red')\n"
        "class CwdRED(reft.RED):\n"
        "    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    raw = base_raw(intervention={"type": "test_cwd_red", "rank": None})
    raw["imports"] = ["cwd_interventions"]
    try:
        recipe = parse_recipe(raw)
        assert recipe.intervention.type == "test_cwd_red" and str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("cwd_interventions", None)


def test_data_files_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(RecipeError, match=rf"data.train: {path}:3: not valid JSON \(Expecting value, column 32\)"):
        read_rows(parse_recipe(base_raw(data={"train": str(path)})), "train")
    path.write_text('{"instruction": "a", "output": "b"}\n[1, 2]\n')
    with pytest.raises(RecipeError, match=rf"data.train: {path}:2: expected an object of fields"):
        read_rows(parse_recipe(base_raw(data={"train": str(path)})), "train")
    whole = tmp_path / "d.json"
    whole.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(RecipeError, match=rf"data.train: {whole}:3: not valid JSON"):
        read_rows(parse_recipe(base_raw(data={"train": str(whole)})), "train")
    whole.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3))
    assert len(read_rows(parse_recipe(base_raw(data={"train": str(whole)})), "train")) == 3
