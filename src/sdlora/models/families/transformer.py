"""What the flow-matching transformer families share (FLUX.1, FLUX.2 [klein], Z-Image): the kohya / ComfyUI
file holds the transformer's LoRA in the family's key map (fused q, k, v: fused_lora.py), and FLUX.1's CLIP-L
LoRA in the UNet families' CLIP names (train/kohya.py); image
sides are multiples of 16 (the VAE's 8x, then 2 x 2 latent patches per token); what a family does not train
yet is refused in one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from sdlora.errors import ConfigError
from sdlora.models.families.base import Family


@dataclass(frozen=True)
class TransformerFamily(Family):
    def kohya_keys(self) -> tuple[Callable[[str], Any], Callable[..., dict[str, torch.Tensor]]]:
        """The family's key map: (`kohya_module(path)`, raising for a module the file has no place for;
        `peft_to_kohya(state_dict, alphas)`)."""
        raise NotImplementedError

    def check_options(self, cfg: Any) -> None:
        """What a transformer family does not train yet (FLUX.1 trains the token's embedding: its own), refused
        before any encoding."""
        refused = (
            (cfg.lora.train_text_encoder, "--train-text-encoder: text-encoder LoRAs"),
            (cfg.embedding.train, "--train-token-embedding: pivotal tuning (the token's own embedding)"),
            (cfg.train.snr_gamma is not None, "--snr-gamma: Min-SNR weights (a DDPM noise-schedule weighting)"),
        )
        for asked, what in refused:
            if asked:
                raise ConfigError(
                    f"{what} are not for {self.label} in this sdlora; the transformer's LoRA trains alone"
                )

    def pivotal_tuning(self) -> bool:
        return False  # their text encoders' token embeddings: not in this version (FLUX.1: opt-in)

    def pixel_multiple(self) -> int:
        return 16

    def writes_kohya(self, adapter_config: Any) -> bool:
        """A LoRA: yes. LoKr / LoHa (no fused LyCORIS layout) and DoRA (a fused module's magnitude would need
        the untrained parts' weights): the diffusers / peft file alone."""
        kind = str(getattr(adapter_config, "peft_type", "")).rsplit(".", 1)[-1].lower()
        return kind == "lora" and not getattr(adapter_config, "use_dora", False)

    def check_kohya_names(
        self, paths: Mapping[str, Sequence[str]], denoiser_config: Any, text_encoders: Sequence[Any] | None
    ) -> None:
        from sdlora.train.kohya import KohyaNames

        kohya_module, _ = self.kohya_keys()
        names = KohyaNames.for_text_encoders(self, text_encoders)
        for component, component_paths in paths.items():
            for path in component_paths:
                if component == self.denoiser:
                    kohya_module(path)
                else:
                    names.to_kohya(component, path)

    def kohya_lora(
        self,
        lora: Mapping[str, Mapping[str, torch.Tensor]],
        alphas: Mapping[str, Mapping[str, float]],
        denoiser_config: Any,
        text_encoders: Sequence[Any] | None,
    ) -> dict[str, torch.Tensor]:
        """The transformer's LoRA in the family's key map; a text encoder's (FLUX.1's CLIP-L: `lora_te1_`, the
        CLIP module path with `_`, as sd-scripts' lora_flux.py and ComfyUI name it) in train/kohya.py's names."""
        from sdlora.train.kohya import KohyaNames, peft_to_kohya

        _, peft_to_kohya_denoiser = self.kohya_keys()
        out = peft_to_kohya_denoiser(lora[self.denoiser], alphas[self.denoiser])
        text = {name: sd for name, sd in lora.items() if name != self.denoiser}
        if text:
            out.update(peft_to_kohya(text, alphas, KohyaNames.for_text_encoders(self, text_encoders)))
        return out
