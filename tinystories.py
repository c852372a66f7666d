"""
The TinyStories data pipeline, as in llama2.c's tinystories.py:

    python tinystories.py download                      # fetch + extract data/TinyStories_all_data/
    python tinystories.py synth                         # OR: an offline synthetic corpus, same layout
    python tinystories.py train_vocab --vocab_size=512  # data/tok512.model + data/tok512.bin
    python tinystories.py pretokenize --vocab_size=512  # data/tok512/data00.bin ...
    python tinystories.py pretokenize                   # Llama 2 vocab: data/TinyStories_all_data/data00.bin ...

and the batch loader that train.py uses (BatchLoader). Layout under the data dir (default `data/`, or
$LLAMA2_DATA_DIR, or --data_dir):

    TinyStories_all_data.tar.gz          the downloaded archive (.part while downloading)
    TinyStories_all_data/data00.json     json shards: a list of {"story": ..., ...} objects
    TinyStories_all_data/data00.bin      shards pretokenized with the Llama 2 vocab (vocab_size 0 / 32000)
    tok512.model, tok512.bin             a custom vocabulary (SentencePiece model, llama2.c tokenizer.bin)
    tok512/data00.bin                    shards pretokenized with it
    */meta.json                          what the shards were made with (vocab_size, tokenizer, token counts)

A shard .bin is a flat array of uint16 token ids: each story is BOS + its tokens, no EOS.
The first shard is the validation split, the rest are the training split.
"""

import argparse
import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from multiprocessing import Pool

import numpy as np
import requests
import torch
import urllib3
from tqdm import tqdm

from tokenizer import Tokenizer, TokenizerError

DATA_DIR = os.environ.get("LLAMA2_DATA_DIR", "data")
BASE_URL = os.environ.get(
    "TINYSTORIES_BASE_URL", "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
)
ARCHIVE = "TinyStories_all_data.tar.gz"
CORPUS = "TinyStories_all_data"  # the directory the archive extracts to
LLAMA2_VOCAB_SIZE = 32000  # vocab_size 32000 (or 0 on the command line) = the Llama 2 tokenizer
LLAMA2_TOKENIZER = "tokenizer.model"
MIN_VOCAB_SIZE = 260  # 256 byte-fallback pieces + <unk>, <s>, </s> + at least one merge
MAX_VOCAB_SIZE = 65535  # ids are stored as uint16
SYNTHETIC_MARKER = "SYNTHETIC.txt"


class DataError(Exception):
    """A problem with the data the user can fix; the message is one line, shown as is."""


def corpus_dir(data_dir: str = DATA_DIR) -> str:
    return os.path.join(data_dir, CORPUS)


def json_shards(data_dir: str = DATA_DIR) -> list[str]:
    return sorted(glob.glob(os.path.join(corpus_dir(data_dir), "data*.json")))


def shard_dir(vocab_size: int, data_dir: str = DATA_DIR) -> str:
    """Where the pretokenized shards for this vocab live: beside the json for the Llama 2 vocab
    (vocab_size 32000, or 0), in data/tok{N}/ for a custom vocab of N pieces."""
    if vocab_size in (0, LLAMA2_VOCAB_SIZE):
        return corpus_dir(data_dir)
    return os.path.join(data_dir, f"tok{vocab_size}")


def is_synthetic(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SYNTHETIC_MARKER))


# -----------------------------------------------------------------------------
# download: stream the archive with resume + retries, then extract it safely


class RetryableError(Exception):
    pass


def download_file(url: str, dest: str, sha256: str | None = None, retries: int = 5, backoff: float = 2.0,
                  chunk_size: int = 1 << 20, timeout: float = 60.0) -> str:
    """Download url to dest through dest.part, resuming a partial .part with an HTTP Range request.
    Connection errors, cut-off transfers and 5xx answers are retried `retries` times, waiting
    backoff, 2*backoff, 4*backoff... seconds. dest appears (atomic rename) only once complete."""
    part = dest + ".part"
    for attempt in range(retries + 1):
        try:
            _download_once(url, part, chunk_size, timeout)
            break
        except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, RetryableError) as e:
            if attempt == retries:
                raise DataError(f"download of {url} failed after {retries + 1} tries: {e}") from None
            wait = backoff * 2 ** attempt
            print(f"download interrupted ({e}); retrying in {wait:.1f}s", file=sys.stderr)
            time.sleep(wait)
    if sha256 is not None:
        got = file_sha256(part)
        if got != sha256.lower():
            os.remove(part)  # the bytes are wrong; resuming from them would never help
            raise DataError(f"{url}: sha256 {got} does not match the expected {sha256}; removed the download")
    os.replace(part, dest)
    return dest


def _download_once(url: str, part: str, chunk_size: int, timeout: float) -> None:
    """One request: continue part from where it stops (or start it). Raises RetryableError if the
    transfer stops short, DataError for answers retrying cannot fix (404...)."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Accept-Encoding": "identity"}  # the raw bytes, so offsets mean what they say
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416:  # nothing left at that offset: "Content-Range: bytes */total"
            if r.headers.get("Content-Range", "").rpartition("/")[2] == str(offset):
                return  # the .part was complete already (stopped before its rename)
            os.remove(part)  # our .part is longer than the file: start again
            raise RetryableError(f"server refused resuming at byte {offset}; restarting from zero")
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise RetryableError(f"HTTP {r.status_code} from {url}")
        if r.status_code not in (200, 206):
            raise DataError(f"HTTP {r.status_code} from {url}")
        if r.status_code == 206:  # a resumed transfer: "Content-Range: bytes start-end/total"
            start, total = _parse_content_range(r.headers.get("Content-Range", ""))
            if start != offset:
                os.remove(part)
                raise RetryableError(f"server resumed at byte {start}, not {offset}; restarting from zero")
            mode = "ab"
        else:  # 200: the whole file, whether we asked for a range or not
            if offset > 0:
                print(f"server ignored the Range request; downloading {url} from the start", file=sys.stderr)
            offset = 0
            length = r.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=os.path.basename(url)) as bar:
            # read1: whatever has arrived (up to chunk_size), so a cut connection loses no received bytes
            read = getattr(r.raw, "read1", r.raw.read)  # (read1 is urllib3 >= 2.2)
            for chunk in iter(lambda: read(chunk_size), b""):
                f.write(chunk)
                bar.update(len(chunk))
    size = os.path.getsize(part)
    if total is not None and size < total:
        raise RetryableError(f"connection closed at byte {size} of {total}")
    if total is not None and size > total:
        os.remove(part)
        raise RetryableError(f"got {size} bytes but the server announced {total}; restarting from zero")


def _parse_content_range(value: str) -> tuple[int, int | None]:
    try:  # "bytes 100-999/1000" (total may be "*")
        unit, spec = value.split(" ", 1)
        span, total = spec.split("/")
        assert unit == "bytes"
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except (ValueError, AssertionError):
        raise RetryableError(f"bad Content-Range header {value!r}") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract(archive: str, data_dir: str = DATA_DIR) -> str:
    """Extract the archive to data_dir/TinyStories_all_data/ via a temporary directory beside it, which
    is checked (no member outside it, every json shard a json list) and then renamed into place. On any
    problem the temporary directory is removed and an existing corpus directory is left untouched."""
    target = corpus_dir(data_dir)
    tmp = tempfile.mkdtemp(prefix=f".{CORPUS}.tmp-", dir=data_dir)
    bad = f"{archive}: corrupt or incomplete archive"
    hint = "delete it and run `python tinystories.py download` again"
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in tqdm(tar, desc="extracting", unit=" files"):  # one pass; a damaged gzip fails on the way
                    name = m.name.replace("\\", "/")
                    if name.startswith("/") or ".." in name.split("/") or not (m.isfile() or m.isdir()):
                        raise DataError(f"{archive}: unsafe archive member {m.name!r}; {hint}")
                    tar.extract(m, tmp, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"{bad} ({str(e) or type(e).__name__}); {hint}") from None
        src = tmp
        if not glob.glob(os.path.join(tmp, "data*.json")):  # the shards may sit in one folder in the archive
            subdirs = [d for d in glob.glob(os.path.join(tmp, "*")) if os.path.isdir(d)]
            if len(subdirs) == 1:
                src = subdirs[0]
        shards = sorted(glob.glob(os.path.join(src, "data*.json")))
        if not shards:
            raise DataError(f"{bad} (no data*.json inside); {hint}")
        for path in tqdm(shards, desc="checking the json shards"):
            try:
                with open(path, encoding="utf-8") as f:
                    stories = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{bad} ({os.path.basename(path)}: {e}); {hint}") from None
            if not isinstance(stories, list):
                raise DataError(f"{bad} ({os.path.basename(path)} is not a json list); {hint}")
        old = None
        if os.path.exists(target):  # only reached with force, or to replace a synthetic corpus
            old = tempfile.mkdtemp(prefix=f".{CORPUS}.old-", dir=data_dir)
            os.rename(target, os.path.join(old, CORPUS))
        try:
            os.rename(src, target)
        except OSError:
            if old is not None:
                os.rename(os.path.join(old, CORPUS), target)
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download(data_dir: str = DATA_DIR, base_url: str = BASE_URL, sha256: str | None = None, retries: int = 5,
             backoff: float = 2.0, force: bool = False) -> str:
    """Download and extract TinyStories, skipping what is already done."""
    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, ARCHIVE)
    if os.path.exists(archive):
        print(f"{archive} already downloaded")
        if sha256 is not None and file_sha256(archive) != sha256.lower():
            raise DataError(f"{archive}: sha256 does not match {sha256}; delete it to download it again")
    else:
        url = base_url.rstrip("/") + "/" + ARCHIVE
        print(f"downloading {url} to {archive}")
        download_file(url, archive, sha256=sha256, retries=retries, backoff=backoff)
    target = corpus_dir(data_dir)
    if os.path.isdir(target) and json_shards(data_dir) and not force:
        if not is_synthetic(target):
            print(f"{target} already extracted")
            return target
        print(f"{target} holds a synthetic corpus; replacing it with the downloaded one")
    print(f"extracting {archive} to {target}")
    extract(archive, data_dir)
    print(f"{len(json_shards(data_dir))} shards in {target}")
    return target


# -----------------------------------------------------------------------------
# synth: an offline, seeded, TinyStories-like corpus in the same layout (clearly marked synthetic)

GIRLS = ["Lily", "Mia", "Sue", "Amy", "Emma", "Lucy", "Anna", "Sara", "Zoe", "Ella", "Kim", "Rose", "Jane", "Molly"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Bob", "Joe", "Finn", "Jake", "Dan", "Timmy", "Billy"]
ANIMALS = [("cat", "Kitty"), ("dog", "Spot"), ("bunny", "Hoppy"), ("bird", "Tweety"), ("bear", "Fuzzy"),
           ("duck", "Quack"), ("frog", "Hop"), ("mouse", "Squeak"), ("puppy", "Buddy"), ("fox", "Red"),
           ("turtle", "Shelly"), ("lion", "Leo"), ("pig", "Pinky"), ("owl", "Hoot")]
KID_ADJS = ["little", "happy", "kind", "curious", "small", "brave", "shy", "silly", "sweet", "cheerful"]
ANIMAL_ADJS = ["little", "fluffy", "friendly", "small", "playful", "furry", "lazy", "fast", "cute", "brave"]
PLACES = {  # place: (how to say "at" it, where something can hide there)
    "park": ("at the park", ["under a big tree", "behind a bench", "in the tall grass", "near the slide"]),
    "garden": ("in the garden", ["under a big leaf", "behind the flowers", "next to a tomato plant"]),
    "forest": ("in the forest", ["under a log", "behind a big rock", "in a bush", "near a little stream"]),
    "beach": ("at the beach", ["under the sand", "behind a rock", "in a big shell", "next to a sand castle"]),
    "backyard": ("in the backyard", ["behind the shed", "under the swing", "in the doghouse", "under a bucket"]),
    "farm": ("on the farm", ["in the hay", "behind the barn", "near the pig pen", "under a wagon"]),
    "playground": ("at the playground", ["under the slide", "behind the swings", "in the sandbox"]),
}
OBJECTS = [("ball", ["red", "big", "bouncy", "blue"]), ("kite", ["yellow", "big", "pretty"]),
           ("teddy bear", ["soft", "brown", "old"]), ("toy car", ["red", "fast", "shiny"]),
           ("doll", ["pretty", "little", "pink"]), ("hat", ["funny", "green", "big"]),
           ("book", ["colorful", "big", "new"]), ("blanket", ["soft", "warm", "blue"]),
           ("stone", ["shiny", "smooth", "sparkly"]), ("drum", ["loud", "little", "red"]),
           ("boat", ["toy", "little", "wooden"]), ("crown", ["gold", "shiny", "sparkly"]),
           ("box of crayons", ["new", "big"]), ("flower", ["pretty", "yellow", "purple"])]
TREATS = ["a cookie", "an apple", "some candy", "a cupcake", "some berries", "a banana", "a piece of cake"]
FEARS = [("the dark", "the room was very dark"), ("the big slide", "the slide was very tall"),
         ("the water", "the waves were big"), ("the loud thunder", "the thunder went boom"),
         ("the big dog next door", "the dog barked very loud"), ("the tall tree", "the tree was very high")]
SKILLS = [("ride a bike", "fell down", "rode all the way down the street"),
          ("climb a tree", "slipped and fell on the grass", "climbed up to the top branch"),
          ("jump rope", "tripped on the rope", "jumped ten times in a row"),
          ("swim", "swallowed some water", "swam all the way to the other side"),
          ("catch a ball", "missed the ball", "caught the ball with both hands"),
          ("build a tall tower of blocks", "knocked the tower over", "built a tower taller than the chair")]
FRAGILE = [("vase", "mom"), ("cup", "dad"), ("plate", "mom"), ("lamp", "dad"), ("bowl", "grandma"),
           ("clock", "grandpa")]
SCENES = ["{He} lived with {his} mom and dad in a little house.", "{He} liked to play outside every day.",
          "The sun was shining and the sky was blue.", "{He} had lots of toys, but {he} had a favorite.",
          "{Name} was only three years old, but {he} was very smart.", "{He} always wanted to have fun."]
HAPPY = ["happy", "glad", "excited", "proud", "joyful"]
SAD = ["sad", "upset", "worried", "unhappy"]
OPENINGS = ["Once upon a time, there was {a_hero}.", "Once upon a time, there was {a_hero}.",
            "One day, {a_hero} went out to play.", "There once was {a_hero}.",
            "In a small town, there lived {a_hero}.", "Once there was {a_hero} who loved to play."]
MORALS = {
    "lost": ["{Name} learned that friends always help each other.", "Good friends make hard things easy.",
             "From that day on, {name} took good care of {his} {obj}."],
    "share": ["{Name} learned that sharing is caring.", "Playing together is more fun than playing alone.",
              "From that day on, {name} always shared {his} toys."],
    "fear": ["{Name} learned that being brave is not so hard with a friend.",
             "From that day on, {name} was not scared of {fear} anymore."],
    "honest": ["{Name} learned that it is always best to tell the truth.",
               "From that day on, {name} always told the truth, even when it was hard."],
    "help": ["{Name} learned that being kind to others makes you happy too.",
             "Helping others is a good thing to do."],
    "try": ["{Name} learned that if you keep trying, you can do it.", "Practice makes things easier.",
            "From that day on, {name} never gave up."],
}


def make_character(rng: random.Random, avoid: set[str] = frozenset()) -> dict:
    """A story character with its name, how to introduce it, and its pronouns."""
    while True:
        if rng.random() < 0.65:
            girl = rng.random() < 0.5
            name = rng.choice(GIRLS if girl else BOYS)
            kind = "girl" if girl else "boy"
            adj = rng.choice(KID_ADJS)
        else:
            kind, name = rng.choice(ANIMALS)
            girl = rng.random() < 0.5
            if rng.random() < 0.5:  # a pet with a person's name gets that name's pronouns
                name = rng.choice(GIRLS if girl else BOYS)
            adj = rng.choice(ANIMAL_ADJS)
        if name not in avoid:
            break
    article = "an" if adj[0] in "aeiou" else "a"
    he, him, his = ("she", "her", "her") if girl else ("he", "him", "his")
    return {"name": name, "kind": kind, "a_intro": f"{article} {adj} {kind} named {name}",
            "he": he, "him": him, "his": his}


def fill(text: str, v: dict) -> str:
    """str.format with capitalized variants: {He} -> "She", {Name} -> the name at a sentence start."""
    caps = {k[0].upper() + k[1:]: (s[0].upper() + s[1:] if s else s) for k, s in v.items() if isinstance(s, str)}
    return text.format(**v, **caps)


def synth_story(rng: random.Random) -> str:
    """One story: introduction, setup, a problem, dialogue, a resolution and (usually) a moral."""
    hero = make_character(rng)
    friend = make_character(rng, avoid={hero["name"]})
    place = rng.choice(list(PLACES))
    obj, obj_adjs = rng.choice(OBJECTS)
    v = {"name": hero["name"], "a_hero": hero["a_intro"], "he": hero["he"], "him": hero["him"], "his": hero["his"],
         "friend": friend["name"], "a_friend": friend["a_intro"], "fhe": friend["he"], "fhim": friend["him"],
         "fhis": friend["his"], "place": place, "obj": obj, "adj": rng.choice(obj_adjs),
         "at_place": PLACES[place][0], "spot": rng.choice(PLACES[place][1]), "happy": rng.choice(HAPPY),
         "sad": rng.choice(SAD), "treat": rng.choice(TREATS)}
    s = [rng.choice(OPENINGS)]
    if rng.random() < 0.35:
        s.append(rng.choice(SCENES))
    plot = rng.choice(list(MORALS))
    if plot == "lost":
        s += [rng.choice(["{He} had a {adj} {obj} that {he} loved very much.",
                          "{Name} loved {his} {adj} {obj}. {He} took it everywhere."]),
              rng.choice(["One sunny day, {name} took {his} {obj} to the {place}.",
                          "One day, {name} went to the {place} with {his} {obj}."]),
              rng.choice(["{He} played and played until the sun was low.", "{He} ran and jumped and had lots of fun."]),
              rng.choice(["When it was time to go home, {name} could not find {his} {obj}!",
                          "But then {name} looked down. {His} {obj} was gone!"]),
              "{Name} felt very {sad}. " + rng.choice(['"Where is my {obj}?" {he} cried.',
                                                        '"Oh no! I lost my {obj}!" {he} said.']),
              rng.choice(["Just then, {a_friend} came by.", "Then {name} saw {his} friend {friend}."]),
              rng.choice(['"Why are you sad?" asked {friend}.', '"What is wrong?" {friend} asked.']),
              '"I can not find my {obj}," said {name}. "Will you help me look?"',
              rng.choice(['"Yes, I will help you!" said {friend}.', '{Friend} smiled and said, "Of course!"']),
              "They looked everywhere. At last, {friend} found the {obj} {spot}.",
              rng.choice(['"Here it is!" {fhe} said.', '"I found it!" {fhe} shouted.']),
              "{Name} was so {happy}. " + rng.choice(['"Thank you, {friend}!" {he} said.',
                                                     "{He} gave {friend} a big hug."])]
    elif plot == "share":
        s += [rng.choice(["{Name} had a new {obj}. It was {adj} and {he} liked it a lot.",
                          "One day, {name} got a {adj} {obj} as a gift."]),
              "{He} took it to the {place} to play.",
              rng.choice(["{At_place}, {he} met {a_friend}.", "There, {he} saw {a_friend}."]),
              rng.choice(['"Can I play with your {obj}?" asked {friend}.',
                          '"Wow, what a nice {obj}! Can I try?" said {friend}.']),
              rng.choice(['"No, it is mine!" said {name}. {He} held the {obj} close.',
                          '{Name} did not want to share. "Go away," {he} said.']),
              "{Friend} was {sad}. {Fhe} sat down and looked at the ground.",
              rng.choice(["{Name} played alone, but it was not fun.", "Soon {name} did not feel good inside."]),
              rng.choice(["{He} looked at {friend} and felt bad.", "{He} thought about how {friend} felt."]),
              '{Name} walked over to {friend}. "I am sorry. Do you want to play with me?" {he} asked.',
              rng.choice(['{Friend} smiled. "Yes, please!"',
                          '"Thank you!" said {friend}, and {fhe} was very {happy}.']),
              rng.choice(["They played with the {obj} together all day.",
                          "They took turns with the {obj} and laughed a lot."])]
    elif plot == "fear":
        fear, scene = rng.choice(FEARS)
        v["fear"] = fear
        s += [f"{{Name}} was scared of {fear}.",
              rng.choice(["Every time {he} thought about it, {his} tummy felt funny.",
                          f"{{He}} did not like it at all, because {scene}."]),
              rng.choice(["One day, {name} and {friend} were playing {at_place}.",
                          "One day, {name} went to the {place} with {his} friend {friend}."]),
              f"Soon {{he}} had to face {fear}. " + rng.choice(['"I am scared," {he} said in a small voice.',
                                                                 '"I can not do it," {he} said.']),
              rng.choice(['{Friend} held {his} hand. "Do not be scared. I am here with you," {fhe} said.',
                          '"It is okay," said {friend}. "We can do it together."']),
              rng.choice(["{Name} took a deep breath.", "{Name} closed {his} eyes and counted to three."]),
              rng.choice(["It was not so bad after all!", "{He} did it, and nothing bad happened."]),
              "{Name} smiled a big smile. " + rng.choice(['"I did it!" {he} said.', '"That was fun!" {he} said.'])]
    elif plot == "honest":
        thing, who = rng.choice(FRAGILE)
        v.update(thing=thing, who=who)
        s += [rng.choice(["One day, {name} was playing with {his} {obj} in the house.",
                          "It was a rainy day, so {name} played with {his} {obj} inside."]),
              rng.choice(["{He} threw it up high, and it hit {his} {who}'s {thing}.",
                          "{He} ran too fast and bumped into the table with {his} {who}'s {thing}."]),
              "The {thing} fell down and broke into many pieces. Crash!",
              rng.choice(["{Name} was scared. {He} hid behind the couch.",
                          "{Name} felt {sad}. {He} did not know what to do."]),
              rng.choice(['{Who} came in and saw the {thing}. "What happened?" {Who} asked.',
                          '{Who} walked into the room. "Who broke my {thing}?"']),
              "{Name} wanted to say it was not {him}. But {he} knew that lying is wrong.",
              '"I did it," {name} said. "I am sorry. I was playing and it fell."',
              rng.choice(['{Who} gave {him} a hug. "Thank you for telling me the truth," {Who} said.',
                          '{Who} smiled. "It is okay. I am proud of you for being honest."']),
              rng.choice(["Together, they cleaned up the pieces.",
                          "Then they had {treat} and felt much better."])]
    elif plot == "help":
        animal = rng.choice(["bird", "kitten", "puppy", "duck", "bunny", "squirrel"])
        v["animal"] = animal
        s += [rng.choice(["One day, {name} went for a walk {at_place}.",
                          "{Name} liked to play {at_place} every day."]),
              "{He} heard a small sound " + rng.choice(["{spot}.", "near {him}."]),
              "It was a little {animal}. It had a hurt leg and could not move.",
              rng.choice(['"Poor little {animal}," said {name}. "I will help you."',
                          '"Do not worry," {name} said softly. "I will take care of you."']),
              rng.choice(["{He} carried the {animal} home very carefully.", "{He} made a soft bed for it in a box."]),
              rng.choice(["{Name} gave it water and {treat}.", "Every day, {name} fed the {animal} and talked to it."]),
              rng.choice(["{His} friend {friend} came to help too.", "Soon the {animal} felt better and better."]),
              "After a few days, the {animal} was strong again.",
              rng.choice(['"Now you can go home," said {name}, and the {animal} went back to the {place}.',
                          "The {animal} was {happy}. It jumped around and then went back to the {place}."]),
              rng.choice(["{Name} was sad to say goodbye, but {he} was {happy} too.",
                          "Every day after that, the {animal} came to say hello to {name}."])]
    else:  # "try"
        skill, fail, win = rng.choice(SKILLS)
        s += [f"{{Name}} wanted to learn to {skill}.",
              rng.choice([f"{{His}} friend {{friend}} could {skill}, and {{name}} wanted to do it too.",
                          "{He} watched the big kids {at_place} and wished {he} could do it."]),
              f"{{He}} tried, but {{he}} {fail}. " + rng.choice(['"Ouch!" {he} said.', "{He} felt {sad}."]),
              rng.choice(['"I can not do it," {name} said. "It is too hard."',
                          '"I will never learn," {name} said and started to cry.']),
              rng.choice(['{Friend} came over. "Do not give up! Try again," {fhe} said.',
                          '"Everyone falls at first," said {friend}. "Keep trying!"']),
              rng.choice(["So {name} tried again. And again. And again.", "{Name} tried again the next day."]),
              f"At last, {{he}} {win}!",
              rng.choice(['"I did it!" {name} shouted. {He} was so {happy}.',
                          "{Friend} clapped and cheered. {Name} felt very {happy}."])]
    if rng.random() < 0.8:
        s.append(rng.choice(MORALS[plot]))
    return " ".join(fill(x, v) for x in s)


def synth(data_dir: str = DATA_DIR, n_shards: int = 4, stories_per_shard: int = 2500, seed: int = 42,
          force: bool = False) -> str:
    """Write a synthetic corpus to data_dir/TinyStories_all_data/ (via a temporary dir, renamed into place).
    Refuses to replace a corpus that is not synthetic (a real download) unless force."""
    target = corpus_dir(data_dir)
    if os.path.exists(target) and not is_synthetic(target) and not force:
        raise DataError(f"{target} exists and is not synthetic (a downloaded corpus?); "
                        "refusing to overwrite it (use --force to replace it)")
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{CORPUS}.tmp-", dir=data_dir)
    try:
        for i in range(n_shards):
            rng = random.Random(seed * 100003 + i)  # each shard its own stream: same seed, same bytes
            stories = [{"story": synth_story(rng), "source": "synthetic"} for _ in range(stories_per_shard)]
            with open(os.path.join(tmp, f"data{i:02d}.json"), "w", encoding="utf-8") as f:
                json.dump(stories, f)
        with open(os.path.join(tmp, SYNTHETIC_MARKER), "w") as f:
            f.write(f"SYNTHETIC corpus made by `python tinystories.py synth` (seed {seed}, {n_shards} shards x "
                    f"{stories_per_shard} stories). Not TinyStories: template stories for offline tests and demos.\n")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -----------------------------------------------------------------------------
# train_vocab: a custom SentencePiece BPE vocabulary, trained as llama2.c trains it


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces + "
                        f"<unk>, <s>, </s>, so use at least {MIN_VOCAB_SIZE}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"vocab_size {vocab_size} does not fit the uint16 shards (max {MAX_VOCAB_SIZE})")


def train_vocab(vocab_size: int, data_dir: str = DATA_DIR, num_shards: int = 10, input_sentence_size: int = 0) -> str:
    """Train data_dir/tok{N}.model on the stories of the first num_shards shards; export tok{N}.bin."""
    import sentencepiece as spm

    check_vocab_size(vocab_size)
    if vocab_size == LLAMA2_VOCAB_SIZE:
        raise DataError(f"vocab_size {LLAMA2_VOCAB_SIZE} is reserved for the Llama 2 tokenizer; pick another size")
    shards = json_shards(data_dir)
    if not shards:
        raise DataError(f"no data*.json in {corpus_dir(data_dir)}; run `python tinystories.py download` "
                        "(or `synth`) first")
    prefix = os.path.join(data_dir, f"tok{vocab_size}")
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        text_file = os.path.join(tmp, "stories.txt")
        with open(text_file, "w", encoding="utf-8") as f:
            for path in tqdm(shards[:num_shards], desc="writing training text"):
                with open(path, encoding="utf-8") as jf:
                    for example in json.load(jf):
                        f.write(example["story"].strip() + "\n")
        print(f"training a {vocab_size}-piece BPE vocabulary on {os.path.getsize(text_file) / 1e6:.1f} MB of text")
        try:
            spm.SentencePieceTrainer.train(
                input=text_file, model_prefix=os.path.join(tmp, "tok"), model_type="bpe", vocab_size=vocab_size,
                self_test_sample_size=0, input_format="text", character_coverage=1.0,
                num_threads=os.cpu_count(), split_digits=True, allow_whitespace_only_pieces=True,
                byte_fallback=True, unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
                # the C encoder (and Llama 2) prepend a dummy space to the text, as SentencePiece does by default
                add_dummy_prefix=True, input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                minloglevel=2)
        except RuntimeError as e:
            raise DataError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: "
                            f"{str(e).strip().splitlines()[-1]}") from None
        os.replace(os.path.join(tmp, "tok.model"), prefix + ".model")
    out = Tokenizer(prefix + ".model").export_bin()
    print(f"wrote {prefix}.model and {out}")
    return prefix + ".model"


# -----------------------------------------------------------------------------
# pretokenize: every json shard to a flat uint16 .bin, one shard per worker process


def tokenizer_path(vocab_size: int, data_dir: str = DATA_DIR, tokenizer: str = LLAMA2_TOKENIZER) -> str:
    return tokenizer if vocab_size in (0, LLAMA2_VOCAB_SIZE) else os.path.join(data_dir, f"tok{vocab_size}.model")


def _tokenize_shard(job: tuple[str, str, str]) -> dict:
    json_path, model_path, out_dir = job
    enc = Tokenizer(model_path)
    with open(json_path, encoding="utf-8") as f:
        stories = [example["story"].strip() for example in json.load(f)]
    ids = enc.sp.encode(stories, add_bos=True)  # batched in C++: each story BOS + tokens, no EOS
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(map(len, ids)))
    max_id = int(tokens.max()) if tokens.size else 0
    assert max_id <= MAX_VOCAB_SIZE, f"token id {max_id} does not fit uint16"
    out = os.path.join(out_dir, os.path.basename(json_path)[: -len(".json")] + ".bin")
    tmp = out + ".tmp"
    tokens.astype(np.uint16).tofile(tmp)
    os.replace(tmp, out)
    return {"shard": os.path.basename(out), "stories": len(stories), "n_tokens": int(tokens.size),
            "max_id": max_id, "json_bytes": os.path.getsize(json_path)}


def pretokenize(vocab_size: int = 0, data_dir: str = DATA_DIR, tokenizer: str = LLAMA2_TOKENIZER,
                workers: int | None = None) -> dict:
    """Tokenize every json shard (vocab_size 0 or 32000: the Llama 2 tokenizer at `tokenizer`; else
    data_dir/tok{N}.model). Writes the .bin shards and meta.json; returns {stories, tokens, seconds}."""
    model_path = tokenizer_path(vocab_size, data_dir, tokenizer)
    enc = Tokenizer(model_path)
    if enc.n_words > MAX_VOCAB_SIZE + 1:
        raise DataError(f"{model_path} has {enc.n_words} pieces: ids above {MAX_VOCAB_SIZE} do not fit uint16 shards")
    if vocab_size not in (0, LLAMA2_VOCAB_SIZE) and enc.n_words != vocab_size:
        raise DataError(f"{model_path} has {enc.n_words} pieces, not {vocab_size}")
    shards = json_shards(data_dir)
    if not shards:
        raise DataError(f"no data*.json in {corpus_dir(data_dir)}; run `python tinystories.py download` "
                        "(or `synth`) first")
    out_dir = shard_dir(vocab_size, data_dir)
    os.makedirs(out_dir, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, len(shards))
    t0 = time.time()
    jobs = [(path, model_path, out_dir) for path in shards]
    with Pool(workers) as pool:
        results = list(tqdm(pool.imap_unordered(_tokenize_shard, jobs), total=len(jobs), desc="pretokenize"))
    seconds = time.time() - t0
    results.sort(key=lambda r: r["shard"])
    for path in glob.glob(os.path.join(out_dir, "data*.bin")):  # shards of json files that are gone
        if os.path.basename(path) not in {r["shard"] for r in results}:
            os.remove(path)
    meta = {"vocab_size": enc.n_words, "tokenizer": os.path.abspath(model_path),
            "tokenizer_sha256": file_sha256(model_path), "synthetic": is_synthetic(corpus_dir(data_dir)),
            "shards": {r["shard"]: {k: r[k] for k in ("stories", "n_tokens", "max_id", "json_bytes")}
                       for r in results}}
    with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    stats = {"stories": sum(r["stories"] for r in results), "tokens": sum(r["n_tokens"] for r in results),
             "seconds": seconds, "stories_per_s": sum(r["stories"] for r in results) / max(seconds, 1e-9)}
    print(f"pretokenized {stats['stories']} stories ({stats['tokens']} tokens) into {out_dir} in {seconds:.1f}s: "
          f"{stats['stories_per_s']:.0f} stories/s, {workers} workers")
    return stats


# -----------------------------------------------------------------------------
# the batch loader for train.py


_checked_shards: set = set()  # shard sets already checked against a vocab_size


class BatchLoader:
    """Random (max_seq_len+1)-token windows from memory-mapped uint16 shards.

    vocab_size picks the shards (see shard_dir): 32000 means the Llama 2 vocab shards beside the json
    (data/TinyStories_all_data/data*.bin), any other N the custom tok{N} shards (data/tok{N}/data*.bin).
    split "val" is the first shard, "train" the others; at least two shards are needed.
    Batch k is a pure function of (seed, rank, split, k): a shard (weighted by length) and B window starts
    drawn by np.random.default_rng([seed, rank, split, k]), so state_dict() (the next k) resumes exactly.
    """

    def __init__(self, split: str, batch_size: int, max_seq_len: int, vocab_size: int,
                 data_dir: str = DATA_DIR, seed: int = 1337, rank: int = 0, device: str = "cpu"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.split, self.batch_size, self.max_seq_len, self.vocab_size = split, batch_size, max_seq_len, vocab_size
        self.seed, self.rank, self.device, self.data_dir, self.batch_index = seed, rank, device, data_dir, 0
        self.pin = str(device).startswith("cuda") and torch.cuda.is_available()
        d = shard_dir(vocab_size, data_dir)
        cli_vocab = 0 if vocab_size == LLAMA2_VOCAB_SIZE else vocab_size
        todo = f"run `python tinystories.py pretokenize --vocab_size={cli_vocab}` first"
        paths = sorted(glob.glob(os.path.join(d, "data*.bin")))
        if not paths:
            raise DataError(f"no pretokenized shards (data*.bin) in {d}; {todo}")
        if len(paths) < 2:
            raise DataError(f"only one shard in {d}: the first shard is the val split, so training needs at least "
                            "two (make more shards, e.g. `python tinystories.py synth --n_shards 4`, and pretokenize)")
        key = (d, vocab_size, tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in paths))
        if key not in _checked_shards:  # once per process: train.py makes a fresh loader for every eval
            self._check_meta(d, paths, todo)
            _checked_shards.add(key)
        paths = paths[:1] if split == "val" else paths[1:]
        shards = [np.memmap(p, dtype=np.uint16, mode="r") for p in paths]  # opened once, kept open
        keep = [i for i, s in enumerate(shards) if len(s) >= max_seq_len + 1]
        if not keep:
            longest = max(len(s) for s in shards)
            raise DataError(f"the {split} shards in {d} are too short for max_seq_len {max_seq_len} (need "
                            f"{max_seq_len + 1} tokens, the longest has {longest}); lower max_seq_len or add data")
        self.paths = [paths[i] for i in keep]
        self.shards = [shards[i] for i in keep]
        n_windows = np.array([len(s) - max_seq_len for s in self.shards], dtype=np.float64)
        self.weights = n_windows / n_windows.sum()
        self.offsets = np.arange(max_seq_len + 1)

    def _check_meta(self, d: str, paths: list[str], todo: str) -> None:
        meta_path = os.path.join(d, "meta.json")
        if not os.path.exists(meta_path):  # shards made by other tools (llama2.c): check the ids themselves
            print(f"warning: no meta.json in {d}; checking token ids against vocab_size {self.vocab_size}",
                  file=sys.stderr)
            for p in paths:
                if os.path.getsize(p) >= 2 and int(np.memmap(p, dtype=np.uint16, mode="r").max()) >= self.vocab_size:
                    raise DataError(f"{p} holds token ids >= vocab_size {self.vocab_size}: it was made with another "
                                    f"vocabulary; {todo}")
            return
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["vocab_size"] != self.vocab_size:
            raise DataError(f"the shards in {d} were tokenized with a {meta['vocab_size']}-piece vocabulary but "
                            f"vocab_size is {self.vocab_size}; fix vocab_size or {todo}")
        corpus = corpus_dir(self.data_dir)
        for p in paths:
            info = meta["shards"].get(os.path.basename(p))
            if info is None or os.path.getsize(p) != 2 * info["n_tokens"]:
                raise DataError(f"{p} does not match {meta_path} (an interrupted or older pretokenize); {todo}")
            if info["max_id"] >= self.vocab_size:
                raise DataError(f"{p} holds token id {info['max_id']} >= vocab_size {self.vocab_size}; {todo}")
            json_path = os.path.join(corpus, os.path.basename(p)[: -len(".bin")] + ".json")
            if os.path.exists(json_path) and os.path.getsize(json_path) != info["json_bytes"]:
                raise DataError(f"{p} is stale: {json_path} changed since it was pretokenized; {todo}")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        split_id = 0 if self.split == "train" else 1
        rng = np.random.default_rng([self.seed, self.rank, split_id, self.batch_index])
        self.batch_index += 1
        shard = self.shards[rng.choice(len(self.shards), p=self.weights)]
        starts = rng.integers(0, len(shard) - self.max_seq_len, size=self.batch_size)
        windows = torch.from_numpy(shard[starts[:, None] + self.offsets].astype(np.int64))  # (B, T+1)
        if self.pin:
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        elif self.device != "cpu":
            windows = windows.to(self.device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"batch_index": self.batch_index, "seed": self.seed, "rank": self.rank, "split": self.split}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state: the next batch is batch number state["batch_index"] of state["seed"].
        The rank stays this loader's own, so every DDP rank can load rank 0's checkpoint."""
        self.batch_index = int(state["batch_index"])
        self.seed = int(state["seed"])


# -----------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data_dir", default=DATA_DIR, help="data directory (default: $LLAMA2_DATA_DIR or data/)")
    parser = argparse.ArgumentParser(description="TinyStories data: download, synth, train_vocab, pretokenize")
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("download", parents=[common], help="download and extract TinyStories")
    p.add_argument("--base_url", default=BASE_URL, help="where TinyStories_all_data.tar.gz lives "
                   "(default: $TINYSTORIES_BASE_URL or Hugging Face)")
    p.add_argument("--sha256", default=None, help="expected sha256 of the archive")
    p.add_argument("--retries", type=int, default=5, help="retries on connection errors and 5xx answers")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry wait in seconds (doubles each time)")
    p.add_argument("--force", action="store_true", help="extract again even if the corpus directory exists")
    p = sub.add_parser("synth", parents=[common], help="write an offline synthetic TinyStories-like corpus")
    p.add_argument("--n_shards", type=int, default=4)
    p.add_argument("--stories_per_shard", type=int, default=2500)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--force", action="store_true", help="replace a corpus that is not synthetic")
    p = sub.add_parser("train_vocab", parents=[common], help="train a custom SentencePiece BPE vocabulary")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--num_shards", type=int, default=10, help="train on the text of the first N shards")
    p.add_argument("--input_sentence_size", type=int, default=0, help="sample this many stories (0: all)")
    p = sub.add_parser("pretokenize", parents=[common], help="tokenize the json shards into uint16 .bin shards")
    p.add_argument("--vocab_size", type=int, default=0, help="0: the Llama 2 tokenizer; N: data/tok{N}.model")
    p.add_argument("--tokenizer", default=LLAMA2_TOKENIZER, help="the Llama 2 tokenizer.model (for vocab_size 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        if args.stage == "download":
            download(args.data_dir, args.base_url, args.sha256, args.retries, args.backoff, args.force)
        elif args.stage == "synth":
            t0 = time.time()
            target = synth(args.data_dir, args.n_shards, args.stories_per_shard, args.seed, args.force)
            size = sum(os.path.getsize(p) for p in json_shards(args.data_dir))
            print(f"wrote a synthetic corpus (NOT TinyStories): {args.n_shards} shards x {args.stories_per_shard} "
                  f"stories, {size / 1e6:.1f} MB, in {target} ({time.time() - t0:.1f}s)")
        elif args.stage == "train_vocab":
            train_vocab(args.vocab_size, args.data_dir, args.num_shards, args.input_sentence_size)
        elif args.stage == "pretokenize":
            if args.vocab_size not in (0, LLAMA2_VOCAB_SIZE):
                check_vocab_size(args.vocab_size)
            pretokenize(args.vocab_size, args.data_dir, args.tokenizer, args.workers)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
