"""The DreamBooth benchmark's 25 object prompts (Ruiz et al. 2023, dataset/prompts_and_classes.txt).

`{0}` is the identifier token, `{1}` the class word, exactly as in the paper's prompt list.
The paper generates 4 images per prompt and reports DINO, CLIP-I and CLIP-T over them.
"""

from __future__ import annotations

IMAGES_PER_PROMPT = 4

OBJECT_PROMPTS: tuple[str, ...] = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)


def object_prompts(token: str, class_word: str) -> list[str]:
    """The 25 object prompts with the token and class word filled in."""
    return [template.format(token, class_word) for template in OBJECT_PROMPTS]
