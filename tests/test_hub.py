"""reft.hub: Hub repo ids resolve through the local cache offline, and push_to_hub uploads a loadable adapter.

Nothing here touches the network: the Hub cache is a folder laid out by hand as huggingface_hub
lays it out (`models--user--name/refs/<branch>`, `snapshots/<commit>/`), offline mode is forced on,
and `HfApi`'s upload calls are replaced by fakes that record what would be sent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

import reft
from reft import hub

from .tiny import causal_lm

MAIN = "a" * 40  # commit hashes of the fake snapshots
V2 = "b" * 40
IDS = torch.tensor([[5, 9, 13, 21, 7]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path, offline mode on (read at call time by huggingface_hub)."""
    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folder


def put_in_cache(cache: Path, repo_id: str, files: Path, commit: str, ref: str | None = "main") -> Path:
    """Copy the folder `files` into the cache as snapshot `commit` of `repo_id`, with `refs/<ref>` naming it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def trained_adapter(folder: Path, seed: int) -> reft.IntervenableModel:
    torch.manual_seed(seed)
    rm = reft.IntervenableModel(causal_lm(), {"layers.1.block_output": reft.LoReFT(32, rank=4)}, positions="f1+l1")
    with torch.no_grad():
        for p in rm.trainable_parameters():
            p.add_(torch.randn_like(p))
    rm.eval()
    rm.save_pretrained(folder)
    return rm


def test_repo_in_cache_loads_offline(cache, tmp_path):
    saved = trained_adapter(tmp_path / "v1", seed=1)
    trained_adapter(tmp_path / "v2", seed=2)
    main = put_in_cache(cache, "someone/pirate", tmp_path / "v1", MAIN)
    v2 = put_in_cache(cache, "someone/pirate", tmp_path / "v2", V2, ref="v2")
    assert hub.resolve("someone/pirate") == main
    assert hub.resolve("someone/pirate", revision="v2") == v2
    assert hub.resolve("someone/pirate", revision=V2) == v2  # a commit hash needs no ref
    saved_logits = saved(input_ids=IDS).logits
    saved.remove()
    loaded = reft.IntervenableModel.from_pretrained(causal_lm(), hub.resolve("someone/pirate"))
    assert torch.equal(loaded(input_ids=IDS).logits, saved_logits)


def test_cache_dir_argument(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    trained_adapter(tmp_path / "adapter", seed=0)
    snapshot = put_in_cache(tmp_path / "elsewhere", "someone/pirate", tmp_path / "adapter", MAIN)
    assert hub.resolve("someone/pirate", cache_dir=tmp_path / "elsewhere") == snapshot


def test_named_adapter_in_a_repo_folder(cache, tmp_path):
    rm = reft.IntervenableModel(causal_lm(), {"layers.0.block_output": reft.LoReFT(32, rank=2)}, positions="l1")
    rm.add_adapter("pirate", reft.ReftConfig({"layers.1.mlp_output": "red"}))
    rm.save_pretrained(tmp_path / "both")
    snapshot = put_in_cache(cache, "someone/adapters", tmp_path / "both", MAIN)
    assert hub.resolve("someone/adapters/pirate") == snapshot / "pirate"
    with pytest.raises(FileNotFoundError, match=r"no folder 'sailor' \(its folders: pirate\)"):
        hub.resolve("someone/adapters/sailor")


def test_local_folder_wins(cache, tmp_path, monkeypatch):
    trained_adapter(tmp_path / "someone" / "pirate", seed=0)
    put_in_cache(cache, "someone/pirate", tmp_path / "someone" / "pirate", MAIN)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("someone/pirate") == Path("someone/pirate")
    with pytest.raises(ValueError, match="is a local folder; revisions name Hub repos"):
        hub.resolve("someone/pirate", revision="v2")


def test_missing_repo_offline_names_repo_and_offline_mode(cache):
    with pytest.raises(FileNotFoundError) as err:
        hub.resolve("someone/not-there")
    message = str(err.value)
    assert "'someone/not-there'" in message and "HF_HUB_OFFLINE=1" in message and str(cache) in message
    with pytest.raises(FileNotFoundError, match=r"'someone/not-there' at revision 'v9' is not in the local cache"):
        hub.resolve("someone/not-there", revision="v9")


def test_a_path_that_is_no_repo_id_is_left_to_the_reader(cache, tmp_path):
    for path in ("./runs/missing", "/no/such/folder", "a/b/../c", "bad name/x"):
        assert hub.resolve(path) == Path(path)
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere.*adapter_config.json"):
        reft.IntervenableModel.from_pretrained(causal_lm(), hub.resolve(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="got int"):
        hub.resolve(3)


class FakeApi:
    """Records create_repo and upload_folder calls (with the files uploaded) instead of sending them."""

    calls: list = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        FakeApi.calls.append(("upload_folder", repo_id, files, commit_message, revision))
        return "commit-info"


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


def test_push_to_hub_uploads_adapter_and_card(cache, fake_api, tmp_path):
    model = causal_lm()
    model.config._name_or_path = "someone/tiny-llama"
    torch.manual_seed(0)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": reft.LoReFT(32, rank=4)}, positions="f1+l1")
    assert hub.push_to_hub(rm, "me/pirate", private=True) == "commit-info"
    (create, repo, private, exist_ok), upload = fake_api.calls
    assert (create, repo, private, exist_ok) == ("create_repo", "me/pirate", True, True)
    _, repo, files, message, revision = upload
    assert repo == "me/pirate" and revision is None and message
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: reft\n") and "base_model: someone/tiny-llama\n" in card
    line = next(line for line in card.splitlines() if line.startswith("| `layers.1.block_output` |"))
    assert "| loreft(rank=4, dropout=0.0, act=None, dtype=float32" in line and line.endswith("| `f1+l1` | 260 |")
    assert "260 parameters" in card  # 2 * 4 * 32 + 4, by hand
    assert "transformers.LlamaForCausalLM.from_pretrained(\"someone/tiny-llama\")" in card
    assert 'reft.IntervenableModel.from_pretrained(model, "me/pirate")' in card

    # What was uploaded, once in the cache, loads offline into the same model.
    uploaded = tmp_path / "uploaded"
    for name, data in files.items():
        (uploaded / name).parent.mkdir(parents=True, exist_ok=True)
        (uploaded / name).write_bytes(data)
    put_in_cache(cache, "me/pirate", uploaded, MAIN)
    rm.eval()
    expected = rm(input_ids=IDS).logits
    rm.remove()
    loaded = reft.IntervenableModel.from_pretrained(causal_lm(), hub.resolve("me/pirate"))
    assert torch.equal(loaded(input_ids=IDS).logits, expected)


def test_card_of_several_adapters_and_a_local_base(cache, fake_api, tmp_path):
    model = causal_lm()
    model.config._name_or_path = str(tmp_path)  # a local folder is no Hub id: no base_model in the card
    rm = reft.IntervenableModel(model, {"layers.0.mlp_output": reft.RED(32)}, adapter_name="red", head=None)
    rm.add_adapter("steer", reft.ReftConfig({"layers.1.block_output": {"name": "direft", "rank": 2}}, positions="l1"))
    hub.push_to_hub(rm, "me/two")
    files = fake_api.calls[1][2]
    assert sorted(files) == ["README.md", "red/adapter_config.json", "red/adapter_model.safetensors",
                             "steer/adapter_config.json", "steer/adapter_model.safetensors"]
    card = files["README.md"].decode()
    assert "base_model:" not in card and "a `LlamaForCausalLM`" in card
    assert "### Adapter `red` (the folder `red/`): 64 parameters" in card  # RED: scale and bias, 2 * 32
    assert "### Adapter `steer` (the folder `steer/`): 130 parameters" in card  # W1, b, W2: 2 * 2 * 32 + 2
    assert 'reft.IntervenableModel.from_pretrained(model, "me/two/red", adapter_name="red")' in card
    assert 'rm.load_adapter("me/two/steer", "steer")' in card
