"""Does this Python's diffusers / peft / transformers load a run's files as sdlora wrote them?

    python tests/floor_check.py RUN_LORA_DIR MODEL TOKEN

Run as a script (the slow test in test_dependency_floors.py runs it with older versions first on
PYTHONPATH). It loads the tiny base model, then `pipe.load_lora_weights(folder)` and fuses the
LoRA, and checks that every module the diffusers file names changed by exactly
`alpha / rank * B @ A` (alpha and rank from the file's `sdlora.*` metadata), so it does not depend on
the tiny model's random weights being the same in both versions; then it loads the token's
embedding with `load_textual_inversion` and checks the token's row. Prints one line per problem and
exits 1 if there is any, else prints `ok` and the versions.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(folder: Path, model: str, token: str) -> int:
    import diffusers
    import peft
    import torch
    import transformers
    from safetensors import safe_open

    from sdlora.models import load_pipeline
    from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS

    pipe, arch = load_pipeline(model)
    with safe_open(str(folder / DIFFUSERS_LORA), framework="pt") as f:
        meta = f.metadata() or {}
        file = {k: f.get_tensor(k) for k in f.keys()}
    scale = float(meta["sdlora.alpha"]) / float(meta["sdlora.rank"])
    components = {"unet": pipe.unet, **{name: getattr(pipe, name) for name in arch.text_encoders}}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in components.items()}

    problems: list[str] = []
    try:
        pipe.load_lora_weights(folder, weight_name=DIFFUSERS_LORA)  # offline, older diffusers need the name
        pipe.fuse_lora()
    except Exception as exc:  # the point of the check: any failure is a finding
        print(f"load_lora_weights failed: {type(exc).__name__}: {str(exc)[:300]}")
        return 1
    after = {name: m.state_dict() for name, m in components.items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in file if ".lora_A." in k})
    for module in modules:
        component, path = module.split(".", 1)
        a, b = file[f"{module}.lora_A.weight"].float(), file[f"{module}.lora_B.weight"].float()
        delta = scale * (b.flatten(1) @ a.flatten(1))
        roots = [p for p in (path, f"text_model.{path}") if f"{p}.weight" in before[component]]
        fused = [f"{r}.{leaf}" for r in roots for leaf in ("base_layer.weight", "weight")]
        key = next((k for k in fused if k in after[component]), None)
        if key is None:
            problems.append(f"{module}: no such weight in the {component}")
            continue
        got = (after[component][key].float() - before[component][f"{roots[0]}.weight"].float()).reshape(delta.shape)
        if not torch.allclose(got, delta, atol=1e-5, rtol=1e-3):
            problems.append(f"{module}: weight changed by {got.abs().max():.3g}, expected {delta.abs().max():.3g}")

    embeddings = folder / EMBEDDINGS
    if embeddings.is_file():
        from sdlora.generate.pipeline import load_embeddings

        try:
            load_embeddings(pipe, arch, embeddings, token)
        except Exception as exc:
            problems.append(f"load_textual_inversion failed: {type(exc).__name__}: {str(exc)[:300]}")
        else:
            with safe_open(str(embeddings), framework="pt") as f:
                vectors = {k: f.get_tensor(k) for k in f.keys()}
            keys = ["clip_l", "clip_g"] if arch.uses_pooled else ["emb_params"]
            for tokenizer_name, encoder_name, key in zip(arch.tokenizers, arch.text_encoders, keys):
                token_id = getattr(pipe, tokenizer_name).convert_tokens_to_ids(token)
                row = getattr(pipe, encoder_name).get_input_embeddings().weight[token_id].detach().float()
                if not torch.allclose(row, vectors[key][0].float(), atol=1e-6):
                    problems.append(f"{encoder_name}: the token's embedding row is not the file's {key}")
    for line in problems:
        print(line)
    versions = f"diffusers {diffusers.__version__}, peft {peft.__version__}, transformers {transformers.__version__}"
    print(f"{'FAILED' if problems else 'ok'}: {len(modules)} modules, {versions}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
