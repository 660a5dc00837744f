"""Adapters on the Hugging Face Hub: a repo id wherever a folder is accepted, and `push_to_hub`.

`resolve` turns what a user passes to `from_pretrained` / `load_adapter` into a local folder: an
existing folder wins; otherwise the text is a Hub repo id, fetched with
`huggingface_hub.snapshot_download` (its cache, `HF_HUB_CACHE`, and `revision` are honoured; under
`HF_HUB_OFFLINE=1` a repo already in the cache loads without the network). `push_to_hub` saves an
adapter with `save_pretrained` beside a generated model card (README.md) and uploads the folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"


def resolve(path_or_repo_id: str | os.PathLike, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
            token: str | bool | None = None) -> Path:
    """The local folder of an adapter: `path_or_repo_id` itself when it exists, else a Hub snapshot.

    Args:
        path_or_repo_id: a folder, a Hub repo id (`"user/adapter"`), or a folder inside a repo
            (`"user/adapters/pirate"`: a named adapter saved by `save_pretrained` in `pirate/`).
        revision: a branch, tag or commit of the repo (default: `main`); not allowed with a folder.
        cache_dir: the Hub cache (default: `HF_HUB_CACHE`, `~/.cache/huggingface/hub`).
        token: passed to `huggingface_hub` for private repos.

    A missing path that cannot be a repo id (`./runs/x`, `/abs/path`) is returned as it is, for the
    caller's reader to report.

    Raises:
        FileNotFoundError: no such folder and no such repo, or (offline) the repo is not in the cache.
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"an adapter is a folder or a Hub repo id (str), got {type(path_or_repo_id).__name__}")
    text = os.fspath(path_or_repo_id)
    if Path(text).expanduser().exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given, but {text!r} is a local folder; revisions name Hub repos")
        return Path(text).expanduser()
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        validate_repo_id,
    )

    parts = text.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        validate_repo_id(repo_id)
        if text.startswith(("/", ".", "~")) or any(p in ("", ".", "..") for p in parts):
            raise HFValidationError(text)
    except HFValidationError:  # a path, not a repo id: the caller's reader says what is missing there
        return Path(text).expanduser()
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    at = f" at revision {revision!r}" if revision else ""
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"no folder {text!r}; as a Hub repo, {repo_id!r}{at} is not in the local cache ({cache}) and HF_HUB_OFFLINE=1 "
                "forbids downloading it: download it once online (unset HF_HUB_OFFLINE), or pass the adapter's folder"
            ) from None
        raise FileNotFoundError(f"no folder {text!r}; the Hub repo {repo_id!r}{at} could not be fetched and is not cached ({e})") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hub repo {repo_id!r} has no revision {revision!r}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(
            f"no folder {text!r}, and no Hub repo {repo_id!r} that this token can read ({type(e).__name__}); "
            "check the name, or log in (`hf auth login`) for a private repo"
        ) from None
    folder = snapshot / subfolder if subfolder else snapshot
    if not folder.is_dir():
        present = ", ".join(sorted(p.name for p in snapshot.iterdir() if p.is_dir())) or "none"
        raise FileNotFoundError(f"the Hub repo {repo_id!r}{at} has no folder {subfolder!r} (its folders: {present})")
    return folder


def push_to_hub(rm, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, commit_message: str = "Upload reft adapter",
                base_model: str | None = None) -> Any:
    """Upload `rm`'s adapters (the `save_pretrained` folder) and a model card to Hub repo `repo_id`.

    The repo is created when missing (`private` as given). `base_model` (a Hub id) names the base in
    the card; by default the base model's `name_or_path` when it looks like a Hub id. Returns
    `huggingface_hub`'s commit info of the upload.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="reft-push-") as tmp:
        folder = Path(tmp) / "adapter"
        rm.save_pretrained(folder)
        (folder / CARD_NAME).write_text(model_card(rm, repo_id, base_model=base_model), encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision)


def model_card(rm, repo_id: str, base_model: str | None = None) -> str:
    """The README.md of an adapter repo: base model, each adapter's sites and positions, parameters, loading code."""
    architecture = type(rm.model).__name__
    base = base_model or _hub_id(getattr(rm.model.config, "_name_or_path", None))
    head = ["---", "library_name: reft", "tags:", "- reft", "- representation-finetuning"]
    if base:
        head.append(f"base_model: {base}")
    head.append("---")
    total = 0
    sections = []
    for name, config in rm.reft_config.items():
        ivs = rm.interventions_of(name)
        count = sum(p.numel() for site_ivs in ivs.values() for iv in site_ivs for p in iv.parameters())
        count += sum(p.numel() for path in config.head for p in rm.model.get_submodule(path).parameters())
        total += count
        where = "the repo's root" if name == "default" else f"the folder `{name}/`"
        rows = [
            f"| `{site}` | {' + '.join(_describe(iv) for iv in ivs[site])} | `{config.positions[site]}` | "
            f"{sum(p.numel() for iv in ivs[site] for p in iv.parameters()):,} |"
            for site in config.sites
        ]
        lines = [f"### Adapter `{name}` ({where}): {count:,} parameters", "",
                 "| site | intervention | positions | parameters |", "| --- | --- | --- | --- |", *rows]
        extras = []
        if not config.tied:
            extras.append("untied: separate interventions for the first and last positions")
        if config.head:
            extras.append(f"trained head: {', '.join(f'`{h}`' for h in config.head)}")
        if config.max_norm is not None:
            extras.append(f"edit norm capped at {config.max_norm:g}")
        if extras:
            lines += ["", "; ".join(extras) + "."]
        sections.append("\n".join(lines))
    base_line = f"[`{base}`](https://huggingface.co/{base})" if base else f"a `{architecture}`"
    load_base = f'"{base}"' if base else '"<base model id or folder>"'
    names = list(rm.reft_config)
    first = "default" if "default" in names else names[0]
    load = [f'rm = reft.IntervenableModel.from_pretrained(model, "{_in_repo(repo_id, first)}"'
            + ("" if first == "default" else f', adapter_name="{first}"') + ")"]
    load += [f'rm.load_adapter("{_in_repo(repo_id, n)}", "{n}")' for n in names if n != first]
    body = f"""# {repo_id.split("/")[-1]}

A `reft` representation-finetuning adapter for {base_line} ({architecture}): small
interventions that edit the frozen model's hidden states at the sites and positions below.
{total:,} trainable parameters in all.

{(chr(10) * 2).join(sections)}

## Use it

```python
import transformers
import reft

model = transformers.{architecture}.from_pretrained({load_base})
{chr(10).join(load)}
```

Positions count real tokens of the attention mask; for generation, left-pad the prompts and call
`rm.generate(**batch, max_new_tokens=...)`.
"""
    return "\n".join(head) + "\n\n" + body


def _in_repo(repo_id: str, name: str) -> str:
    return repo_id if name == "default" else f"{repo_id}/{name}"


def _describe(iv) -> str:
    args = ", ".join(f"{k}={v}" for k, v in iv.config.items() if k != "hidden_size")
    return f"{iv.name or type(iv).__name__}({args})"


def _hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id and is no local path, else None."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name
