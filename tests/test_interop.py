"""reft among the tools users already have: transformers' Trainer and pipeline, peft."""

import os

import pytest
import torch
import transformers

import reft
from reft.data import Collator, build_generation_data

from . import tiny, tiny_text

peft = pytest.importorskip("peft")


def _pairs(n):
    return [(tiny_text.words(5 + i), tiny_text.words(20, 21, 22)) for i in range(n)]


def _rm(seed=0, strong=False, positions="l1"):
    model = tiny.causal_lm(initializer_range=0.2 if positions == "all" else 0.3)
    torch.manual_seed(seed)
    rm = reft.IntervenableModel(model, {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions=positions)
    if strong:
        with torch.no_grad():
            for p in rm.trainable_parameters():
                p.add_(torch.randn_like(p))
    return rm


def test_transformers_trainer_with_default_arguments_trains_evaluates_predicts_and_saves_the_adapter(tmp_path):
    tok = tiny_text.tokenizer()
    rm = _rm(positions="all")
    base = {k: v.clone() for k, v in rm.model.state_dict().items()}
    data = build_generation_data(tok, _pairs(16))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=10, per_device_train_batch_size=8, learning_rate=1e-2,
        save_steps=8, report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=rm, args=args, train_dataset=data, eval_dataset=data, data_collator=Collator(tok))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.7 * before, (before, after)

    ours = reft.Trainer(rm, reft.TrainConfig(batch_size=8), train_data=data).evaluate(data)["eval_loss"]
    assert ours == pytest.approx(after, rel=1e-5)  # the same loss as reft's own evaluation (HF's mean per token)
    predicted = trainer.predict(data)
    assert predicted.predictions.shape == (16, max(data.lengths()), tiny.VOCAB)

    checkpoint = tmp_path / "checkpoint-8"
    weights = checkpoint / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 10_000  # the adapter's tensors, not the base model
    from safetensors.torch import load_file

    saved = load_file(weights)
    assert set(saved) == {n for n, p in rm.named_parameters() if p.requires_grad}
    assert all(torch.equal(base[k], v) for k, v in rm.model.state_dict().items())  # the base never changed

    trainer.save_model(str(tmp_path / "final"))
    fresh = _rm(seed=1, positions="all")
    fresh.load_state_dict(load_file(tmp_path / "final" / "model.safetensors"))
    ids, mask = tiny.padded_batch([5, 3], side="left")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, rm(input_ids=ids, attention_mask=mask).logits)
    trainer2 = transformers.Trainer(model=_rm(seed=2, positions="all"), args=args, train_dataset=data, data_collator=Collator(tok))
    trainer2.train(resume_from_checkpoint=str(checkpoint))  # resumes from the adapter-only checkpoint


def test_save_adapter_callback_writes_a_loadable_adapter_folder_at_each_checkpoint(tmp_path):
    from reft.callbacks import SaveAdapterCallback

    tok = tiny_text.tokenizer()
    rm = _rm(positions="all")
    data = build_generation_data(tok, _pairs(16))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=rm, args=args, train_dataset=data, data_collator=Collator(tok),
                                   callbacks=[SaveAdapterCallback()])
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    loaded = reft.IntervenableModel.from_pretrained(tiny.causal_lm(initializer_range=0.2), tmp_path / "checkpoint-4" / "adapter")
    ids, mask = tiny.padded_batch([5, 3], side="left")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, rm(input_ids=ids, attention_mask=mask).logits)
        with rm.disabled():
            plain = rm(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, plain)  # the trained edit, not nothing

    with pytest.raises(ValueError, match=r"one plain folder name .* got '\.\./x'"):
        SaveAdapterCallback("../x")
    state = transformers.TrainerState(global_step=1)
    with pytest.raises(TypeError, match="the Trainer's model is a LlamaForCausalLM"):
        SaveAdapterCallback().on_save(args, state, transformers.TrainerControl(), model=tiny.causal_lm())
    assert repr(SaveAdapterCallback()) == "SaveAdapterCallback(folder='adapter')"


def test_pipeline_generates_what_rm_generate_does():
    tok = tiny_text.tokenizer(padding_side="left")
    rm = _rm(strong=True)
    pipe = transformers.pipeline("text-generation", model=rm, tokenizer=tok)
    prompts = [tiny_text.words(5, 6, 7), tiny_text.words(8, 9)]
    out = pipe(prompts, max_new_tokens=5, do_sample=False, return_full_text=False)
    for prompt, result in zip(prompts, out):
        batch = tok([prompt], return_tensors="pt")
        with torch.no_grad():
            tokens = rm.generate(**batch, max_new_tokens=5, do_sample=False)
            with rm.disabled():
                plain = rm.generate(**batch, max_new_tokens=5, do_sample=False)
        new = tokens[0, batch["input_ids"].shape[1] :]
        assert result[0]["generated_text"] == tok.decode(new, skip_special_tokens=True)
        assert not torch.equal(tokens, plain)  # the adapter changed the generation


def _lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def test_peft_lora_trains_with_the_interventions_and_adapters_load_with_or_without_lora(tmp_path):
    tok = tiny_text.tokenizer()
    model = tiny.causal_lm(initializer_range=0.2)
    lora = _lora(model)
    lora_params = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert len(lora_params) == 8
    torch.manual_seed(0)
    rm = reft.IntervenableModel(lora, {"layers.1.block_output": reft.LoReFT(tiny.HIDDEN, 4)}, positions="l1")
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert {f"model.{n}" for n in lora_params} <= trainable and len(trainable) == 8 + 3
    lora_b = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_B" in n}
    trainer = reft.Trainer(rm, reft.TrainConfig(max_steps=5, batch_size=8, lr=1e-2), build_generation_data(tok, _pairs(16)))
    assert {id(p) for p in trainer.params} == {id(p) for p in rm.trainable_parameters()}
    trainer.fit()
    assert all(not torch.equal(lora_b[n], p) for n, p in lora.named_parameters() if "lora_B" in n)  # LoRA trained

    rm.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "peft" / "adapter_model.safetensors").is_file()  # peft saves LoRA beside ours
    ids, mask = tiny.padded_batch([5, 3], side="left")
    with torch.no_grad():
        expected = rm(input_ids=ids, attention_mask=mask).logits
    rm.remove()

    # on the plain base (without LoRA) the same adapter loads
    plain = reft.IntervenableModel.from_pretrained(tiny.causal_lm(initializer_range=0.2), tmp_path / "a")
    assert plain["layers.1.block_output"].W.weight.shape == (4, tiny.HIDDEN)
    # and with LoRA reloaded by peft, the outputs are the trained ones
    again = peft.PeftModel.from_pretrained(tiny.causal_lm(initializer_range=0.2), str(tmp_path / "a" / "peft"))
    loaded = reft.IntervenableModel.from_pretrained(again, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)


def test_a_plain_adapter_loads_on_a_lora_model(tmp_path):
    rm = _rm(strong=True)
    rm.save_pretrained(tmp_path / "a")
    rm.remove()
    lora = _lora(tiny.causal_lm(initializer_range=0.3))
    loaded = reft.IntervenableModel.from_pretrained(lora, tmp_path / "a")
    assert loaded.sites == ["layers.1.block_output"]
    assert os.path.isfile(tmp_path / "a" / "adapter_config.json")
