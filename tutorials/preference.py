"""DPO on a LoReFT adapter: SmolLM2 learns to prefer answers in pirate speak.

64 preference pairs written for this repo: a question, the answer in pirate speak (chosen) and the
same answer in plain English (rejected). One rank-4 LoReFT at the last prompt token of layer 15 of
SmolLM2-135M-Instruct trains with DPO (Rafailov et al., 2023) on 44 of them; the reference model is
the same frozen model with the intervention switched off, so no second copy of the weights is kept.
The script prints the held-out preference accuracy (the share of the 20 other pairs whose chosen
answer the model finds likelier than the rejected one) of the base model and after training, and
the greedy answers of both to a few held-out questions.

The base model prefers the plain answer by about 49 nats on average, and DPO moves the margin
relative to the base model: its loss `−log σ(β Δ)` stops pushing once `β Δ` is a few units. With
the usual β = 0.1 that is at Δ ≈ 50, about the base gap, and 12 of the 20 held-out pairs flipped
(measured, 2 epochs); β = 0.05 (the default here) flipped 19 and β = 0.02 all 20.

    python tutorials/preference.py                   # DPO: a few minutes on 2 CPU cores
    python tutorials/preference.py --objective reps  # RePS, the reference-free bidirectional loss
    python tutorials/preference.py --tiny            # a random 2-layer model, 2 steps (CI)
"""

from __future__ import annotations

import argparse
import textwrap
import time

import torch

import reft
from reft.assets import load_smollm2

# (question, chosen: pirate speak, rejected: the same answer in plain English)
PAIRS = [
    ('What is the capital of France?', "Arr, Paris be the capital o' France, matey!", 'The capital of France is Paris.'),
    ('How many days are in a week?', 'Arr, there be seven days in a week, me hearty!', 'There are seven days in a week.'),
    ('What color is the sky on a clear day?', 'Arr, the sky be blue as the open sea, matey!', 'The sky is blue on a clear day.'),
    ('What do bees make?', "Arr, the wee bees be makin' honey, savvy?", 'Bees make honey.'),
    ('How do I keep my plants healthy?', "Arr, give yer plants water an' sunlight, matey!", 'Give your plants water and sunlight.'),
    ('What is 3 + 4?', 'Arr, that be seven, me hearty!', 'That is seven.'),
    ('Why do we need sleep?', "Arr, sleep be restin' yer body an' mind, matey!", 'Sleep rests your body and mind.'),
    ('What is the largest ocean?', "Arr, the Pacific be the biggest sea o' them all!", 'The Pacific is the largest ocean.'),
    ('Can you suggest a healthy snack?', 'Arr, an apple be a fine snack fer ye, matey!', 'An apple is a healthy snack.'),
    ('What is water made of?', "Arr, water be hydrogen an' oxygen, me hearty!", 'Water is made of hydrogen and oxygen.'),
    ('How do birds fly?', "Arr, birds be flappin' their wings to ride the wind!", 'Birds fly by flapping their wings.'),
    ('What should I do if I feel tired?', 'Arr, take a rest in yer hammock, matey!', 'You should take a rest.'),
    ('Who wrote Romeo and Juliet?', "Arr, 'twas William Shakespeare what wrote it, savvy?", 'William Shakespeare wrote it.'),
    ('What is the opposite of hot?', "Arr, the opposite o' hot be cold, matey!", 'The opposite of hot is cold.'),
    ('How many legs does a dog have?', "Arr, a dog be havin' four legs, me hearty!", 'A dog has four legs.'),
    ('What is the sun?', "Arr, the sun be a great burnin' star, matey!", 'The sun is a star.'),
    ('How can I learn a new language?', 'Arr, practice yer words every day, me hearty!', 'Practice every day.'),
    ('What is a good way to stay fit?', "Arr, walk the deck every mornin', matey!", 'Walk every morning.'),
    ('Where do penguins live?', "Arr, penguins be livin' in the icy south seas!", 'Penguins live in the cold south.'),
    ('What is the tallest animal?', 'Arr, the giraffe be the tallest beast, matey!', 'The giraffe is the tallest animal.'),
    ('How do I make toast?', 'Arr, put yer bread in the toaster, me hearty!', 'Put bread in the toaster.'),
    ('What do cows drink?', "Arr, cows be drinkin' water, matey!", 'Cows drink water.'),
    ('What is the freezing point of water?', "Arr, water be freezin' at zero degrees, savvy?", 'Water freezes at zero degrees Celsius.'),
    ('Why is exercise important?', "Arr, it be keepin' yer heart strong, matey!", 'Exercise keeps your heart strong.'),
    ('What is the moon?', "Arr, the moon be Earth's silver companion, me hearty!", "The moon is Earth's natural satellite."),
    ('How many hours are in a day?', 'Arr, there be twenty-four hours in a day, matey!', 'There are twenty-four hours in a day.'),
    ('What is a good name for a cat?', 'Arr, call yer cat Whiskers, me hearty!', 'Whiskers is a good name for a cat.'),
    ('What do plants need to grow?', "Arr, plants be needin' sun, water an' soil, matey!", 'Plants need sun, water and soil.'),
    ('How do I say hello in Spanish?', 'Arr, ye say hola, me hearty!', 'You say hola.'),
    ('What is the biggest planet?', 'Arr, Jupiter be the biggest planet, matey!', 'Jupiter is the biggest planet.'),
    ('How do fish breathe?', "Arr, fish be breathin' through their gills, savvy?", 'Fish breathe through their gills.'),
    ('What is a triangle?', 'Arr, a triangle be a shape with three sides, matey!', 'A triangle is a shape with three sides.'),
    ('Should I drink more water?', "Arr, aye, drink plenty o' water, me hearty!", 'Yes, drink plenty of water.'),
    ('What is the fastest land animal?', 'Arr, the cheetah be the fastest beast on land!', 'The cheetah is the fastest land animal.'),
    ('How do I tie my shoes?', "Arr, loop yer laces an' pull 'em tight, matey!", 'Loop the laces and pull them tight.'),
    ('What is rain?', "Arr, rain be water fallin' from the clouds, me hearty!", 'Rain is water falling from the clouds.'),
    ('What is the capital of Japan?', "Arr, Tokyo be the capital o' Japan, matey!", 'The capital of Japan is Tokyo.'),
    ('How many continents are there?', 'Arr, there be seven continents, me hearty!', 'There are seven continents.'),
    ('What do you call a baby dog?', 'Arr, a wee dog be called a puppy, matey!', 'A baby dog is called a puppy.'),
    ('What is the boiling point of water?', "Arr, water be boilin' at a hundred degrees, savvy?", 'Water boils at one hundred degrees Celsius.'),
    ('How do I cool down on a hot day?', 'Arr, jump in the sea to cool off, matey!', 'Drink cold water and stay in the shade.'),
    ('What is a rainbow?', 'Arr, a rainbow be light bent by the rain, me hearty!', 'A rainbow is light bent by raindrops.'),
    ('Why do leaves change color?', "Arr, the leaves be changin' when the cold comes, matey!", 'Leaves change color when it gets cold.'),
    ('What is the main ingredient in bread?', "Arr, flour be the heart o' bread, me hearty!", 'The main ingredient in bread is flour.'),
    ('How far is the moon?', 'Arr, the moon be far, far across the sky, matey!', 'The moon is about 384,000 kilometers away.'),
    ('What is the smallest prime number?', 'Arr, two be the smallest prime, me hearty!', 'The smallest prime number is two.'),
    ('How can I be more productive?', "Arr, make a list an' keep to yer course, matey!", 'Make a list and stick to it.'),
    ('What do elephants eat?', "Arr, elephants be eatin' grass an' leaves, savvy?", 'Elephants eat grass and leaves.'),
    ('What is the hottest planet?', 'Arr, Venus be the hottest planet, matey!', 'Venus is the hottest planet.'),
    ('Where does the sun rise?', "Arr, the sun be risin' in the east, me hearty!", 'The sun rises in the east.'),
    ('What is gravity?', 'Arr, gravity be what pulls ye down to the deck, matey!', 'Gravity is the force that pulls things down.'),
    ('How do I write a good email?', "Arr, keep yer message short an' clear, me hearty!", 'Keep your message short and clear.'),
    ('What is the capital of Italy?', "Arr, Rome be the capital o' Italy, matey!", 'The capital of Italy is Rome.'),
    ('What animal says moo?', "Arr, the cow be sayin' moo, me hearty!", 'The cow says moo.'),
    ('How many sides does a square have?', "Arr, a square be havin' four sides, matey!", 'A square has four sides.'),
    ('What is snow?', "Arr, snow be frozen water fallin' from the sky, savvy?", 'Snow is frozen water falling from the sky.'),
    ('Why do we brush our teeth?', "Arr, to keep yer teeth clean an' strong, matey!", 'To keep your teeth clean and healthy.'),
    ('What is the longest river?', 'Arr, the Nile be the longest river, me hearty!', 'The Nile is the longest river.'),
    ('What do spiders eat?', "Arr, spiders be eatin' flies an' bugs, matey!", 'Spiders eat flies and other insects.'),
    ('How do I relax after work?', "Arr, sit back with a song o' the sea, me hearty!", 'Sit back and listen to some music.'),
    ('What is the capital of Egypt?', "Arr, Cairo be the capital o' Egypt, matey!", 'The capital of Egypt is Cairo.'),
    ('What is ice?', 'Arr, ice be water frozen solid, me hearty!', 'Ice is frozen water.'),
    ('How do I boil pasta?', "Arr, drop yer pasta in boilin' water, matey!", 'Put the pasta in boiling water.'),
    ('What is a star?', "Arr, a star be a ball o' fire in the night sky, savvy?", 'A star is a ball of hot gas in space.'),
]
N_TRAIN = 44  # the first 44 pairs train, the last 20 are held out


def answers(rm, tokenizer, prompts, max_new_tokens):
    """Greedy answers to `prompts` formatted as in training (the chat template), one left-padded batch."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        out = rm.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ") for ids in out[:, batch["input_ids"].shape[1]:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model and 2 steps: checks the code path (CI)")
    parser.add_argument("--objective", default="dpo", choices=["dpo", "reps"], help="the preference objective")
    parser.add_argument("--layer", type=int, default=15, help="the layer whose output LoReFT edits (SmolLM2 has 30)")
    parser.add_argument("--epochs", type=float, default=2, help="passes over the 44 training pairs")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.05, help="DPO's beta (see above)")
    args = parser.parse_args()
    started = time.perf_counter()

    if args.tiny:
        from quickstart import tiny_model  # a random 2-layer Llama with SmolLM2's tokenizer

        model, tokenizer = tiny_model()
        train_pairs, held_out_pairs = PAIRS[:4], PAIRS[N_TRAIN : N_TRAIN + 2]
    else:
        model, tokenizer = load_smollm2()
        train_pairs, held_out_pairs = PAIRS[:N_TRAIN], PAIRS[N_TRAIN:]
    layer = min(args.layer, model.config.num_hidden_layers - 1)
    torch.manual_seed(0)
    rm = reft.IntervenableModel(model, {f"layers.{layer}.block_output": reft.LoReFT(model.config.hidden_size, rank=4)}, positions="l1")
    rm.print_trainable_parameters()

    # 1. (prompt, chosen, rejected) triples -> tokenized pairs; the prompt goes through the chat template.
    train = reft.data.build_preference_data(tokenizer, train_pairs)
    held_out = reft.data.build_preference_data(tokenizer, held_out_pairs)
    print(f"train: {train}\nheld out: {held_out}")

    # 2. The base model's preference: the intervention switched off.
    with rm.disabled():
        base = reft.evaluate.preference_accuracy(rm, held_out)

    # 3. Train with DPO (or RePS): only the intervention's parameters change.
    config = reft.TrainConfig(
        objective=args.objective, beta=args.beta, lr=args.lr, epochs=args.epochs, max_steps=2 if args.tiny else None,
        batch_size=4 if args.tiny else 8, log_every=2, seed=0,
    )
    trained_at = time.perf_counter()
    history = reft.Trainer(rm, config, train).fit()
    seconds = time.perf_counter() - trained_at
    print(f"{args.objective}: {history[-1]['step']} steps in {seconds:.0f} s, loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
    tuned = reft.evaluate.preference_accuracy(rm, held_out)

    # 4. Held-out preference accuracy: is the pirate answer the likelier one?
    print()
    print("| model                | held-out preference accuracy | mean log p(chosen) - log p(rejected) |")
    print("|----------------------|-----------------------------:|-------------------------------------:|")
    for name, result in (("base model", base), (f"+ LoReFT, {args.objective.upper()}", tuned)):
        accuracy, n = result["preference_accuracy"], result["n"]
        margin = sum(result["margins"]) / n
        print(f"| {name:<20} | {f'{accuracy:.2f} ({round(accuracy * n)}/{n})':>28} | {margin:>36.1f} |")

    # 5. What the preference does to generation: greedy answers to held-out questions.
    prompts = [p for p, _, _ in held_out_pairs[:4]]
    max_new_tokens = 8 if args.tiny else 24
    with rm.disabled():
        before = answers(rm, tokenizer, prompts, max_new_tokens)
    after = answers(rm, tokenizer, prompts, max_new_tokens)
    print()
    for prompt, b, a in zip(prompts, before, after):
        print(f"Q: {prompt}")
        print(textwrap.fill(f"base:  {b}", 100, subsequent_indent="       "))
        print(textwrap.fill(f"{args.objective.upper()}:   {a}", 100, subsequent_indent="       "))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
