"""Writes train.jsonl / eval.jsonl: short movie-review sentences labelled positive or negative.

The sentences are composed from phrase lists (so the set is reproducible and license-free);
eval sentences use held-out films and are never in train. Run: python make_data.py
"""

import json
import random
from pathlib import Path

INSTRUCTION = "Classify the sentiment of this movie review. Reply with one lowercase word: positive or negative."

FILMS = [
    "the film",
    "this movie",
    "the sequel",
    "the remake",
    "this thriller",
    "the comedy",
    "this drama",
    "the documentary",
    "the animated feature",
    "this western",
    "the horror flick",
    "the musical",
    "this biopic",
    "the space opera",
    "the heist movie",
    "this romance",
    "the war epic",
    "the mystery",
    "the superhero movie",
    "this indie film",
    "the adaptation",
    "the debut feature",
    "the director's cut",
    "this noir",
    "the family film",
    "the courtroom drama",
    "the road movie",
    "the fantasy epic",
]
ASPECTS = [
    "the acting",
    "the script",
    "the soundtrack",
    "the cinematography",
    "the pacing",
    "the dialogue",
    "the ending",
    "the plot",
    "the lead performance",
    "the direction",
    "the visual effects",
    "the editing",
    "the humor",
    "the score",
    "the characters",
    "the final act",
]
POSITIVE = [
    "wonderful",
    "brilliant",
    "moving",
    "gripping",
    "delightful",
    "superb",
    "charming",
    "stunning",
    "hilarious",
    "masterful",
    "heartfelt",
    "beautiful",
    "thrilling",
    "clever",
    "unforgettable",
    "excellent",
]
NEGATIVE = [
    "dull",
    "tedious",
    "clumsy",
    "boring",
    "awful",
    "lifeless",
    "predictable",
    "messy",
    "forgettable",
    "painful",
    "bland",
    "incoherent",
    "shallow",
    "annoying",
    "tiresome",
    "dreadful",
]
INTENSIFIERS = ["", "", "truly ", "really ", "utterly ", "surprisingly ", "remarkably ", "simply "]
POS_TEMPLATES = [
    "{film} is {i}{adj}.",
    "{aspect} in {film} is {i}{adj}, and I loved every minute.",
    "I left the theater smiling; {film} is {i}{adj}.",
    "What a {adj} experience: {aspect} alone is worth the ticket.",
    "{film} won me over with {aspect}, which is {i}{adj}.",
    "Go see {film}; {aspect} is {i}{adj}.",
    "Easily one of the best of the year, {film} is {adj} from start to finish.",
    "I would happily watch {film} again, {aspect} is {i}{adj}.",
]
NEG_TEMPLATES = [
    "{film} is {i}{adj}.",
    "{aspect} in {film} is {i}{adj}, and I checked my watch constantly.",
    "I nearly walked out; {film} is {i}{adj}.",
    "What a {adj} experience: not even {aspect} could save it.",
    "{film} lost me because {aspect} is {i}{adj}.",
    "Skip {film}; {aspect} is {i}{adj}.",
    "Easily one of the worst of the year, {film} is {adj} from start to finish.",
    "I want those two hours back, {aspect} is {i}{adj}.",
]


def sentence(rng: random.Random, films: list[str], positive: bool) -> str:
    template = rng.choice(POS_TEMPLATES if positive else NEG_TEMPLATES)
    text = template.format(
        film=rng.choice(films),
        aspect=rng.choice(ASPECTS),
        i=rng.choice(INTENSIFIERS),
        adj=rng.choice(POSITIVE if positive else NEGATIVE),
    )
    return text[0].upper() + text[1:]


def make(n: int, films: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        positive = len(rows) % 2 == 0
        text = sentence(rng, films, positive)
        if text not in seen:
            seen.add(text)
            rows.append({"instruction": INSTRUCTION, "input": text, "output": "positive" if positive else "negative"})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    train_films, eval_films = FILMS[:22], FILMS[22:]
    for name, rows in [("train.jsonl", make(480, train_films, 0)), ("eval.jsonl", make(100, eval_films, 1))]:
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {here / name}")
