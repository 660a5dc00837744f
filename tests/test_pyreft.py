"""reft.pyreft / `reft convert-pyreft`: adapters saved by real pyreft 0.1.0 give pyreft's own logits.

tests/data/pyreft/ was written by bench/peer/pyreft_adapters.py in .venv-peer (pyreft 0.1.0,
pyvene 0.1.8, transformers 4.45.1): a tiny random LLaMA (`base/`), and per adapter what
`reft_model.save()` wrote, the inputs, and pyreft's logits without and with the interventions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import reft
from reft.cli import main
from reft.pyreft import convert_pyreft, load_pyreft

DATA = Path(__file__).resolve().parent / "data" / "pyreft"
ADAPTERS = ["loreft", "loreft_untied", "variants"]


def base_model():
    return transformers.AutoModelForCausalLM.from_pretrained(DATA / "base").eval()


def expected(name: str):
    meta = json.loads((DATA / name / "meta.json").read_text())
    return meta, load_file(DATA / name / "expected.safetensors")


def logits(rm, data):
    with torch.no_grad():
        return rm(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


@pytest.mark.parametrize("name", ADAPTERS)
def test_pyreft_adapter_gives_pyreft_logits(name):
    meta, data = expected(name)
    rm = load_pyreft(base_model(), DATA / name / "adapter", meta["positions"])
    rm.eval()
    with rm.disabled():  # the base model is the same under both transformers versions
        torch.testing.assert_close(logits(rm, data), data["base_logits"], rtol=0, atol=1e-5)
    edited = logits(rm, data)
    torch.testing.assert_close(edited, data["logits"], rtol=0, atol=1e-5)
    assert (data["logits"] - data["base_logits"]).abs().max() > 0.1  # the adapters do edit: the check has teeth


def test_layouts_and_interventions():
    rm = load_pyreft(base_model(), DATA / "loreft_untied" / "adapter", "f2+l2")  # the same site listed twice
    assert rm.site_positions() == {"layers.1.block_output": ("f2+l2", False)}
    prefix, suffix = rm["layers.1.block_output"]
    assert not torch.equal(prefix.W.weight, suffix.W.weight)
    rm.remove()
    rm = load_pyreft(base_model(), DATA / "variants" / "adapter", "l1")
    kinds = {site: type(iv).__name__ for site, iv in ((s, rm[s]) for s in rm.sites)}
    assert kinds == {
        "layers.0.mlp_output": "NoReFT",
        "layers.0.block_input": "DiReFT",  # pyreft's NodireftIntervention
        "layers.1.attention_output": "OrthDiReFT",  # pyreft's DireftIntervention
        "layers.1.mlp_input": "ConsReFT",
        "layers.1.block_output": "LoBiReFT",
    }
    R = rm["layers.1.attention_output"].R()
    torch.testing.assert_close(R @ R.T, torch.eye(2), rtol=0, atol=1e-6)


def test_cli_converts_and_the_adapter_loads(tmp_path, capsys):
    meta, data = expected("loreft")
    out = tmp_path / "converted"
    code = main(["convert-pyreft", str(DATA / "loreft" / "adapter"), str(out), "--model", str(DATA / "base"),
                 "--positions", meta["positions"]])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    rm = reft.IntervenableModel.from_pretrained(base_model(), out)
    torch.testing.assert_close(logits(rm, data), data["logits"], rtol=0, atol=1e-5)


def test_convert_writes_what_load_gives(tmp_path):
    meta, data = expected("variants")
    convert_pyreft(DATA / "variants" / "adapter", tmp_path / "a", base_model(), meta["positions"])
    rm = reft.IntervenableModel.from_pretrained(base_model(), tmp_path / "a")
    torch.testing.assert_close(logits(rm, data), data["logits"], rtol=0, atol=1e-5)


class _Payload:
    """An object whose unpickling would run code: calls `_ran` with a marker."""

    def __reduce__(self):
        return (_ran, ("pickled code ran",))


RAN: list[str] = []


def _ran(text):
    RAN.append(text)
    return torch.zeros(2, 32)


def copy_adapter(tmp_path: Path, name: str = "loreft") -> Path:
    folder = tmp_path / name
    shutil.copytree(DATA / name / "adapter", folder)
    return folder


def test_pickled_code_is_refused_never_run(tmp_path):
    folder = copy_adapter(tmp_path)
    target = next(folder.glob("intkey_*.bin"))
    state = torch.load(target, weights_only=True)
    torch.save({**state, "weight": _Payload()}, target)
    with pytest.raises(ValueError, match=r"refused: .*torch.load\(weights_only=True\) and never runs pickled code"):
        load_pyreft(base_model(), folder, "f1+l1")
    assert RAN == []


def test_bad_folders_give_clear_errors(tmp_path):
    model = base_model()
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_pyreft(model, tmp_path / "missing", "l1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json: missing; not a pyreft adapter folder"):
        load_pyreft(model, tmp_path / "empty", "l1")

    folder = copy_adapter(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intervention_types"][0] = "<class 'mylib.SteerIntervention'>"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"intervention \"<class 'mylib.SteerIntervention'>\" does not convert; supported: LoreftIntervention"):
        load_pyreft(model, folder, "f1+l1")

    folder = copy_adapter(tmp_path / "2")
    config = json.loads((folder / "config.json").read_text())
    config["representations"][0][1] = "head_query_output"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="component 'head_query_output' has no reft site; supported: block_input"):
        load_pyreft(model, folder, "f1+l1")

    folder = copy_adapter(tmp_path / "3", "loreft_untied")
    with pytest.raises(ValueError, match=r"repeat in a layout pyreft does not write.*positions given: 'l1'"):
        load_pyreft(model, folder, "l1")  # the same site twice needs a two-sided spec

    folder = copy_adapter(tmp_path / "4")
    next(folder.glob("intkey_*#0.bin")).unlink()
    with pytest.raises(FileNotFoundError, match="missing; the pyreft folder is incomplete"):
        load_pyreft(model, folder, "f1+l1")

    folder = copy_adapter(tmp_path / "5")
    torch.save({"classifier.weight": torch.zeros(2, 32)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin holds trained base-model parameters"):
        load_pyreft(model, folder, "f1+l1")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing attached on error


def test_cli_error_is_one_line(tmp_path, capsys):
    code = main(["convert-pyreft", str(tmp_path / "nope"), str(tmp_path / "out"), "--model", str(DATA / "base"), "--positions", "l1"])
    assert code == 2
    assert capsys.readouterr().err.startswith("reft convert-pyreft: error: no folder")
