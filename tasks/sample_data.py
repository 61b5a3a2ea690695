"""Deterministic, offline sample data: labelled sentiment reviews and an English pretraining corpus.

Everything is generated from templates and word lists with ``random.Random``, so the same seed always
yields the same data and no network access or data files are needed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Bump when the generated data changes, so artifacts built from the old data are not reused.
VERSION = "sample-1"
LABELS: tuple[str, ...] = ("negative", "positive")

_MAX_ATTEMPTS_PER_TEXT = 200
_REVIEW_DOC_SHARE = 0.36


@dataclass(frozen=True)
class _Domain:
    """Vocabulary for one kind of reviewed thing."""

    items: tuple[str, ...]
    aspects: tuple[str, ...]
    gerund: str
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    filler: tuple[str, ...]
    visit: tuple[str, ...]
    item_pos: tuple[str, ...]
    item_neg: tuple[str, ...]


_DOMAINS: tuple[_Domain, ...] = (
    _Domain(
        items=("film", "movie", "documentary", "thriller", "comedy", "drama", "western", "horror film",
               "biopic", "animated film", "war film", "romantic comedy"),
        aspects=("acting", "story", "plot", "script", "dialogue", "soundtrack", "cinematography", "ending",
                 "pacing", "direction", "cast", "lead performance", "special effects", "editing", "costumes",
                 "opening scene", "score"),
        gerund="watching",
        pos=("the acting was superb", "the story kept me hooked", "the final scene left me in tears",
             "every performance felt honest", "the soundtrack gave me chills", "the jokes landed every time",
             "the two leads had real chemistry", "the script was sharp and witty",
             "the camera work was breathtaking", "the twist caught me completely off guard",
             "the characters felt like real people", "the whole cast was on top form"),
        neg=("the plot made no sense", "the jokes fell flat", "I nearly fell asleep halfway through",
             "the dialogue was wooden", "the ending felt rushed", "it dragged on far too long",
             "the characters were paper thin", "the special effects looked cheap",
             "the lead actor seemed bored", "the twist was obvious from the first scene",
             "the sound mix drowned out half the lines", "nothing in the story added up"),
        filler=("I watched it on a rainy Sunday with my brother", "we saw it at the small cinema near the station",
                "my friend picked it for our movie night", "it runs for a little over two hours",
                "I streamed it on the train home", "it is based on a novel from the seventies",
                "we went to the late showing on Friday"),
        visit=("went to see a new {item} at the cinema", "watched a {item} at home"),
        item_pos=("moving", "gripping", "clever", "memorable", "thoughtful", "charming", "beautiful", "funny", "powerful", "heartfelt", "stylish", "touching"),
        item_neg=("boring", "dull", "tedious", "lifeless", "forgettable", "shallow", "pointless", "predictable", "clumsy", "bloated", "pretentious", "silly"),
    ),
    _Domain(
        items=("novel", "book", "memoir", "biography", "short story collection", "cookbook",
               "detective novel", "fantasy novel", "history book", "poetry collection", "travel guide"),
        aspects=("writing", "prose", "plot", "characters", "ending", "pacing", "first chapter", "dialogue",
                 "translation", "illustrations", "research", "narrator", "recipes", "cover"),
        gerund="reading",
        pos=("I could not put it down", "the prose was a pleasure to read", "the characters stayed with me for days",
             "every chapter ended on a hook", "the author clearly knows the subject",
             "the last page made me smile", "the recipes worked perfectly the first time",
             "the writing was clear and elegant", "the mystery was cleverly built"),
        neg=("I gave up after fifty pages", "the prose was clumsy and overwritten",
             "the characters were impossible to care about", "the ending came out of nowhere",
             "half the recipes simply did not work", "the translation was full of errors",
             "the middle chapters were a slog", "the mystery was solved far too easily",
             "the author repeats the same point over and over"),
        filler=("I read it over two weekends", "a colleague lent me her copy",
                "I picked it up at the airport bookshop", "it is a little under four hundred pages",
                "our book club chose it for March", "I listened to the audio version on my commute"),
        visit=("started reading a {item} borrowed from the library", "bought a {item} at the bookshop"),
        item_pos=("moving", "gripping", "clever", "thoughtful", "engaging", "charming", "insightful", "witty", "touching", "absorbing"),
        item_neg=("boring", "dull", "tedious", "shallow", "predictable", "clumsy", "overlong", "confusing", "pretentious", "forgettable"),
    ),
    _Domain(
        items=("restaurant", "cafe", "bistro", "diner", "pizzeria", "noodle bar", "steakhouse", "bakery",
               "sushi place", "tapas bar", "pub"),
        aspects=("soup", "service", "pasta", "dessert", "coffee", "bread", "curry", "staff", "menu",
                 "wine list", "atmosphere", "portions", "salad", "steak", "pizza", "decor"),
        gerund="eating at",
        pos=("the soup was rich and full of flavour", "the waiter was friendly and attentive",
             "the bread arrived warm from the oven", "every dish tasted fresh", "the dessert was heavenly",
             "the staff made us feel at home", "the portions were generous",
             "the steak was cooked exactly as I asked", "the coffee was the best in town"),
        neg=("the soup was cold", "the waiter was rude", "we waited an hour for our food",
             "the pasta was overcooked", "the bread was stale", "the bill was far too high for what we got",
             "the table was sticky", "the curry was bland and watery", "the staff ignored us all evening"),
        filler=("we went there for my mother's birthday", "we booked a table for eight o'clock",
                "it sits on a quiet corner near the harbour", "I ordered the special of the day",
                "we went on a Tuesday evening", "my colleagues and I stopped by for lunch"),
        visit=("had dinner at a {item} near the harbour", "tried a new {item} in town"),
        item_pos=("delicious", "cosy", "charming", "friendly", "welcoming", "relaxed", "lively", "elegant"),
        item_neg=("overpriced", "dirty", "noisy", "greasy", "cramped", "gloomy", "chaotic", "unfriendly"),
    ),
    _Domain(
        items=("album", "record", "debut album", "live album", "EP", "mixtape", "jazz record", "folk album"),
        aspects=("vocals", "production", "lyrics", "guitar work", "opening track", "melodies", "drumming",
                 "mixing", "closing song", "arrangements", "bass line", "chorus"),
        gerund="listening to",
        pos=("the vocals gave me goosebumps", "every track has a hook", "the lyrics are honest and clever",
             "the production sounds warm and rich", "I have had the chorus in my head all week",
             "the band has never sounded better", "the closing song is a masterpiece"),
        neg=("every song sounds the same", "the vocals are buried in the mix", "the lyrics are embarrassing",
             "the production is thin and harsh", "I skipped most of the tracks",
             "the band sounds tired", "the singles are the only songs worth hearing"),
        filler=("I listened to it on the drive to work", "it came out last autumn",
                "a friend sent me the link", "it has eleven tracks", "I bought it on vinyl at a local shop",
                "I played it while cooking dinner"),
        visit=("listened to a new {item} on the way to work", "bought an old {item} at a record shop"),
        item_pos=("moving", "catchy", "beautiful", "bold", "uplifting", "soulful", "inventive", "haunting"),
        item_neg=("boring", "dull", "bland", "forgettable", "lifeless", "repetitive", "tuneless", "overproduced"),
    ),
    _Domain(
        items=("game", "video game", "puzzle game", "board game", "racing game", "role-playing game",
               "strategy game", "card game"),
        aspects=("controls", "graphics", "level design", "story mode", "multiplayer", "soundtrack", "puzzles",
                 "difficulty curve", "tutorial", "boss fights", "frame rate", "rules", "artwork"),
        gerund="playing",
        pos=("the controls feel tight and responsive", "the levels are full of surprises",
             "I lost whole evenings to it", "the puzzles are clever and fair", "the world is a joy to explore",
             "every match feels different", "the boss fights are thrilling"),
        neg=("the controls are sluggish", "it crashed three times in one evening",
             "the levels are repetitive", "the puzzles are unfair", "the tutorial explains nothing",
             "the frame rate drops constantly", "the rules are a mess"),
        filler=("I played it with my cousins over the holidays", "it took me about thirty hours to finish",
                "I bought it during a sale", "we play it on Friday nights", "it came with two expansions",
                "I played it on the handheld version"),
        visit=("played a new {item} with friends", "spent the evening on a {item}"),
        item_pos=("addictive", "fun", "clever", "polished", "charming", "thrilling", "relaxing", "inventive"),
        item_neg=("buggy", "repetitive", "boring", "clunky", "tedious", "frustrating", "unfair", "shallow"),
    ),
    _Domain(
        items=("blender", "vacuum cleaner", "laptop", "kettle", "phone", "toaster", "backpack",
               "pair of headphones", "coffee maker", "desk lamp", "printer", "electric toothbrush", "umbrella",
               "tent", "office chair"),
        aspects=("battery", "build quality", "design", "price", "screen", "motor", "instructions", "handle",
                 "sound", "packaging", "customer support", "lid", "cable", "materials", "keyboard"),
        gerund="buying",
        pos=("it works perfectly", "the battery lasts for days", "it feels solid and well made",
             "setting it up took two minutes", "it does exactly what it promises",
             "it is still going strong after a year", "customer support replaced a part within a day"),
        neg=("it broke after a week", "the battery dies by lunchtime", "the handle snapped on the second day",
             "it stopped working after a month", "the instructions were useless",
             "it is louder than a jet engine", "customer support never answered my emails"),
        filler=("I ordered it online last month", "it arrived two days after I ordered it",
                "I use it every morning", "my old one finally gave up", "it comes in three colours",
                "I bought it as a gift for my father"),
        visit=("ordered a new {item} online", "bought a {item} at the shop on the high street"),
        item_pos=("reliable", "sturdy", "handy", "sleek", "well-made", "quiet", "practical", "efficient"),
        item_neg=("flimsy", "cheap", "useless", "fragile", "noisy", "unreliable", "clunky", "overpriced"),
    ),
    _Domain(
        items=("hotel", "guesthouse", "resort", "hostel", "bed and breakfast", "inn", "holiday cottage"),
        aspects=("room", "bed", "breakfast", "staff", "view", "pool", "bathroom", "location", "front desk",
                 "wifi", "shower", "lobby", "garden"),
        gerund="staying at",
        pos=("the room was spotless", "the bed was wonderfully comfortable", "the breakfast was generous",
             "the staff went out of their way to help", "the view from our balcony was stunning",
             "the location was perfect for exploring", "the garden was a peaceful place to read"),
        neg=("the room smelled of smoke", "the bed was lumpy", "the shower was barely warm",
             "the staff at the front desk were rude", "the walls were paper thin",
             "the wifi never worked", "the pool was closed for our whole stay"),
        filler=("we stayed there for three nights in June", "we arrived late on a Thursday",
                "it is a short walk from the old town", "we booked it through a friend",
                "we stayed there on our way to the coast", "our room was on the second floor"),
        visit=("spent a weekend at a {item} by the sea", "booked a room at a {item} in the mountains"),
        item_pos=("cosy", "spotless", "charming", "comfortable", "quiet", "welcoming", "relaxing", "elegant"),
        item_neg=("dirty", "noisy", "shabby", "cramped", "overpriced", "gloomy", "run-down", "unfriendly"),
    ),
)

_PLURAL = frozenset({
    "costumes", "special effects", "characters", "illustrations", "recipes", "portions", "staff", "vocals",
    "lyrics", "melodies", "arrangements", "controls", "graphics", "puzzles", "boss fights", "rules",
    "instructions", "materials",
})

_POS_ADJ = (
    "wonderful", "brilliant", "superb", "excellent", "fantastic", "outstanding", "terrific", "great",
    "impressive", "lovely", "marvellous", "first-rate", "splendid", "exceptional", "top-notch", "delightful",
)
_NEG_ADJ = (
    "terrible", "awful", "dreadful", "poor", "disappointing", "mediocre", "horrible", "lousy", "dismal",
    "shoddy", "abysmal", "underwhelming", "atrocious", "appalling", "second-rate", "weak",
)
_MILD_POS = ("decent", "pleasant", "fine", "acceptable", "pretty good", "nice enough", "reasonable", "okay")
_MILD_NEG = ("a little disappointing", "slightly underwhelming", "not perfect", "a bit uneven", "somewhat weak",
             "rough around the edges", "a little ordinary", "nothing special")
_INTENS = ("really", "truly", "absolutely", "simply", "genuinely", "honestly")

_POS_FEEL = ("I loved it", "I enjoyed every minute", "it made my week", "I was delighted",
             "I was thrilled from start to finish", "I came away smiling", "I adored it",
             "it exceeded my expectations")
_NEG_FEEL = ("I hated it", "I was bored stiff", "it ruined my evening", "I was deeply disappointed",
             "I regretted it almost at once", "I came away annoyed", "I could not wait for it to end",
             "it fell short of my expectations")
_POS_VERB = ("loved", "adored", "really enjoyed", "was blown away by", "had a great time", "treasured")
_NEG_VERB = ("hated", "regret", "was let down by", "could not stand", "was bored by", "deeply disliked")
_POS_VERDICT = ("Highly recommended.", "I would recommend it to anyone.", "Five stars.", "Worth every penny.",
                "I would happily do it again.", "Ten out of ten.", "An absolute joy.",
                "Definitely worth your time.", "I cannot praise it enough.", "A real treat.")
_NEG_VERDICT = ("Avoid it.", "I want my money back.", "One star.", "A complete waste of time.",
                "I would not recommend it.", "Never again.", "Save your money.", "Deeply disappointing.",
                "I regret it.", "A total letdown.")
_POS_NEGATED = ("it was not bad at all, actually quite enjoyable", "I have no complaints whatsoever",
                "I was not disappointed for a second", "it never gets boring", "there was nothing I disliked",
                "I honestly could not fault it", "it was far better than I feared",
                "I can't think of a single thing wrong with it")
_NEG_NEGATED = ("it was not good at all", "it was not worth the money", "I would not watch, read or buy it again",
                "nothing about it worked", "it did not live up to the hype", "I could not find anything to like",
                "it was not enjoyable in the slightest", "there was not a single good moment")
_HARD_JOIN = ("{a}, but {b}.", "Although {a}, {b}.", "{A}. Still, {b}.", "{A}; however, {b}.",
              "While {a}, {b}.", "{A}, yet {b}.", "Even though {a}, {b}.", "{A}. That said, {b}.")
_OPENERS = ("Honestly, ", "To be fair, ", "Overall, ", "In short, ", "All in all, ", "Frankly, ", "", "", "", "")

_NAMES = (("Maria", "she"), ("James", "he"), ("Aisha", "she"), ("Tom", "he"), ("Priya", "she"),
          ("Lucas", "he"), ("Hannah", "she"), ("Omar", "he"), ("Sofia", "she"), ("Daniel", "he"),
          ("Mei", "she"), ("Samuel", "he"), ("Elena", "she"), ("Kwame", "he"), ("Grace", "she"),
          ("Leo", "he"), ("Nadia", "she"), ("Oliver", "he"), ("Yuki", "she"), ("Pedro", "he"),
          ("Rosa", "she"), ("Ahmed", "he"), ("Chloe", "she"), ("Ivan", "he"), ("Fatima", "she"),
          ("George", "he"), ("Lena", "she"), ("Ravi", "he"), ("Ingrid", "she"), ("Felix", "he"))
_PEOPLE = ("{poss} grandmother", "{poss} younger brother", "an old friend", "the neighbours", "a young teacher",
           "the baker", "the postman", "two children from the next street", "a tired nurse", "the old fisherman",
           "{poss} cousin", "{poss} aunt", "the farmer next door", "a group of students", "the librarian",
           "a quiet stranger", "the shopkeeper", "{poss} colleagues", "{poss} best friend", "the bus driver",
           "{poss} uncle", "{poss} daughter", "the mayor", "a retired sailor")
_PLURAL_PEOPLE = ("neighbours", "street", "students", "colleagues")
_PLACES = ("at the market", "in the park", "near the river", "at the library", "in the garden", "on the beach",
           "at the train station", "in the village square", "at the harbour", "in the kitchen",
           "on the hill behind the school", "at the bakery on the corner", "in the old town",
           "by the lake", "at the bus stop", "in the small museum", "on the football pitch",
           "outside the post office", "in the forest", "at the swimming pool", "on the balcony",
           "in the hospital car park", "at the flower shop", "under the bridge")
_TIMES = ("in the morning", "on Monday", "after lunch", "late at night", "at dawn", "before dinner",
          "last summer", "during the holidays", "yesterday", "that evening", "on Saturday afternoon",
          "early on Sunday", "in the spring", "at midday", "after work", "on a cold winter night",
          "the next day", "a week later", "at the end of the month", "on Thursday", "before school")
_WEATHER_TIMES = ("that morning", "all afternoon", "overnight", "by noon", "later that day", "on Tuesday",
                  "at dusk", "for most of the week", "just before lunch", "the following morning")
_ACTIONS = ("bought fresh bread", "read the newspaper", "painted the fence", "fixed an old bicycle",
            "baked a lemon cake", "wrote a long letter", "cleaned the windows", "planted tomatoes",
            "walked the dog", "carried the shopping home", "repaired the roof", "sold vegetables",
            "played chess", "fed the cats", "washed the car", "picked apples", "took photographs",
            "waited for the train", "sketched the boats", "counted the money", "mended a torn coat",
            "collected shells", "ate a sandwich", "practised the piano", "swept the floor",
            "studied for an exam", "chopped firewood", "watered the flowers", "sang an old song",
            "looked for a lost key")
_FEELINGS = ("tired", "happy", "nervous", "proud", "relieved", "curious", "bored", "sleepy", "excited",
             "calm", "hungry", "cheerful", "worried", "grateful", "restless", "lonely")
_REASONS = ("the bus was late", "the exam was finally over", "the garden had begun to bloom",
            "the house was quiet", "a letter had arrived from abroad", "the rain would not stop",
            "the shop had closed early", "the first snow had fallen", "the holidays were about to begin",
            "the kettle had broken", "the streets were full of music", "an old friend was coming to visit",
            "the harvest had been good", "the lights had gone out")
_WEATHER = ("sunny", "cloudy", "windy", "foggy", "cold", "mild", "hot", "humid", "stormy", "bright",
            "chilly", "wet", "grey", "freezing", "clear")
_WEATHER_SENTENCES = ("It rained {time}.", "The sun came out {time}.", "A cold wind blew from the north {time}.",
                      "Snow covered the roofs {time}.", "The air was warm and still {time}.",
                      "Thick fog rolled in from the sea {time}.", "The sky cleared {time}.",
                      "A thunderstorm broke over the town {time}.")
_SCENES = ("market", "street", "station", "kitchen", "library", "harbour", "square", "bakery", "classroom",
           "garden", "village", "beach", "office", "museum", "bridge", "road")
_SCENE_ADJ = ("quiet", "busy", "crowded", "empty", "noisy", "warm", "dark", "bright", "narrow", "old",
              "clean", "peaceful", "cheerful", "damp", "tidy", "cosy")
_CONNECTIVES = ("Later, ", "Meanwhile, ", "After that, ", "Soon, ", "Then ", "In the end, ", "A little later, ",
                "Eventually, ", "Before long, ", "", "", "")
_HABITS = ("go for a walk", "read before bed", "cook for friends", "swim in the lake", "visit the market",
           "ride a bicycle to work", "listen to the radio", "work in the garden", "write in a diary",
           "drink tea on the balcony", "watch the boats come in", "play cards with neighbours")
_FREQUENCIES = ("every morning", "on Sundays", "twice a week", "whenever it is sunny", "after dinner",
                "every summer", "on rainy days", "most evenings")


def _cap(text: str) -> str:
    """Upper-case the first character."""
    return text[:1].upper() + text[1:]


def _be(noun: str) -> str:
    """Past tense of 'to be' agreeing with noun."""
    return "were" if noun in _PLURAL else "was"


def _article(word: str) -> str:
    """Indefinite article for word."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


def _adj(rng: random.Random, positive: bool) -> str:
    return _pick(rng, _POS_ADJ if positive else _NEG_ADJ)


def _item_adjectives(dom: _Domain, positive: bool) -> tuple[str, ...]:
    return (dom.item_pos + _POS_ADJ) if positive else (dom.item_neg + _NEG_ADJ)


def _clause(rng: random.Random, dom: _Domain, positive: bool, strong: bool = False) -> str:
    """One lower-case evaluative clause of the given polarity."""
    if rng.random() < 0.4:
        return _pick(rng, dom.pos if positive else dom.neg)
    aspect = _pick(rng, dom.aspects)
    adj = _adj(rng, positive)
    if strong or rng.random() < 0.35:
        adj = f"{_pick(rng, _INTENS)} {adj}"
    return f"the {aspect} {_be(aspect)} {adj}"


def _other_clause(rng: random.Random, first: str, make: Callable[[], str]) -> str:
    """A clause from make() whose subject differs from that of first."""
    head = first.split()[:2]
    for _ in range(20):
        clause = make()
        words = clause.split()
        if words[:2] != head and not (words[0] == head[0] == "it"):
            return clause
    return clause


def _mild_clause(rng: random.Random, dom: _Domain, positive: bool) -> str:
    """A hedged, weakly evaluative clause."""
    aspect = _pick(rng, dom.aspects)
    if rng.random() < 0.5:
        return f"the {aspect} {_be(aspect)} {_pick(rng, _MILD_POS if positive else _MILD_NEG)}"
    return _clause(rng, dom, positive)


def _short_verdict(rng: random.Random, dom: _Domain, positive: bool) -> list[str]:
    item = _pick(rng, dom.items)
    a1, a2 = rng.sample(_item_adjectives(dom, positive), 2)
    form = rng.randrange(5)
    if form == 0:
        return [f"{_cap(_article(a1))} {a1}, {a2} {item}."]
    if form == 1:
        return [f"What {_article(a1)} {a1} {item}!"]
    if form == 2:
        return [f"{_cap(_pick(rng, _INTENS))} {a1}."]
    if form == 3:
        aspect = _pick(rng, dom.aspects)
        return [f"{_cap(a1)} {item}, {_adj(rng, positive)} {aspect}."]
    return [f"The {item} was {_pick(rng, _INTENS)} {a1}."]


def _aspect_list(rng: random.Random, dom: _Domain, positive: bool) -> list[str]:
    first = _clause(rng, dom, positive)
    second = _other_clause(rng, first, lambda: _clause(rng, dom, positive))
    join = _pick(rng, (" and ", ", and ", "; ", " and ", ", while "))
    return [_cap(f"{_pick(rng, _OPENERS)}{first}{join}{second}.")]


def _experience(rng: random.Random, dom: _Domain, positive: bool) -> list[str]:
    item = _pick(rng, dom.items)
    verb = _pick(rng, _POS_VERB if positive else _NEG_VERB)
    reason = _clause(rng, dom, positive)
    if verb == "regret":
        head = f"I regret {dom.gerund} this {item}"
    elif verb == "had a great time":
        head = f"I had a great time {dom.gerund} this {item}"
    else:
        head = f"I {verb} this {item}"
    return [f"{head}; {reason}."]


def _contrast_verdict(rng: random.Random, dom: _Domain, positive: bool) -> list[str]:
    other = _clause(rng, dom, not positive)
    main = _other_clause(rng, other, lambda: _clause(rng, dom, positive))
    feel = _pick(rng, _POS_FEEL if positive else _NEG_FEEL)
    return [_cap(f"{other}, but {main} and {feel}.")]


def _hard_contrast(rng: random.Random, dom: _Domain, positive: bool) -> list[str]:
    other = _mild_clause(rng, dom, not positive)
    strong = rng.random() < 0.5
    main = _other_clause(rng, other, lambda: _clause(rng, dom, positive, strong=strong))
    template = _pick(rng, _HARD_JOIN)
    text = template.format(a=other, A=_cap(other), b=main)
    return [_cap(part) for part in _split_keep(text)]


def _negation(rng: random.Random, dom: _Domain, positive: bool) -> list[str]:
    form = rng.randrange(3)
    if form == 0:
        return [_cap(_pick(rng, _POS_NEGATED if positive else _NEG_NEGATED)) + "."]
    aspect = _pick(rng, dom.aspects)
    if form == 1:
        denied = _adj(rng, not positive)
        return [f"The {aspect} {_be(aspect)} not {denied} at all."]
    denied, real = _adj(rng, not positive), _adj(rng, positive)
    pronoun = f"they {_be(aspect)}" if aspect in _PLURAL else "it was"
    link = _pick(rng, ("; in fact {p}", ", {p} actually", "; if anything {p}", ". {P} honestly"))
    link = link.format(p=pronoun, P=_cap(pronoun))
    if link.startswith("."):
        return [f"The {aspect} {_be(aspect)} not {denied}.", f"{link[2:]} {real}."]
    return [f"The {aspect} {_be(aspect)} not {denied}{link} {real}."]


def _split_keep(text: str) -> list[str]:
    """Split text into sentences on '. ' while keeping the full stops."""
    parts = text.split(". ")
    return [p if i == len(parts) - 1 else p + "." for i, p in enumerate(parts)]


_BUILDERS = (
    (_short_verdict, 0.14),
    (_aspect_list, 0.2),
    (_experience, 0.16),
    (_contrast_verdict, 0.12),
    (_hard_contrast, 0.2),
    (_negation, 0.18),
)


def _review_sentences(rng: random.Random, positive: bool, dom: _Domain | None = None) -> list[str]:
    """One review, as a list of sentences."""
    if dom is None:
        dom = _pick(rng, _DOMAINS)
    roll, acc = rng.random(), 0.0
    builder = _BUILDERS[-1][0]
    for candidate, weight in _BUILDERS:
        acc += weight
        if roll < acc:
            builder = candidate
            break
    sentences = builder(rng, dom, positive)
    if rng.random() < 0.3:
        filler = _cap(_pick(rng, dom.filler)) + "."
        if rng.random() < 0.6:
            sentences.insert(0, filler)
        else:
            sentences.append(filler)
    if builder is not _hard_contrast and rng.random() < 0.25:
        sentences.append(_pick(rng, _POS_VERDICT if positive else _NEG_VERDICT))
    return sentences


def _unique_reviews(rng: random.Random, positive: bool, count: int, seen: set[str]) -> list[str]:
    out: list[str] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_TEXT * (count + 1):
            raise ValueError(f"cannot generate {count} distinct reviews")
        text = " ".join(_review_sentences(rng, positive))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def sentiment_dataset(
    seed: int = 0, n_train: int = 4000, n_validation: int = 500, n_test: int = 500
) -> dict[str, list[dict]]:
    """Return {"train", "validation", "test"} lists of {"text", "label"} rows of synthetic reviews.

    Each split is balanced to within one example; no text occurs twice, within or across splits.
    """
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    if any(n < 0 for n in sizes.values()):
        raise ValueError("split sizes must be non-negative")
    rng = random.Random(f"llmpipe-sentiment-{seed}")
    n_pos = {name: n // 2 + (n % 2 if rng.random() < 0.5 else 0) for name, n in sizes.items()}
    seen: set[str] = set()
    pools = {
        True: _unique_reviews(rng, True, sum(n_pos.values()), seen),
        False: _unique_reviews(rng, False, sum(n - n_pos[k] for k, n in sizes.items()), seen),
    }
    for pool in pools.values():
        rng.shuffle(pool)
    splits: dict[str, list[dict]] = {}
    offsets = {True: 0, False: 0}
    for name, n in sizes.items():
        rows: list[dict] = []
        for positive, k in ((True, n_pos[name]), (False, n - n_pos[name])):
            start = offsets[positive]
            rows.extend({"text": t, "label": LABELS[int(positive)]} for t in pools[positive][start:start + k])
            offsets[positive] = start + k
        rng.shuffle(rows)
        splits[name] = rows
    return splits


def _person(rng: random.Random, pronoun: str, avoid: str = "") -> str:
    """A secondary character, different from avoid."""
    while True:
        person = _pick(rng, _PEOPLE).format(poss="her" if pronoun == "she" else "his")
        if person != avoid:
            return person


def _subject(rng: random.Random, name: str, pronoun: str) -> str:
    roll = rng.random()
    if roll < 0.45:
        return name
    if roll < 0.7:
        return pronoun
    return _person(rng, pronoun)


def _narrative_sentence(rng: random.Random, name: str, pronoun: str) -> str:
    """One narrative or descriptive sentence about a protagonist."""
    form = rng.randrange(9)
    subj = _subject(rng, name, pronoun)
    if form == 0:
        return _cap(f"{_pick(rng, _CONNECTIVES)}{subj} {_pick(rng, _ACTIONS)} {_pick(rng, _PLACES)} "
                    f"{_pick(rng, _TIMES)}.")
    if form == 1:
        w1, w2 = rng.sample(_WEATHER, 2)
        return _cap(f"{_pick(rng, _TIMES)}, the weather was {w1} and {w2}.")
    if form == 2:
        return _pick(rng, _WEATHER_SENTENCES).format(time=_pick(rng, _WEATHER_TIMES))
    if form == 3:
        a1, a2 = rng.sample(_SCENE_ADJ, 2)
        return f"The {_pick(rng, _SCENES)} was {a1} and {a2} {_pick(rng, _TIMES)}."
    if form == 4:
        return _cap(f"{subj} felt {_pick(rng, _FEELINGS)} because {_pick(rng, _REASONS)}.")
    if form == 5:
        other = _person(rng, pronoun, avoid=subj)
        return _cap(f"when {subj} {_pick(rng, _ACTIONS)}, {other} {_pick(rng, _ACTIONS)} "
                    f"{_pick(rng, _PLACES)}.")
    if form == 6:
        verb = "like" if subj.endswith(_PLURAL_PEOPLE) else "likes"
        return _cap(f"{subj} {verb} to {_pick(rng, _HABITS)} {_pick(rng, _FREQUENCIES)}.")
    if form == 7:
        return _cap(f"{_pick(rng, _CONNECTIVES)}{subj} met {_person(rng, pronoun, avoid=subj)} {_pick(rng, _PLACES)} and "
                    f"they {_pick(rng, _ACTIONS)} together.")
    return _cap(f"because {_pick(rng, _REASONS)}, {subj} {_pick(rng, _ACTIONS)} {_pick(rng, _TIMES)}.")


def _review_document(rng: random.Random, n_sentences: int) -> list[str]:
    positive = rng.random() < 0.5
    dom = _pick(rng, _DOMAINS)
    item = _pick(rng, dom.items)
    visit = _pick(rng, dom.visit).format(item=item)
    sentences = [_cap(f"{_pick(rng, _TIMES)}, {_pick(rng, ('I', 'we', 'my sister and I'))} {visit}.")]
    while len(sentences) < n_sentences:
        sentences.extend(_review_sentences(rng, positive, dom))
    return sentences[:n_sentences]


def _contains_any(sentences: list[str], texts: set[str]) -> bool:
    """Whether some run of consecutive sentences, joined by spaces, is one of texts."""
    n = len(sentences)
    return any(" ".join(sentences[i:j]) in texts for i in range(n) for j in range(i + 1, n + 1))


def pretraining_corpus(seed: int = 0, n_documents: int = 3000) -> list[str]:
    """Return n_documents distinct English documents of 3-8 sentences, about 30% of them review-style.

    Review passages come from their own random stream and never reproduce a text of
    ``sentiment_dataset(seed)`` (default split sizes) verbatim.
    """
    if n_documents < 0:
        raise ValueError("n_documents must be non-negative")
    rng = random.Random(f"llmpipe-corpus-{seed}")
    review_rng = random.Random(f"llmpipe-corpus-reviews-{seed}")
    reserved = {row["text"] for rows in sentiment_dataset(seed).values() for row in rows}
    docs: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(docs) < n_documents:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_TEXT * (n_documents + 1):
            raise ValueError(f"cannot generate {n_documents} distinct documents")
        n_sentences = rng.randint(3, 8)
        if rng.random() < _REVIEW_DOC_SHARE:
            sentences = _review_document(review_rng, n_sentences)
            if _contains_any(sentences, reserved):
                continue
        else:
            name, pronoun = _pick(rng, _NAMES)
            intro = _cap(f"{_pick(rng, _TIMES)}, {name} {_pick(rng, _ACTIONS)} {_pick(rng, _PLACES)}.")
            sentences = [intro] + [_narrative_sentence(rng, name, pronoun) for _ in range(n_sentences - 1)]
        doc = " ".join(sentences)
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs
