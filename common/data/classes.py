"""Class names (label index -> name) of every registered dataset.

An exported model is used where the training data is not: `export.json` carries the names so
that `kdslim predict` can say "cat" instead of "3". Image folders name their classes by their
folder names (sorted, as the labels are numbered); the built-in datasets use their published
label order (CIFAR-100: the 100 fine labels, alphabetical, as in the dataset's `meta` file).
"""

from __future__ import annotations

from common.data.sources import ImageSource

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# fmt: off
CIFAR100 = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
# fmt: on
NAMES = {"cifar10": CIFAR10, "cifar100": CIFAR100, "digits": [str(d) for d in range(10)]}


def class_names(source: ImageSource) -> list[str]:
    """Name of each label index of `source` (a subset's are its base source's); a dataset
    without known names gets its label numbers, so the list always has one entry a class."""
    base = source
    while not hasattr(base, "classes") and hasattr(base, "_base"):  # SubsetSource
        base = base._base
    names = getattr(base, "classes", None) or NAMES.get(source.name)
    if names is None or len(names) != source.num_classes:
        return [str(i) for i in range(source.num_classes)]
    return list(names)
