"""The class names of the paper's datasets, and how two spellings of one name compare.

Names are words because CDTG makes them its CLIP prompts ("A photo of a {name}"): DIOR's XML
spells "basketballcourt", DOTA's labels "basketball-court", and CLIP reads neither as well
as "basketball court". The releases' spellings still match (`class_name_key`)."""
import unicodedata

from tgn.errors import UserError

# The official id orders. DOTA's chip releases number its classes in two orders (this one,
# the devkit's, and alphabetical), so a DOTA folder without classes.json is not named from it.
DIOR_CLASSES = (
    "airplane", "airport", "baseball field", "basketball court", "bridge", "chimney", "dam",
    "expressway service area", "expressway toll station", "golf field", "ground track field",
    "harbor", "overpass", "ship", "stadium", "storage tank", "tennis court", "train station",
    "vehicle", "windmill",
)
DOTA_CLASSES = (
    "plane", "baseball diamond", "bridge", "ground track field", "small vehicle", "large vehicle",
    "ship", "tennis court", "basketball court", "storage tank", "soccer ball field", "roundabout",
    "harbor", "swimming pool", "helicopter",
)
FGSC23_CLASSES = (
    "non-ship", "air carrier", "destroyer", "landing craft", "frigate", "amphibious transport dock",
    "cruiser", "Tarawa-class amphibious assault ship", "amphibious assault ship", "command ship",
    "submarine", "medical ship", "combat boat", "auxiliary ship", "container ship", "car carrier",
    "hovercraft", "bulk carrier", "oil tanker", "fishing boat", "passenger ship", "liquefied gas ship",
    "barge",
)

# What a dataset without classes.json (the official preprocessed downloads) is named from,
# by the NAME of its anno/NAME_train.txt, case aside.
NAMES_BY_ANNOTATION = {"dior": DIOR_CLASSES, "fgsc": FGSC23_CLASSES, "fgsc23": FGSC23_CLASSES,
                       "fgsc-23": FGSC23_CLASSES}


def official_class_names(dataset, class_ids):
    """{id: name} for a dataset named by its annotation files, if it is DIOR or FGSC-23 and
    every id is one of its classes; else None."""
    names = NAMES_BY_ANNOTATION.get(str(dataset).casefold())
    if names is None or not all(0 <= cid < len(names) for cid in class_ids):
        return None
    return {cid: names[cid] for cid in class_ids}


def names_unlike_dior(class_ids, names):
    """The ids among `class_ids` whose `names` (in the same order) are not DIOR's name of that
    id, spelling aside (an id outside DIOR's 0..19 is unlike too)."""
    return [cid for cid, name in zip(class_ids, names)
            if not 0 <= cid < len(DIOR_CLASSES) or class_name_key(name) != class_name_key(DIOR_CLASSES[cid])]


def class_name_key(name):
    """A class name with its spelling aside: case, Unicode form (macOS decomposes 'é'),
    spaces, hyphens and underscores ('Expressway-Service-area', 'golf__field' and 'golf
    field' of earlier versions' preparers are the names of this one's)."""
    folded = unicodedata.normalize("NFC", str(name)).casefold()
    return "".join(folded.replace("-", " ").replace("_", " ").split())


def renamed_class(recorded, names, ids):
    """The position of the first class that `recorded` (a checkpoint's names, in output
    order) names otherwise than `names`, spelling aside; None if none does, or if nothing is
    recorded (the official files, checkpoints of earlier versions). A class named by its id
    on either side (a dataset without classes.json) matches any name: the id says nothing
    of what the class is."""
    for position, (before, now, cid) in enumerate(zip(recorded or (), names, ids)):
        if str(cid) not in (str(before), str(now)) and class_name_key(before) != class_name_key(now):
            return position
    return None


def refuse_renamed_class(recorded, names, ids, source, listing, remedy):
    """Refuse a model whose `recorded` class names (renamed_class) differ from `listing`'s
    `names`: the message names the first class that differs, then `remedy`."""
    position = renamed_class(recorded, names, ids)
    if position is not None:
        raise UserError(f"{source} was trained with class {ids[position]} named '{recorded[position]}', "
                        f"{listing} names it '{names[position]}'{remedy}")


def display_width(name):
    """Terminal columns of `name`: Chinese and other wide characters take two, combining
    marks none, so tables of class names stay aligned."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in str(name))


def padded(name, width):
    """`name` left-aligned in `width` terminal columns (f"{name:<{width}}" counts characters)."""
    return f"{name}{' ' * max(0, width - display_width(name))}"
