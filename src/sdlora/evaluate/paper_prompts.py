"""The DreamBooth benchmark's 25 object prompts (Ruiz et al. 2023, dataset/prompts_and_classes.txt).

The paper's list writes `{0}` for the identifier token and `{1}` for the class word; here they are
sdlora's own `{token}` and `{class}` placeholders, filled by `sdlora.prompts.fill_prompt`.
The paper generates 4 images per prompt and reports DINO, CLIP-I and CLIP-T over them.
"""

from __future__ import annotations

from sdlora.prompts import fill_prompt

IMAGES_PER_PROMPT = 4

OBJECT_PROMPTS: tuple[str, ...] = (
    "a {token} {class} in the jungle",
    "a {token} {class} in the snow",
    "a {token} {class} on the beach",
    "a {token} {class} on a cobblestone street",
    "a {token} {class} on top of pink fabric",
    "a {token} {class} on top of a wooden floor",
    "a {token} {class} with a city in the background",
    "a {token} {class} with a mountain in the background",
    "a {token} {class} with a blue house in the background",
    "a {token} {class} on top of a purple rug in a forest",
    "a {token} {class} with a wheat field in the background",
    "a {token} {class} with a tree and autumn leaves in the background",
    "a {token} {class} with the Eiffel Tower in the background",
    "a {token} {class} floating on top of water",
    "a {token} {class} floating in an ocean of milk",
    "a {token} {class} on top of green grass with sunflowers around it",
    "a {token} {class} on top of a mirror",
    "a {token} {class} on top of the sidewalk in a crowded street",
    "a {token} {class} on top of a dirt road",
    "a {token} {class} on top of a white rug",
    "a red {token} {class}",
    "a purple {token} {class}",
    "a shiny {token} {class}",
    "a wet {token} {class}",
    "a cube shaped {token} {class}",
)


def object_prompts(token: str, class_word: str) -> list[str]:
    """The 25 object prompts with the token and class word filled in."""
    return [fill_prompt(template, token, class_word) for template in OBJECT_PROMPTS]
