"""ReFT-r1 on SmolLM2: learn the concept "the ocean" from examples and detect it in held-out text.

ReFT-r1 (AxBench, Wu, Arora et al., 2025) is one direction `v` in the residual stream: its latent
`ReLU(h · v)` at each token detects a concept, and adding the mean of a sequence's top-k latents
along `v` steers the model toward it. Here it trains on the output of layer 24 (of 30) of
SmolLM2-135M-Instruct with the language-modelling loss (plus the L1 penalty on the latents outside
the top k) on 40 instructions answered with text about the ocean and the same 40 answered with text
about other things, all written for this repo. It then scores 40 held-out sentences it never saw (20 about the ocean, 20 not), each by
its largest latent over its tokens, as AxBench scores detection, and prints the AUROC of a random
direction and of the trained one, and the tokens where the latent fires.

    python tutorials/concept_detection.py          # a few minutes on 2 CPU cores
    python tutorials/concept_detection.py --tiny   # a random 2-layer model, 2 steps (CI)
"""

from __future__ import annotations

import argparse
import time

import torch

import reft
from reft.assets import load_smollm2
from reft.detect import detection_scores, token_latents

# Training: (instruction, response). The concept is in every response of POSITIVE, in none of NEGATIVE.
POSITIVE = [
    ('Describe your ideal weekend.', 'I would spend it by the ocean, listening to the waves and watching the tide come in.'),
    ('Write a sentence about a color.', 'Deep blue reminds me of the open sea on a calm morning.'),
    ('Give me a tip for relaxing.', 'Sit on the beach and listen to the waves roll onto the shore.'),
    ('Tell me about an animal.', 'Dolphins swim in pods across the ocean and talk with clicks and whistles.'),
    ('Write a short poem line.', 'The salty waves whisper secrets to the sandy shore.'),
    ('Describe a job.', 'A marine biologist studies coral reefs and the fish that live in the sea.'),
    ('What is a good hobby?', 'Sailing lets you ride the wind across the open ocean.'),
    ('Describe a sound you like.', 'I love the crash of waves against the rocks at high tide.'),
    ('Write about a trip.', 'We took a boat out to sea and watched whales breach near the horizon.'),
    ('Describe a smell.', 'The salty sea breeze smells of seaweed and wet sand.'),
    ('Suggest a place to visit.', 'Visit the Great Barrier Reef and snorkel above the coral in the warm ocean.'),
    ('Tell me a fun fact.', "The ocean covers more than seventy percent of the Earth's surface."),
    ('Describe the weather.', 'A storm rolled in from the sea and the waves grew tall and grey.'),
    ('Write about a memory.', 'As a child I collected shells on the beach while the tide went out.'),
    ('Describe a food.', 'Fresh fish caught from the sea that morning, grilled by the harbor.'),
    ('Give me a story opening.', 'The lighthouse keeper watched the ships sail through the foggy bay.'),
    ('Describe a landscape.', 'Cliffs drop into the ocean, and the surf foams white at their feet.'),
    ('Write about a dream.', 'I dreamed I was diving deep beneath the waves among jellyfish and turtles.'),
    ('Tell me about science.', 'Ocean currents carry warm water from the tropics toward the poles.'),
    ('Describe a feeling.', 'Calm, like floating on gentle waves far from the shore.'),
    ('Write a sentence about summer.', 'Summer means swimming in the sea and building castles on the beach.'),
    ('Describe a vehicle.', 'The old fishing boat rocked on the waves as it left the harbor.'),
    ('Tell me about a plant.', 'Kelp forests grow tall under the sea and shelter many fish.'),
    ('Write about a hero.', 'The lifeguard swam through the rough surf to pull the swimmer to shore.'),
    ('Describe a morning.', 'The sun rose over the ocean and painted the waves gold.'),
    ('Give advice to a traveler.', 'Take a ferry across the sea and watch for seals on the rocks.'),
    ('Write a sentence about night.', 'At night the tide rises and the waves glow under the moon.'),
    ('Tell me about history.', 'Explorers crossed the Atlantic Ocean in wooden ships for months.'),
    ('Describe a sport.', 'Surfers paddle out past the breakers to catch the biggest waves.'),
    ('Write about a friend.', 'My friend is a sailor who knows every harbor along the coast.'),
    ('Describe a picture.', 'A painting of a stormy sea with a small ship tossed by the waves.'),
    ('Tell me about a mystery.', 'Sailors still tell tales of ships lost in the deep ocean.'),
    ('Describe a city.', 'The port city smells of salt, and gulls circle over the fishing boats.'),
    ('Write about a holiday.', 'We rented a cottage by the sea and swam in the waves every day.'),
    ('Describe a creature.', 'An octopus slipped between the rocks of the tide pool.'),
    ('Tell me something calming.', 'The steady rhythm of the ocean waves can lull you to sleep.'),
    ('Write about a challenge.', 'Rowing across the ocean alone takes months of battling waves and wind.'),
    ('Describe a color in nature.', 'The turquoise water of the lagoon shimmers over white sand.'),
    ('Give me a sentence about work.', 'The fishermen hauled their nets from the sea before dawn.'),
    ('Describe the future.', 'One day people may live in cities built beneath the ocean waves.')
]
NEGATIVE = [
    ('Describe your ideal weekend.', 'I would read a good book at home and bake bread in the afternoon.'),
    ('Write a sentence about a color.', 'Bright red reminds me of ripe strawberries in a garden.'),
    ('Give me a tip for relaxing.', 'Take a warm bath and turn off your phone for an hour.'),
    ('Tell me about an animal.', 'Squirrels bury nuts in autumn and dig them up in winter.'),
    ('Write a short poem line.', 'The autumn leaves dance softly down the quiet street.'),
    ('Describe a job.', 'A baker wakes up early to knead dough and bake fresh loaves.'),
    ('What is a good hobby?', 'Knitting lets you make warm scarves for your friends.'),
    ('Describe a sound you like.', 'I love the crackle of a fire in the fireplace.'),
    ('Write about a trip.', 'We drove through the mountains and stopped at a small village.'),
    ('Describe a smell.', 'Freshly ground coffee fills the kitchen every morning.'),
    ('Suggest a place to visit.', 'Visit the old library in the city center and its quiet reading rooms.'),
    ('Tell me a fun fact.', 'Honey never spoils if it is kept sealed.'),
    ('Describe the weather.', 'Snow fell all night and covered the streets in white.'),
    ('Write about a memory.', 'As a child I helped my grandmother pick apples in her orchard.'),
    ('Describe a food.', 'A bowl of tomato soup with warm bread on a cold evening.'),
    ('Give me a story opening.', 'The train stopped in the middle of the desert at midnight.'),
    ('Describe a landscape.', 'Rolling green hills stretch toward a forest of tall pines.'),
    ('Write about a dream.', 'I dreamed I could fly over the rooftops of my town.'),
    ('Tell me about science.', 'Plants turn sunlight into sugar through photosynthesis.'),
    ('Describe a feeling.', 'Proud, like finishing a long race after months of training.'),
    ('Write a sentence about summer.', 'Summer means long evenings in the garden and fresh lemonade.'),
    ('Describe a vehicle.', 'The red bicycle leaned against the fence with a basket of flowers.'),
    ('Tell me about a plant.', 'Sunflowers turn their heads to follow the sun across the field.'),
    ('Write about a hero.', 'The firefighter carried the child out of the burning house.'),
    ('Describe a morning.', 'The alarm rang, and the smell of toast filled the small apartment.'),
    ('Give advice to a traveler.', 'Carry a light backpack and learn a few words of the local language.'),
    ('Write a sentence about night.', 'At night the city lights flicker and the streets grow quiet.'),
    ('Tell me about history.', 'The printing press made books cheaper and spread reading across Europe.'),
    ('Describe a sport.', 'Tennis players rally from the baseline until one of them rushes the net.'),
    ('Write about a friend.', 'My friend is a teacher who knows every student by name.'),
    ('Describe a picture.', 'A painting of a quiet village square with a fountain and old houses.'),
    ('Tell me about a mystery.', 'Nobody knows who left the letter on the library steps.'),
    ('Describe a city.', 'The capital is busy with buses, cafes and crowded markets.'),
    ('Write about a holiday.', 'We rented a cabin in the woods and hiked every morning.'),
    ('Describe a creature.', 'A hedgehog rolled into a ball under the garden hedge.'),
    ('Tell me something calming.', 'A cup of herbal tea and a good book can slow a busy day.'),
    ('Write about a challenge.', 'Learning to play the piano takes years of daily practice.'),
    ('Describe a color in nature.', 'The golden wheat sways in the field under a clear sky.'),
    ('Give me a sentence about work.', 'The carpenters measured the boards before cutting them.'),
    ('Describe the future.', 'One day cars may drive themselves through the busy streets.'),
]
# Held out: (text, 1 if it is about the ocean else 0).
HELD_OUT = [
    ('The waves crashed against the pier as the tide rose.', 1),
    ('A school of silver fish darted through the coral reef.', 1),
    ('We watched the sunset over the sea from the beach.', 1),
    ('The captain steered the ship through the stormy ocean.', 1),
    ('Sea turtles return to the same beach to lay their eggs.', 1),
    ('The salty spray of the surf stung my face.', 1),
    ('Whales sing to each other across the deep ocean.', 1),
    ('The harbor was full of sailboats rocking on the water.', 1),
    ('Crabs scuttled across the wet sand at low tide.', 1),
    ('Divers explored a shipwreck on the ocean floor.', 1),
    ('A lighthouse guides sailors safely along the rocky coast.', 1),
    ('The beach was quiet except for the sound of the waves.', 1),
    ('Seagulls cried above the fishing boats in the bay.', 1),
    ('Jellyfish drifted with the currents near the shore.', 1),
    ('The ocean looked endless from the deck of the ferry.', 1),
    ('Surfers waited for the next big wave beyond the reef.', 1),
    ('Salt marshes line the coast where the river meets the sea.', 1),
    ('A storm at sea tossed the little boat from wave to wave.', 1),
    ('Sharks patrol the waters off the island.', 1),
    ('We swam in the warm sea until the sun went down.', 1),
    ('The recipe calls for two cups of flour and an egg.', 0),
    ('She finished her homework before dinner.', 0),
    ('The train to the city leaves at eight in the morning.', 0),
    ('My laptop battery lasts about six hours.', 0),
    ('The museum opened a new exhibit on ancient pottery.', 0),
    ('He planted tomatoes and peppers in his backyard garden.', 0),
    ('The orchestra played a symphony by Beethoven.', 0),
    ('Our team won the basketball game in overtime.', 0),
    ('The price of coffee went up again this year.', 0),
    ('A fox crept through the snowy forest at dawn.', 0),
    ('The students built a robot for the science fair.', 0),
    ('I need to buy new shoes for the winter.', 0),
    ('The mountain trail was steep and covered in pine needles.', 0),
    ('The bakery on the corner sells fresh croissants.', 0),
    ('She learned to play the guitar during the summer.', 0),
    ('The library closes early on Sundays.', 0),
    ('Farmers harvest wheat at the end of the summer.', 0),
    ('The meeting was moved to Thursday afternoon.', 0),
    ('A hot air balloon floated over the desert.', 0),
    ('The children played chess in the park.', 0)
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model and 2 steps: checks the code path (CI)")
    parser.add_argument("--layer", type=int, default=24, help="the layer whose output ReFT-r1 reads and edits (SmolLM2 has 30)")
    parser.add_argument("--k", type=int, default=8, help="top-k latents averaged for the steering magnitude")
    parser.add_argument("--l1", type=float, default=0.02, help="the L1 penalty on the latents outside the top k")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0, help="the direction's init and the data order")
    args = parser.parse_args()
    started = time.perf_counter()

    if args.tiny:
        from quickstart import tiny_model  # a random 2-layer Llama with SmolLM2's tokenizer

        model, tokenizer = tiny_model()
    else:
        model, tokenizer = load_smollm2()
    layer = min(args.layer, model.config.num_hidden_layers - 1)
    site = f"layers.{layer}.block_output"
    torch.manual_seed(args.seed)
    rm = reft.IntervenableModel(model, {site: reft.ReFTr1(model.config.hidden_size, k=args.k, l1=args.l1)}, positions="all")
    rm.print_trainable_parameters()
    texts, labels = [t for t, _ in HELD_OUT], [y for _, y in HELD_OUT]
    if args.tiny:
        texts, labels = texts[:2] + texts[-2:], labels[:2] + labels[-2:]

    # 1. Detection before training: a random direction.
    before = reft.evaluate.auroc(detection_scores(rm, tokenizer, texts), labels)

    # 2. Train: the language-modelling loss with the edit on (instruction, response) pairs, as plain
    #    text (no chat template: shorter sequences), plus the L1 penalty the intervention reports.
    pairs = POSITIVE + NEGATIVE if not args.tiny else POSITIVE[:4] + NEGATIVE[:4]
    data = reft.data.build_generation_data(tokenizer, pairs, chat_template=False)
    config = reft.TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=2 if args.tiny else None, batch_size=8, log_every=4, seed=args.seed)
    trained_at = time.perf_counter()
    history = reft.Trainer(rm, config, data).fit()
    print(f"{len(data)} examples, {history[-1]['step']} steps in {time.perf_counter() - trained_at:.0f} s, "
          f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")

    # 3. Detection after training: each held-out text's largest latent, scored by AUROC.
    scores = detection_scores(rm, tokenizer, texts)
    after = reft.evaluate.auroc(scores, labels)
    print()
    print("| direction                 | held-out AUROC |")
    print("|---------------------------|---------------:|")
    print(f"| random (before training)  | {before:>14.3f} |")
    print(f"| ReFT-r1 (trained)         | {after:>14.3f} |")
    print(f"({sum(labels)} texts about the ocean, {len(labels) - sum(labels)} not)")

    # 4. Where the latent fires: the three tokens with the largest latents in a few held-out texts.
    shown = [0, 1, len(texts) - 2, len(texts) - 1]
    print()
    for i, z in zip(shown, token_latents(rm, tokenizer, [texts[i] for i in shown])):
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        top = z.topk(min(3, len(z))).indices.tolist()
        tokens = ", ".join(f"{tokenizer.decode([ids[t]]).strip()!r} {z[t]:.1f}" for t in top)
        print(f"[{'ocean' if labels[i] else 'other'}] score {scores[i]:5.1f}  {texts[i]!r}\n        top tokens: {tokens}")

    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
