"""`SaveAdapterCallback`: transformers' `Trainer` writes each checkpoint's adapters in reft's format.

`transformers.Trainer` saves a model that is not a `PreTrainedModel` as its `state_dict()` in
`model.safetensors`. For an `IntervenableModel` that is only what training changes (the adapters'
tensors, a head's, a peft model's LoRA weights): a few KB, enough for `resume_from_checkpoint`, but
not a folder `IntervenableModel.from_pretrained` reads. With this callback each checkpoint also holds
`rm.save_pretrained(<checkpoint>/adapter)`: config, fingerprint of the base model, tensors, one
folder per named adapter.

    from reft.callbacks import SaveAdapterCallback
    trainer = transformers.Trainer(model=rm, args=args, ..., callbacks=[SaveAdapterCallback()])

Not imported by `import reft`: it imports `transformers.trainer_callback`, which takes seconds.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .model import IntervenableModel


class SaveAdapterCallback(TrainerCallback):
    """At every checkpoint of `transformers.Trainer`, `rm.save_pretrained(<checkpoint>/<folder>)`.

    Args:
        folder: the adapter folder's name inside each `checkpoint-<step>` folder (one plain name).
    """

    def __init__(self, folder: str = "adapter"):
        if not isinstance(folder, str) or folder in ("", ".", "..") or "/" in folder or "\\" in folder:
            raise ValueError(f"folder must be one plain folder name (no '/', not '.' or '..'), got {folder!r}")
        self.folder = folder

    def __repr__(self) -> str:
        return f"SaveAdapterCallback(folder={self.folder!r})"

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if not isinstance(model, IntervenableModel):
            raise TypeError(
                f"SaveAdapterCallback saves an IntervenableModel's adapters, but the Trainer's model is a "
                f"{type(model).__name__}; pass the IntervenableModel itself as Trainer(model=rm)"
            )
        model.save_pretrained(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / self.folder)
