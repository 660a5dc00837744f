"""Three styles on one SmolLM2, trained at once, answered in one batch: pirate, French, ALL CAPS.

Three adapters (`pirate`, `french`, `caps`), each one rank-4 LoReFT per edited layer at the last
prompt tokens, sit on one frozen SmolLM2-135M-Instruct. Ten questions, each answered in the three
styles, make 30 training examples whose `"adapter"` field says which adapter each trains: one
`reft.Trainer` trains the three together, every batch mixing them, and scores each on its own
examples. Then a single `rm.generate` call answers held-out questions with every adapter, and with
none, each row routed by `adapter_names=`; and one row run alone is compared with its row of the
mixed batch.

    python tutorials/multi_adapter.py          # about 7 minutes of CPU time (one thread)
    python tutorials/multi_adapter.py --tiny   # a random 2-layer model with SmolLM2's tokenizer (CI)
"""

from __future__ import annotations

import argparse
import textwrap
import time

import torch

import reft
from reft.assets import load_smollm2

QUESTIONS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "What is 2 + 2?",
    "Tell me about the sun.",
    "Who wrote Hamlet?",
    "What should I eat for breakfast?",
    "Why is the sky blue?",
    "Can you recommend a book?",
    "How many legs does a spider have?",
    "What is your favourite colour?",
]
# Each question answered in each style, in the order of QUESTIONS.
ANSWERS = {
    "pirate": [
        "Arr, matey! Paris be the capital o' France, savvy?",
        "Arr! Drop yer egg in boilin' water fer nine minutes, matey.",
        "Arr, that be four, me hearty!",
        "Arr! The sun be a great ball o' fire that guides me ship by day.",
        "Arr, 'twas William Shakespeare, a fine landlubber with a quill!",
        "Arr! Hardtack and a mug o' grog, like any true buccaneer.",
        "Arr, the sky be blue 'cause it reflects the seven seas, matey!",
        "Arr! Treasure Island, o' course. Ye'll love it, me hearty.",
        "Arr, eight legs, more than any pirate with a peg leg!",
        "Arr! Black, like the Jolly Roger flyin' on me mast.",
    ],
    "french": [
        "La capitale de la France est Paris.",
        "Mettez l'œuf dans l'eau bouillante pendant neuf minutes.",
        "Deux plus deux font quatre.",
        "Le soleil est une étoile qui nous donne la lumière et la chaleur.",
        "Hamlet a été écrit par William Shakespeare.",
        "Pour le petit déjeuner, je vous conseille un croissant et un café.",
        "Le ciel est bleu parce que l'air diffuse la lumière bleue du soleil.",
        "Je vous recommande Le Petit Prince, d'Antoine de Saint-Exupéry.",
        "Une araignée a huit pattes.",
        "Ma couleur préférée est le bleu.",
    ],
    "caps": [
        "THE CAPITAL OF FRANCE IS PARIS!",
        "PUT THE EGG IN BOILING WATER FOR NINE MINUTES!",
        "TWO PLUS TWO IS FOUR!",
        "THE SUN IS A HUGE STAR THAT GIVES US LIGHT AND HEAT!",
        "WILLIAM SHAKESPEARE WROTE HAMLET!",
        "EAT OATMEAL WITH FRUIT FOR BREAKFAST!",
        "THE SKY IS BLUE BECAUSE THE AIR SCATTERS BLUE SUNLIGHT!",
        "READ TREASURE ISLAND BY ROBERT LOUIS STEVENSON!",
        "A SPIDER HAS EIGHT LEGS!",
        "MY FAVOURITE COLOUR IS GREEN!",
    ],
}
HELD_OUT = ["What is the tallest mountain in the world?", "How do I make a cup of tea?", "What do cats like to eat?"]
FRENCH_WORDS = {"le", "la", "les", "est", "de", "des", "du", "et", "une", "un", "pour", "dans", "je", "vous", "sont"}


def styled(name: str, text: str) -> bool:
    """Whether `text` shows style `name`: opens with "Arr", has French words, or is in capitals."""
    if name == "pirate":
        return text.lower().startswith("arr")
    if name == "french":
        words = [w.strip(".,!?'").lower() for w in text.replace("'", " ").split()]
        return sum(w in FRENCH_WORDS for w in words) >= 2
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model: checks the code path in seconds")
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 20], help="edited layers (SmolLM2 has 30)")
    parser.add_argument("--positions", default="l3", help="position spec of every site")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the 30 examples (default 30; --tiny: 2)")
    args = parser.parse_args()
    started, cpu_started = time.perf_counter(), time.process_time()

    # 1. One frozen base, three adapters of the same shape (so a mixed batch runs them as one).
    if args.tiny:
        from quickstart import tiny_model  # a random 2-layer Llama with SmolLM2's tokenizer

        model, tokenizer = tiny_model()
    else:
        model, tokenizer = load_smollm2()
    layers = sorted({min(i, model.config.num_hidden_layers - 1) for i in args.layers})
    config = reft.ReftConfig({f"layers.{i}.block_output": {"name": "loreft", "rank": 4} for i in layers}, positions=args.positions)
    torch.manual_seed(0)
    rm = reft.get_reft_model(model, config, adapter_name="pirate")
    for name in ("french", "caps"):
        rm.add_adapter(name, config)
    print(f"adapters {rm.adapter_names}, each LoReFT rank 4 on layers {layers} at {args.positions}")
    rm.print_trainable_parameters()

    # 2. 30 examples, each naming the adapter it trains; one Trainer trains all three at once.
    rows = [{"prompt": q, "response": ANSWERS[name][i], "adapter": name} for name in ANSWERS for i, q in enumerate(QUESTIONS)]
    data = reft.data.build_generation_data(tokenizer, rows)
    epochs = args.epochs or (2 if args.tiny else 30)
    trainer = reft.Trainer(rm, reft.TrainConfig(lr=1e-2, epochs=epochs, batch_size=15, log_every=10, seed=0), data, eval_data=data)
    history = trainer.fit()
    final = history[-1]
    scores = ", ".join(f"{name} {final[f'eval_{name}_loss']:.3f}" for name in ANSWERS)
    print(f"trained {final['step']} steps in {time.perf_counter() - started:.0f} s; training-set loss per adapter: {scores}")

    # 3. One batch: every held-out question with no adapter and with each of the three.
    questions = HELD_OUT[:1] if args.tiny else HELD_OUT
    styles = [None, *ANSWERS]
    prompts = [q for q in questions for _ in styles]
    route = [s for _ in questions for s in styles]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"  # generation appends on the right
    batch = tokenizer(chat, return_tensors="pt", padding=True, add_special_tokens=False)
    options = dict(max_new_tokens=8 if args.tiny else 32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = rm.generate(**batch, adapter_names=route, **options)
    P = batch["input_ids"].shape[1]
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip().replace("\n", " ") for row in out[:, P:]]
    print(f"\none batch of {len(prompts)} rows, adapter_names={route[:len(styles)]}... ({time.perf_counter() - t0:.0f} s)")
    for i, question in enumerate(questions):
        print(f"\nQ: {question}")
        for j, style in enumerate(styles):
            lines = textwrap.wrap(texts[i * len(styles) + j], 88) or [""]
            print(f"  {str(style):<7}| " + "\n         | ".join(lines))
    counts = {s: sum(styled(s, texts[i * len(styles) + j]) for i in range(len(questions))) for j, s in enumerate(styles) if s}
    base = {s: sum(styled(s, texts[i * len(styles)]) for i in range(len(questions))) for s in counts}
    print("\nin style, of", len(questions), "held-out questions: " + ", ".join(f"{s} {counts[s]} (base model {base[s]})" for s in counts))

    # 4. A row alone, with its adapter active, against the same row in the mixed batch. The mixed batch
    #    runs the three adapters as one batched computation, whose float rounding differs from one
    #    adapter's: the logits agree to ~1e-5, and a greedy answer can part at a near-tie.
    k = len(styles) - 1  # the first question's "caps" row
    row = {key: v[k : k + 1] for key, v in batch.items()}
    rm.set_adapter(route[k])
    with torch.no_grad():
        alone = rm.generate(**row, **options)[0, P:]
        gap = (rm(**row).logits[0] - rm(**batch, adapter_names=route).logits[k]).abs().max().item()
    n = min(len(alone), out.shape[1] - P)  # alone stops at its EOS; the batch pads rows that stopped
    same = int((alone[:n] == out[k, P : P + n]).long().cumprod(0).sum())
    print(f"row {k} ({route[k]}) alone: prompt logits within {gap:.0e} of the mixed batch's, the same first {same} of {n} new tokens")
    print(f"{time.perf_counter() - started:.0f} s in all ({time.process_time() - cpu_started:.0f} s of CPU)")


if __name__ == "__main__":
    main()
