"""An offline corpus of TinyStories-like stories, for tests and demos that cannot download the real one.

    python tinystories.py synth --n_shards 4 --stories_per_shard 2500   # data/TinyStories_all_data/

Each story is filled in from templates: a hero and a friend (children or animals, with consistent
pronouns), a place, a toy, and one of six plots (something lost, sharing, a fear, honesty, helping,
trying again), usually ending with a moral. write_corpus() gives the corpus TinyStories' layout
(data00.json ... each a json list of {"story": ..., "source": "synthetic"}) plus a SYNTHETIC.txt
marker, so it is never mistaken for the real data. The same seed gives the same bytes.
"""

import json
import os
import random
import shutil
import tempfile

SYNTHETIC_MARKER = "SYNTHETIC.txt"

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


def is_synthetic(corpus: str) -> bool:
    """Whether the corpus directory was written by write_corpus (it holds the marker)."""
    return os.path.isfile(os.path.join(corpus, SYNTHETIC_MARKER))


def write_corpus(target: str, n_shards: int = 4, stories_per_shard: int = 2500, seed: int = 42) -> str:
    """Write n_shards json shards and the marker to the directory `target`, replacing what is there.
    They are written to a temporary directory beside it, which is then renamed into place."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(os.path.abspath(target)))
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
