"""Generated summarization data in CNN/DailyMail's schema (`article`, `highlights`, `id`), clearly synthetic.

Why: the CPU default of `workloads/summarize.py` must run offline in minutes, and a tiny model trained from scratch
cannot learn to summarize real news in that time. These "articles" are short news-like reports: one sentence of
facts (a person, their role and town, what they did) and one sentence with a number, each at a random place among
filler sentences that carry no facts. The reference summary is a fixed template over the same facts:

    article:   ... Traffic was slow on the main road. Clara Novak, a baker from Selby, opened a new library on
               Tuesday. The council will meet again next month. ... The work cost 47 million dollars, officials said. ...
    summary:   Clara Novak, a baker from Selby, opened a new library. The work cost 47 million dollars.

A model scores ROUGE for the template words by learning the template, and the rest only by copying the facts out of
the article, from wherever they sit: in a long article that is several segments back, through the Condensation
model's memory. Every article ends with a closing sentence without facts. The number of filler sentences sets the length, so the 0-512 / 512-1024 / 1024+ style buckets (at
whatever scale) fill. Everything is drawn from one seeded RNG: the same arguments give the same files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

SYNTHETIC_NOTE = ("SYNTHETIC data (condensation.data.synthetic_summaries): generated news-like reports with templated "
                  "reference summaries; the scores show whether finetuning and generation work, not how well a model "
                  "summarizes real text")

FIRST = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Karin", "Lucas",
         "Maria", "Nikos", "Olga", "Pablo", "Rosa", "Simon", "Tara", "Vera", "Walter", "Yusuf", "Zoe", "Omar"]
LAST = ["Adler", "Berg", "Costa", "Dahl", "Engel", "Fischer", "Garcia", "Hahn", "Ito", "Jensen", "Keller", "Lang",
        "Moreau", "Novak", "Olsen", "Petrov", "Rossi", "Silva", "Tanaka", "Vogel", "Weber", "Young", "Zeller", "Brandt"]
ROLES = ["mayor", "teacher", "engineer", "doctor", "farmer", "baker", "pilot", "judge", "nurse", "painter",
         "chemist", "librarian", "carpenter", "student"]
TOWNS = ["Arden", "Bexley", "Corfe", "Dunmore", "Elston", "Farley", "Glenrock", "Harlow", "Kelso", "Lydford",
         "Marlow", "Norwell", "Oakham", "Penrith", "Redcar", "Selby", "Thirsk", "Upton", "Wells", "Alston"]
EVENTS = ["opened a new library", "won a national prize", "built a bridge over the river", "started a local radio station",
          "planted a thousand trees", "found an old shipwreck", "repaired the town hall", "launched a night school",
          "rescued a family from a flood", "set up a food bank", "restored a historic mill", "organised a music festival"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COSTS = ["The work cost {n} million dollars, officials said.", "Officials said the work cost {n} million dollars."]
FILLER = [
    "The weather stayed {weather} for most of the week.",
    "Shops in the town centre reported {amount} trade.",
    "Several residents said they had not expected the news.",
    "A spokesperson declined to comment further.",
    "The council will meet again next month.",
    "Traffic was {speed} on the main road in the morning.",
    "Local papers put the story on their front pages.",
    "Schools stayed open throughout the day.",
    "Visitors came from nearby villages to see it.",
    "The decision followed months of public debate.",
    "Some people gathered in the square to watch.",
    "Volunteers handed out tea and sandwiches.",
    "A band played outside the old church in the afternoon.",
    "Police said the day passed without trouble.",
    "The regional radio station covered the event live.",
    "Children painted posters for the occasion.",
    "Critics said the plan had taken too long.",
    "Supporters called it a good day for the area.",
    "The nearest train station was {amount} than usual.",
    "Photographs of the day were shared widely online.",
    "A small market sold bread, cheese and flowers.",
    "The local football club postponed its match.",
    "Older residents remembered a similar day years ago.",
    "The river was {speed} and {weather} that morning.",
]
# every article ends with one of these, so a prompt cut by a few tokens at its end (`length_multiple` of the
# summarization workload) loses only words that carry no facts
CLOSING = ["More details are expected later this week, a spokesperson for the town council told reporters.",
           "Residents were invited to a public meeting at the town hall next week to ask their own questions.",
           "The town council said it would publish a full report on its website before the end of the month."]
FILL_WORDS = {"weather": ["mild", "cold", "wet", "windy", "grey", "warm"],
              "amount": ["busy", "quiet", "steady", "slow", "brisk"],
              "speed": ["slow", "heavy", "light", "calm", "fast"]}


def _filler(rng: random.Random) -> str:
    s = rng.choice(FILLER)
    return s.format(**{k: rng.choice(v) for k, v in FILL_WORDS.items()})


def synthetic_record(rng: random.Random, index: int, max_filler: int, min_filler: int = 0) -> dict:
    """One article and its reference summary; `min_filler`..`max_filler` filler sentences set the length."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    role, town, event, cost_n = rng.choice(ROLES), rng.choice(TOWNS), rng.choice(EVENTS), rng.randint(2, 99)
    role = ("an " if role[0] in "aeiou" else "a ") + role
    facts = f"{name}, {role} from {town}, {event} on {rng.choice(DAYS)}."
    cost = rng.choice(COSTS).format(n=cost_n)
    # filler count ~ min + (max - min + 1) * U^1.5: short articles a little more often than uniform, so that with the
    # lengths growing by a sentence at a time the shortest bucket is not the emptiest
    n = min_filler + min(max_filler - min_filler, int((max_filler - min_filler + 1) * rng.random() ** 1.5))
    sentences = [_filler(rng) for _ in range(n)]
    i = rng.randint(0, len(sentences))
    sentences.insert(i, facts)
    sentences.insert(rng.randint(i + 1, len(sentences)), cost)  # the number after the facts, anywhere later
    sentences.append(rng.choice(CLOSING))
    summary = f"{name}, {role} from {town}, {event}. The work cost {cost_n} million dollars."
    return {"article": " ".join(sentences), "highlights": summary, "id": f"synthetic-{index:06d}", "synthetic": True}


def synthetic_records(n: int, seed: int = 0, max_filler: int = 20, min_filler: int = 0,
                      start: int = 0) -> list[dict]:
    """`n` records from one seeded RNG (ids start at `start`)."""
    rng = random.Random(seed)
    return [synthetic_record(rng, start + i, max_filler, min_filler) for i in range(n)]


def write_synthetic_summaries(folder: str | os.PathLike, n_train: int, n_test: int, seed: int = 0,
                              max_filler: int = 20, min_filler: int = 0) -> dict[str, str]:
    """`<folder>/train.jsonl` and `<folder>/test.jsonl` (different seeds, so no test article is a training one)
    plus `README.txt` saying what they are; rewritten only when the arguments changed. Returns the two paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"n_train": n_train, "n_test": n_test, "seed": seed, "max_filler": max_filler, "min_filler": min_filler}
    paths = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")}
    stamp = folder / "spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec and all(os.path.isfile(p) for p in paths.values()):
        return paths
    for split, n, s, start in (("train", n_train, seed, 0), ("test", n_test, seed + 7919, n_train)):
        tmp = paths[split] + ".tmp"
        with open(tmp, "w") as f:
            for rec in synthetic_records(n, s, max_filler, min_filler, start):
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, paths[split])
    (folder / "README.txt").write_text(SYNTHETIC_NOTE + "\n")
    stamp.write_text(json.dumps(spec))
    return paths
