"""Write prompt_suites/calibration-general.txt: ordinary, varied prompts for head-relevance calibration of real
checkpoints (the prompts HRV-style calibration generates from; they need breadth of subject, not cleverness).

Prompts are drawn, seeded, from hand-written scene templates (animals, people, food, vehicles, rooms, landscapes,
buildings, still lifes, art styles, pairs of objects, counts, clothing) and de-duplicated:

    .venv/bin/python bench/calibration_prompts.py [--n 600]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "prompt_suites" / "calibration-general.txt"

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "pink", "brown", "grey",
           "golden", "silver", "teal", "navy blue", "pale green", "dark red", "cream"]
ANIMALS = ["dog", "cat", "horse", "fox", "owl", "rabbit", "deer", "bear", "elephant", "giraffe", "zebra", "lion",
           "tiger", "wolf", "squirrel", "duck", "swan", "parrot", "penguin", "goat", "sheep", "cow", "frog",
           "turtle", "butterfly", "hedgehog", "raccoon", "otter", "koala", "camel", "dolphin", "eagle", "puppy",
           "kitten", "hummingbird", "goldfish", "lizard", "donkey", "pig", "chicken"]
ANIMAL_DOING = ["sleeping", "running", "sitting", "standing", "resting", "playing", "looking at the camera",
                "drinking water", "walking", "curled up", "eating", "jumping"]
PLACES = ["on a sandy beach", "in a snowy forest", "in a green meadow", "on a wooden porch", "in a city park",
          "by a quiet lake", "in tall grass", "on a rocky hillside", "in a sunlit garden", "on a mountain trail",
          "in the desert", "under a large oak tree", "on a country road", "beside a river", "in a field of flowers",
          "on a city street", "in a backyard", "at the edge of a pond", "in a bamboo forest", "on a frozen lake"]
PEOPLE = ["woman", "man", "girl", "boy", "old man", "old woman", "child", "fisherman", "chef", "doctor", "farmer",
          "firefighter", "painter", "musician", "dancer", "astronaut", "soldier", "nurse", "teacher", "baker",
          "cyclist", "surfer", "skateboarder", "gardener", "student", "police officer", "climber", "pilot"]
PEOPLE_DOING = ["reading a book", "drinking coffee", "riding a bicycle", "playing the guitar", "walking a dog",
                "holding an umbrella", "cooking dinner", "painting a picture", "taking a photograph",
                "carrying a basket", "talking on the phone", "waiting for a bus", "laughing with friends",
                "looking out of a window", "sitting on a bench", "working on a laptop", "planting flowers",
                "flying a kite", "eating an apple", "writing a letter"]
SETTINGS = ["in a busy cafe", "in a small kitchen", "on a train platform", "in a library", "at the beach",
            "in a park", "on a balcony", "in an office", "at a market", "on a rooftop", "in a classroom",
            "by the window", "in the rain", "at sunset", "in a garden", "on a crowded street"]
DISHES = ["bowl of ramen", "plate of pasta", "slice of pizza", "stack of pancakes", "cup of coffee",
          "glass of orange juice", "bowl of fruit", "chocolate cake", "cheeseburger", "plate of sushi",
          "loaf of bread", "bowl of soup", "green salad", "basket of strawberries", "cup of tea", "plate of cookies",
          "bowl of cereal", "piece of cheese", "pot of stew", "tray of croissants", "bunch of bananas",
          "watermelon", "pineapple", "lemon", "pear", "basket of apples", "bowl of cherries", "sandwich", "taco",
          "ice cream cone"]
SURFACES = ["a wooden table", "a marble counter", "a white plate", "a checkered tablecloth", "a kitchen counter",
            "a picnic blanket", "a glass table", "a stone slab", "a cutting board", "a metal tray"]
VEHICLES = {  # vehicle -> where it plausibly is
    "road": (["car", "bus", "truck", "bicycle", "motorcycle", "tram", "tractor", "van", "scooter", "taxi", "jeep",
              "fire truck", "school bus", "race car", "vintage car", "pickup truck"],
             ["parked on a quiet street", "driving through the desert", "on a mountain road",
              "in front of an old house", "crossing a bridge", "in a parking lot", "on a dirt road", "in the snow",
              "by the sea", "at a gas station", "in a busy city", "under a cloudy sky"]),
    "water": (["boat", "sailboat", "canoe", "ferry", "fishing boat"],
              ["on a calm lake", "in a small harbour", "on the open sea", "on a river at dawn", "near a rocky shore"]),
    "air": (["airplane", "helicopter", "hot air balloon", "glider"],
            ["flying over the mountains", "in a clear blue sky", "above the clouds", "over a city at dusk"]),
    "rail": (["train", "steam locomotive", "tram"],
             ["crossing a viaduct", "at a station", "running through the countryside", "in the snow"]),
}
ROOMS = ["living room", "bedroom", "kitchen", "bathroom", "study", "dining room", "attic", "hotel room",
         "classroom", "workshop"]
FURNITURE = ["sofa", "armchair", "bed", "bookshelf", "desk", "dining table", "rocking chair", "wardrobe",
             "coffee table", "lamp", "rug", "mirror", "fireplace", "piano", "bench"]
THINGS = ["vase of flowers", "potted plant", "clock", "teapot", "laptop", "guitar", "backpack", "umbrella",
          "candle", "book", "camera", "telephone", "basket", "bottle", "mug", "globe", "pair of shoes", "hat",
          "violin", "typewriter", "radio", "kettle", "suitcase", "painting", "television", "wine glass",
          "wooden spoon", "teddy bear", "hammer", "pair of scissors", "watering can"]
MADE_OF = {  # object -> materials it is plausibly made of
    "bowl": ["wooden", "glass", "ceramic", "copper", "stone", "porcelain"], "vase": ["glass", "ceramic", "porcelain", "brass"],
    "chair": ["wooden", "metal", "plastic", "wicker", "leather"], "box": ["wooden", "metal", "cardboard", "velvet"],
    "lamp": ["brass", "glass", "paper", "copper"], "jug": ["ceramic", "glass", "copper", "clay"],
    "bag": ["leather", "woven", "canvas", "paper"], "teapot": ["ceramic", "porcelain", "cast iron", "glass"],
    "statue": ["marble", "bronze", "stone", "wooden"], "basket": ["woven", "wicker", "wire"],
    "cup": ["ceramic", "glass", "tin", "paper"], "clock": ["wooden", "brass", "plastic"],
}
LANDSCAPES = ["a mountain lake", "a snowy mountain range", "rolling green hills", "a desert with sand dunes",
              "a tropical beach", "a pine forest", "a waterfall in the jungle", "a wheat field", "a rocky coastline",
              "a lavender field", "a river valley", "a canyon", "a frozen tundra", "a misty swamp", "a volcano",
              "a glacier", "an autumn forest", "a rice terrace", "a cliff above the sea", "a small island"]
TIMES = ["at sunrise", "at sunset", "at night", "at dusk", "at noon", "under a starry sky", "in the morning",
         "in golden hour light", "under a full moon", "on a foggy morning"]
WEATHER = ["with heavy rain", "in thick fog", "under storm clouds", "with falling snow", "on a clear day",
           "with a rainbow", "in strong wind", "under a blue sky", "after the rain", "with dramatic clouds"]
BUILDINGS = ["lighthouse", "castle", "cathedral", "barn", "windmill", "skyscraper", "cottage", "temple",
             "train station", "farmhouse", "bridge", "tower", "palace", "church", "log cabin", "greenhouse",
             "apartment building", "market hall", "museum", "pagoda"]
BUILDING_PLACES = ["on a hill", "by the sea", "in a small village", "in the middle of a city", "in the mountains",
                   "next to a river", "surrounded by trees", "in the countryside", "on an island", "in a valley"]
STYLES = ["an oil painting", "a watercolor painting", "a pencil sketch", "a charcoal drawing", "a photograph",
          "a digital illustration", "a 3d render", "a pixel art image", "a cartoon drawing", "an anime illustration",
          "a woodcut print", "a vintage poster", "a black and white photo", "a children's book illustration",
          "a mosaic", "a stained glass window", "a low poly render", "an impressionist painting"]
STYLE_SUBJECTS = ["a fox in the snow", "a lighthouse at night", "a cat on a windowsill", "a sailboat at sea",
                  "a bowl of fruit", "a busy market street", "an old man with a beard", "a dragon over a castle",
                  "a girl with a red umbrella", "a city skyline", "a forest path in autumn", "a horse in a field",
                  "a cup of coffee", "a mountain village", "a robot in a garden", "a field of sunflowers",
                  "a train crossing a bridge", "an owl on a branch", "a couple dancing", "a quiet harbour"]
CLOTHES = ["coat", "dress", "hat", "scarf", "jacket", "sweater", "raincoat", "shirt", "hoodie", "suit", "pair of boots",
           "pair of sunglasses", "backpack", "uniform", "apron"]
COUNTS = ["two", "three", "four", "five", "a few", "several", "many"]
PLURALS = {"dog": "dogs", "cat": "cats", "horse": "horses", "duck": "ducks", "sheep": "sheep", "cow": "cows",
           "bird": "birds", "apple": "apples", "car": "cars", "boat": "boats", "balloon": "balloons",
           "child": "children", "chair": "chairs", "candle": "candles", "book": "books", "tree": "trees",
           "kitten": "kittens", "penguin": "penguins", "bicycle": "bicycles", "cup": "cups", "lemon": "lemons",
           "flower": "flowers", "house": "houses", "goat": "goats"}
PLURAL_PLACES = ["on a table", "in a field", "on the grass", "by the water", "in a row", "on a shelf",
                 "in the snow", "on a beach", "in a garden", "on a street"]


def article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def one(rng: random.Random) -> str:
    c = rng.choice
    kind = rng.randrange(13)
    if kind == 0:
        return f"{article(c(COLOURS) + ' ' + c(ANIMALS))} {c(ANIMAL_DOING)} {c(PLACES)}"
    if kind == 1:
        return f"a photo of {article(c(ANIMALS))} {c(PLACES)}"
    if kind == 2:
        return f"{article(c(PEOPLE))} {c(PEOPLE_DOING)} {c(SETTINGS)}"
    if kind == 3:
        return f"{article(c(DISHES))} on {c(SURFACES)}"
    if kind == 4:
        kinds, places = VEHICLES[c(sorted(VEHICLES))]
        return f"{article(c(COLOURS) + ' ' + c(kinds))} {c(places)}"
    if kind == 5:
        return f"{article(c(ROOMS))} with {article(c(FURNITURE))} and {article(c(THINGS))}"
    if kind == 6:
        return f"{c(LANDSCAPES)} {c(TIMES) if rng.random() < 0.5 else c(WEATHER)}"
    if kind == 7:
        return f"{article(c(BUILDINGS))} {c(BUILDING_PLACES)} {c(TIMES)}"
    if kind == 8:
        thing = c(sorted(MADE_OF))
        return f"{article(c(MADE_OF[thing]) + ' ' + thing)} next to {article(c(THINGS))} on {c(SURFACES)}"
    if kind == 9:
        return f"{c(STYLES)} of {c(STYLE_SUBJECTS)}"
    if kind == 10:
        a1, a2 = rng.sample(COLOURS, 2)
        if rng.random() < 0.5:
            k1, k2 = rng.sample(ANIMALS, 2)
            return f"{article(a1 + ' ' + k1)} and {article(a2 + ' ' + k2)} {c(PLACES)}"
        if rng.random() < 0.5:
            k1, k2 = rng.sample(VEHICLES["road"][0], 2)
            return f"{article(a1 + ' ' + k1)} next to {article(a2 + ' ' + k2)} {c(VEHICLES['road'][1])}"
        k1, k2 = rng.sample(FURNITURE, 2)
        return f"{article(a1 + ' ' + k1)} and {article(a2 + ' ' + k2)} in {article(c(ROOMS))}"
    if kind == 11:
        return f"{c(COUNTS)} {PLURALS[c(sorted(PLURALS))]} {c(PLURAL_PLACES)}"
    return f"{article(c(PEOPLE))} wearing {article(c(COLOURS) + ' ' + c(CLOTHES))} {c(SETTINGS)}"


def build(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(one(rng), None)
    return list(seen)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompts = build(args.n, args.seed)
    header = ("# Calibration prompts for head relevance on real checkpoints (auditor calibrate).\n"
              f"# Generated by bench/calibration_prompts.py --n {args.n} --seed {args.seed}; one prompt a line.\n")
    OUT.write_text(header + "\n".join(prompts) + "\n", encoding="utf-8")
    print(f"wrote {len(prompts)} prompts to {OUT}")


if __name__ == "__main__":
    main()
