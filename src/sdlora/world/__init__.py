"""The miniature world: scenes small enough to learn on a CPU, and novel objects to teach.

vocab.py declares its words once (classes, colours, patterns, features, backgrounds); objects.py
composes objects from those parts and splits the compositions into a base set (what the world's
base models are trained on) and a held-out set (novel objects, what a LoRA must learn);
backgrounds.py and scenes.py draw captioned scenes with true masks; photos.py writes phone-style
photos of a novel object for `sdlora prepare`. `python -m sdlora.world --help` lists the commands.
"""
