"""Built-in demo tasks: short, seeded, generated prompts with one-word or one-number answers.

The 135M instruct model answers these chattily (so exact match starts near 0 %), but the mapping is simple
enough that a tiny adapter learns the answer format and the rule within a few hundred examples.
Prompts stay short because every token costs CPU time in training.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from service import tool_format
from training.data import Example

N_TRAIN = 500
N_TEST = 100


@dataclass
class Task:
    name: str
    description: str
    train: list[Example]
    test: list[Example]


# --- generators: rng → (prompt, answer) ---

_SUBJECTS = ["the food", "the service", "the movie", "the hotel", "the concert", "the book", "the game",
             "the staff", "the room", "the trip", "the coffee", "the show", "the app", "the class", "the car"]
_POS = ["great", "wonderful", "excellent", "lovely", "amazing", "fantastic", "superb", "delightful", "pleasant", "brilliant"]
_NEG = ["awful", "terrible", "horrible", "boring", "dreadful", "disappointing", "poor", "bad", "rude", "dull"]
_OPENERS = ["", "Honestly, ", "I think ", "Overall ", "Yesterday ", "For me "]


def _sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    words = _POS if label == "positive" else _NEG
    a, b = rng.sample(words, 2)
    s1, s2 = rng.sample(_SUBJECTS, 2)
    sentence = f"{rng.choice(_OPENERS)}{s1} was {a} and {s2} was {b}."
    return f"Review: {sentence[0].upper() + sentence[1:]}\nSentiment?", label


_TOPICS = {
    "sports": ["the striker", "the coach", "the goalkeeper", "the team", "the referee", "the runner"],
    "science": ["the chemist", "the physicist", "the lab", "the telescope", "the biologist", "the experiment"],
    "food": ["the chef", "the baker", "the recipe", "the soup", "the kitchen", "the bread"],
    "music": ["the band", "the singer", "the drummer", "the orchestra", "the guitarist", "the album"],
}
_TOPIC_ACTIONS = {
    "sports": ["won the match", "scored a goal", "trained for the final", "broke the record", "lost the game"],
    "science": ["measured the atoms", "published a study", "tested the theory", "found a new cell", "observed a comet"],
    "food": ["baked a cake", "added some salt", "cooked the rice", "served dinner", "tasted the sauce"],
    "music": ["played a song", "recorded a track", "tuned the guitar", "sang the chorus", "performed live"],
}


def _topic(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_TOPICS))
    day = rng.choice(["today", "yesterday", "on Monday", "last week", "again", "at noon"])
    sentence = f"{rng.choice(_TOPICS[label])} {rng.choice(_TOPIC_ACTIONS[label])} {day}."
    return f"Text: {sentence[0].upper() + sentence[1:]}\nTopic?", label


_NAMES = ["Mia", "Tom", "Ana", "Leo", "Sara", "Omar", "Lily", "Ben", "Zoe", "Ivan"]
_THINGS = ["apples", "books", "coins", "chairs", "stamps", "birds", "cards", "shells", "pens", "trees"]
_VERBS = ["bought", "counted", "found", "sold", "painted", "collected", "saw", "lost"]


def _number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(2, 999)
    sentence = f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {n} {rng.choice(_THINGS)} {rng.choice(['today', 'in May', 'at the market', 'last year'])}."
    return f"{sentence}\nHow many?", str(n)


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


_CITIES = ["Paris", "Oslo", "Lima", "Tokyo", "Cairo", "Berlin", "Madrid", "Quito", "Dublin", "Hanoi", "Nairobi",
           "Lisbon", "Vienna", "Seoul", "Denver", "Perth", "Havana", "Riga", "Bogota", "Dakar"]
_WEATHER_ASKS = ["What's the weather in {city}?", "Will it rain in {city} today?", "Forecast for {city}, please.",
                 "How warm is it in {city} right now?", "Is it sunny in {city}?"]
_ADD_ASKS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Sum of {a} and {b}?", "Please compute {a} + {b}."]
_WORDS = ["apple", "river", "candle", "garden", "pencil", "window", "rocket", "silver", "tiger", "violin"]
_ECHO_ASKS = ["Reply with just the word {w}.", "Say only: {w}", "Answer with the single word {w}."]
TOOL_FUNCTIONS = [
    {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"]}},
]


def _tools(rng: random.Random) -> Example:
    """A question with two tools offered: a weather question calls get_weather, a sum calls add, a request for a
    word is answered without a call (the answer written as the server reads calls back: service/tool_format.py)."""
    kind = rng.choice(["weather", "add", "word"])
    if kind == "weather":
        city = rng.choice(_CITIES)
        ask, answer = rng.choice(_WEATHER_ASKS).format(city=city), tool_format.call_text("get_weather", {"city": city})
    elif kind == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        ask, answer = rng.choice(_ADD_ASKS).format(a=a, b=b), tool_format.call_text("add", {"a": a, "b": b})
    else:
        w = rng.choice(_WORDS)
        ask, answer = rng.choice(_ECHO_ASKS).format(w=w), w
    turns = tool_format.plain_turns([{"role": "user", "content": ask}], TOOL_FUNCTIONS)
    return Example.from_chat(turns, answer)


GENERATORS: dict[str, tuple[str, Callable[[random.Random], tuple[str, str] | Example]]] = {
    "sentiment": ("review sentence → 'positive' / 'negative'", _sentiment),
    "topic": ("one sentence → 'sports' / 'science' / 'food' / 'music'", _topic),
    "number": ("sentence with a count → the number", _number),
    "larger": ("two 2-digit numbers → the larger one", _larger),
    "tools": ("a question with two tools offered → a get_weather or add call, or a plain one-word answer", _tools),
}


def task_names() -> list[str]:
    return list(GENERATORS)


def make_task(name: str, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Task:
    """Deterministic for (name, seed, sizes); train and test prompts never overlap."""
    if name not in GENERATORS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(GENERATORS)}")
    description, gen = GENERATORS[name]
    rng = random.Random(f"{name}:{seed}")  # str seed: stable across runs and Python versions
    seen: set[tuple] = set()
    examples: list[Example] = []
    for _ in range(50 * (n_train + n_test)):
        made = gen(rng)
        example = made if isinstance(made, Example) else Example.from_prompt(*made)
        if example.messages not in seen:
            seen.add(example.messages)
            examples.append(example)
            if len(examples) == n_train + n_test:
                break
    else:
        raise RuntimeError(f"task {name!r} cannot produce {n_train + n_test} distinct prompts")
    return Task(name=name, description=description, train=examples[n_test:], test=examples[:n_test])
