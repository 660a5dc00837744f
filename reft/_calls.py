"""`IntervenableModel`'s calls: the hooks, `forward`, `generate`, and the context a call gives them.

`CallsMixin` is one part of `reft.model.IntervenableModel` (whose `__init__` sets the state it uses:
`model`, `_hooks`, `_call`, `_active`, `_hooks_live`, `_checkpointable`, `_checkpoint_layers`). A
hook edits only inside a call of the wrapper: `_calling` sets the `Call` (masks, positions, routing)
that the hooks read, and `reft._edit` says how they edit a module's hidden states.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ._device import first_device
from ._edit import MODES, Call, Generation, Unit, edit
from ._errors import short
from .sites import Site


@dataclass(eq=False)
class Hook:
    """The hook on one module (input or output), with every adapter's units there."""

    site: Site
    handle: torch.utils.hooks.RemovableHandle
    units: list[Unit]


class CallsMixin:
    """The hooks on the edited modules and the calls that activate them: `forward`, `generate`, `disabled`."""

    def _hook_for(self, site: Site) -> Hook:
        key = (id(site.module), site.edits_input)
        if key in self._hooks:
            return self._hooks[key]
        units: list[Unit] = []

        def run(h: torch.Tensor) -> torch.Tensor:
            call = self._call
            if call is None or not self._active:  # outside our own call: the module runs unedited
                return h
            return edit(units, h, call)

        if site.edits_input:

            def pre_hook(module, args, kwargs):
                if args:
                    return (run(args[0]), *args[1:]), kwargs
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                return args, {**kwargs, key: run(kwargs[key])}

            handle = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def hook(module, args, output):
                if isinstance(output, torch.Tensor):
                    return run(output)
                if isinstance(output, tuple):
                    return (run(output[0]), *output[1:])
                key = next(iter(output.keys()))  # a ModelOutput: its first field is the hidden states
                output[key] = run(output[key])
                return output

            handle = site.module.register_forward_hook(hook)
        self._hooks[key] = Hook(site, handle, units)
        return self._hooks[key]

    # ================================================================= calls
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with the interventions; returns the base model's own output.

        `input_ids`, `attention_mask`, `labels` and any other keyword go to the base model (which
        computes its own loss from `labels`). `prompt_mask` `[B, T]` (1 on prompt tokens) makes
        position specs count prompt tokens only; `positions` `[B, P]` (-1 = none) gives explicit
        positions for every site; `adapter_names` (one name or None per example) routes each example
        through its own adapter. Under `torch.compile`, pass `rm.adapter_index(names)` instead of the
        names: a tensor is data to the compiled graph, whereas each new list of names recompiles it.
        """
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        kwargs = {**{k: v for k, v in named.items() if v is not None}, **kwargs}
        with self._calling(args, kwargs, positions=positions, prompt_mask=prompt_mask, adapter_names=adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, mode: str = "prompt", adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """Hugging Face `generate` on the base model with the interventions.

        Args:
            *args, **kwargs: `model.generate`'s own arguments: the tokenized prompt (`input_ids` `[B, P]`,
                left-padded, and its `attention_mask`; without one every token counts as real), then
                `max_new_tokens`, `do_sample`, `num_beams`, `use_cache`, ...
            mode: `"prompt"` (default): position specs are resolved on the prompt's attention mask and
                the prompt is edited in the prefill pass only; the KV cache carries the edit into
                decoding, and decode steps run no intervention code. `"every_token"`: in addition,
                sites whose spec reaches generated tokens (`"all"`, or a spec with a last part `"l{n}"`)
                edit each generated token (with the suffix intervention of an untied site).
            adapter_names: one adapter name (or None) per prompt: each row is generated with its own.

        Returns:
            What `model.generate` returns (a `[B * num_return_sequences, P + new]` tensor, or its output
            object with `return_dict_in_generate=True`).

        With `use_cache=False` the whole sequence is recomputed at every step, and each pass edits the
        same positions, so the tokens match those generated with the cache. Encoder-decoder models:
        encoder sites edit the encoder input by their spec; decoder sites edit every decoder token in
        mode "every_token" (if their spec reaches generated tokens) and nothing in mode "prompt".

        Example:
            >>> batch = tokenizer(["Hi", "What is ReFT?"], return_tensors="pt", padding=True)  # padding_side="left"
            >>> out = rm.generate(**batch, max_new_tokens=32, do_sample=False)
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(map(repr, MODES))}")
        for key in ("positions", "prompt_mask"):
            if key in kwargs:
                raise ValueError(f"generate takes no {key}=: the prompt positions come from the attention_mask")
        given = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None)
        inputs = next((x for x in given if x is not None), None)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"generate needs input_ids [batch, prompt_length] (or inputs_embeds), got {got}")
        B, P = inputs.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = kwargs["attention_mask"] = torch.ones(B, P, dtype=torch.long, device=inputs.device)
        if mask.shape != (B, P):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the prompt is [batch, seq] = ({B}, {P})")
        decoder_prompt = 0 if getattr(self.model.config, "is_encoder_decoder", False) else P
        state = Generation(mode=mode, prompt_length=decoder_prompt)
        with self._calling((), {"attention_mask": mask, "input_ids": inputs}, generation=state, adapter_names=adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def _calling(
        self,
        args: tuple = (),
        kwargs: Mapping[str, Any] | None = None,
        positions: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        generation: Generation | None = None,
        adapter_names: Sequence[str | None] | None = None,
    ) -> Iterator[Call]:
        """Context in which base-model calls with these inputs see their masks, positions and routing."""
        kwargs = kwargs or {}
        device = first_device(self.model)
        shape = _input_shape(args, kwargs)
        if shape is not None and 0 in shape:
            raise ValueError(
                f"the inputs have [batch, seq] = {tuple(shape)}: an empty batch or sequence has nothing to edit; "
                "give at least one example of at least one token"
            )
        main = prompt_mask if prompt_mask is not None else kwargs.get("attention_mask")
        for name, m in (("attention_mask", kwargs.get("attention_mask")), ("prompt_mask", prompt_mask)):
            if isinstance(m, torch.Tensor) and shape is not None and (m.dim() != 2 or tuple(m.shape) != shape):
                raise ValueError(f"{name} has shape {tuple(m.shape)}, but the inputs are [batch, seq] = {shape}")

        def as_mask(m: torch.Tensor | None) -> torch.Tensor | None:
            return m.to(device).bool() if m is not None else None

        masks = {"": as_mask(main), "encoder": as_mask(main), "decoder": as_mask(kwargs.get("decoder_attention_mask"))}
        if positions is not None:
            positions = _check_positions(positions, shape).to(device)
        adapters, route = self._routing(adapter_names, shape, device)
        previous = self._call
        self._call = Call(adapters, masks, positions=positions, shape=shape, route=route, generation=generation)
        if self._hooks_live:
            self._wrap_checkpointing()
        try:
            yield self._call
        finally:
            self._call = previous

    def _routing(self, adapter_names, shape, device) -> tuple[tuple[str, ...], torch.Tensor | None]:
        """`(adapters, route)`: the active adapters and no route, or the named ones and each row's index.

        A tensor (`rm.adapter_index(names)`) routes over all adapters, in `rm.adapter_names` order.
        """
        if adapter_names is None:
            return tuple(self._active_adapters), None
        if isinstance(adapter_names, torch.Tensor):
            return tuple(self.adapters), _check_route(adapter_names, shape, len(self.adapters)).to(device)
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ValueError(f"adapter_names must be a list with one adapter name (or None) per example, got {short(adapter_names)}")
        if shape is not None and len(adapter_names) != shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names, but the batch has {shape[0]} examples")
        names: list[str] = []
        for name in adapter_names:
            if name is not None and name not in names:
                self._check_known(name)
                names.append(name)
        route = [names.index(n) if n is not None else -1 for n in adapter_names]
        return tuple(names), torch.tensor(route, dtype=torch.long, device=device)

    def _step(self, args: tuple, kwargs: dict) -> None:
        """Top-level pre-hook: during `generate`, record which columns this forward pass covers.

        `start` is the KV cache length: from the 2-D attention mask, which spans the cached and the
        new columns (`generate` drops it when it is all ones), else from the cache. Shapes only.
        """
        call = self._call
        if call is None or call.generation is None:
            return None
        generation = call.generation
        x = kwargs.get("input_ids")
        if x is None:
            x = next((kwargs.get(k) for k in _INPUT_KEYS if kwargs.get(k) is not None), args[0] if args else None)
        if not isinstance(x, torch.Tensor):
            generation.shape, generation.start = None, 0
            return None
        generation.shape = (x.shape[0], x.shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or kwargs.get("use_cache") is False:
            generation.start = 0
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and "decoder_input_ids" not in kwargs:
            generation.start = mask.shape[1] - x.shape[1]
        else:
            generation.start = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        return None

    def _wrap_checkpointing(self) -> None:
        """Make gradient checkpointing's recompute (in the backward, outside this call) see this call.

        Transformers' checkpointed layers call `layer._gradient_checkpointing_func(fn, *args)`; ours
        wraps `fn` so that, when the backward pass runs it again, the hooks see the same call
        (masks, positions, routing) as in the forward pass. Reentrant or not, the recompute then
        edits exactly as the forward did.
        """
        for module in self._checkpointable:
            func = module.__dict__.get("_gradient_checkpointing_func")
            if func is None or getattr(func, "_reft_wrapped", False):
                continue
            module._gradient_checkpointing_func = self._checkpointing(func)
            self._checkpoint_layers.append(module)

    def _checkpointing(self, original):
        wrapper = self

        def checkpoint(function, *args, **kwargs):
            call = wrapper._call

            def run(*a, **k):
                previous, wrapper._call = wrapper._call, call
                try:
                    return function(*a, **k)
                finally:
                    wrapper._call = previous

            return original(run, *args, **kwargs)

        checkpoint._reft_wrapped = True
        checkpoint._reft_original = original
        return checkpoint

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model without interventions inside this block: `with rm.disabled(): rm(**b)`."""
        previous, self._active = self._active, False
        try:
            yield
        finally:
            self._active = previous


_INPUT_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")  # decoder first


def _input_shape(args: tuple, kwargs: Mapping[str, Any]) -> tuple[int, int] | None:
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return x.shape[0], x.shape[1]
    return None


def _check_route(route: torch.Tensor, shape: tuple[int, int] | None, count: int) -> torch.Tensor:
    """`adapter_names` as a tensor: `[B]` integer indices into the adapters (-1 = none)."""
    if route.dim() != 1 or route.is_floating_point() or route.is_complex() or route.dtype == torch.bool:
        raise ValueError(
            f"adapter_names as a tensor must be [batch] integer indices into rm.adapter_names (-1 = none), as "
            f"rm.adapter_index(names) makes; got {tuple(route.shape)} {route.dtype}"
        )
    if shape is not None and route.shape[0] != shape[0]:
        raise ValueError(f"adapter_names has {route.shape[0]} entries, but the batch has {shape[0]} examples")
    _check_range(
        route, count, "adapter index out of range (valid: -1 for none, or below the number of adapters)",
        lambda value: f"adapter index {value} is out of range: valid are -1 (none) and 0..{count - 1} (rm.adapter_names)",
    )
    return route.long()


def _check_positions(positions: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    if (
        not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.is_floating_point()
        or positions.is_complex() or positions.dtype in (torch.bool, torch.uint8)
    ):
        got = f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(
            f"positions must be an integer tensor [batch, P] of token indices (-1 = none), got {got}; "
            "a bool or uint8 tensor is a mask, not positions: use a position spec, or the indices of its True entries"
        )
    if shape is not None:
        B, T = shape
        if positions.shape[0] != B:
            raise ValueError(f"positions has batch size {positions.shape[0]}, but the inputs have {B}")
        _check_range(  # one check per call, on explicit positions only
            positions, T, "positions out of range: each must be -1 (none) or a token index below the sequence length",
            lambda value: f"position {value} is out of range for sequence length {T} (valid: 0..{T - 1}, or -1 for none)",
        )
    return positions.long()


def _check_range(values: torch.Tensor, end: int, compiled_message: str, error: Callable[[int], str]) -> None:
    """Every entry of `values` in -1..end-1 (-1: none), else a ValueError `error(first bad value)`.
    Compiled, the check runs on the device (no host sync in the graph) and fails with `compiled_message`."""
    if torch.compiler.is_compiling():
        torch._assert_async(((values >= -1) & (values < end)).all(), compiled_message)
        return
    bad = (values < -1) | (values >= end)
    if bad.any():
        raise ValueError(error(values[bad][0].item()))
