"""The shapes judges: the domain CLIP (FID features, CLIP score) and the attribute classifier."""

from __future__ import annotations

from pathlib import Path

import torch

from lcmserve.shapes.bundle import CLASSIFIER, CLIP, bundled, model_dir
from lcmserve.shapes.models import BACKGROUND_CLASSES, COLOUR_CLASSES, SHAPE_CLASSES, SIZE_CLASSES, SceneClassifier
from lcmserve.shapes.scenes import CELLS, Scene


def scene_key(scene: Scene) -> tuple[str, dict]:
    return scene.background, {o.cell: (o.shape, o.colour, o.size) for o in scene.objects}


class ShapesJudge:
    """Loads the domain CLIP and the classifier (the bundled ones by default) in float32 on CPU."""

    def __init__(self, clip_dir: str | Path | None = None, classifier_path: str | Path | None = None,
                 batch_size: int = 256) -> None:
        from safetensors.torch import load_file
        from transformers import CLIPModel, CLIPTokenizer

        clip_dir = model_dir(clip_dir) if clip_dir else bundled(CLIP)  # a bundled folder or a training run
        self.clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
        # The bundle keeps the tokenizer beside the model; a training run keeps it in ../tokenizer.
        tokenizer_dir = clip_dir if (clip_dir / "tokenizer_config.json").exists() else clip_dir.parent / "tokenizer"
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        self.classifier = SceneClassifier().eval()
        state = load_file(classifier_path or bundled(CLASSIFIER))
        self.classifier.load_state_dict({k: v.float() for k, v in state.items()})
        self.batch_size = batch_size

    def _batched(self, fn, items):
        return torch.cat([fn(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)])

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled vision features [N, D] of images in [0, 1] (the FID features)."""
        return self._batched(lambda x: self.clip.vision_model(pixel_values=x * 2 - 1).pooler_output, images)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        # Spelled out: get_image_features returns a tensor in transformers 4 and an output object in 5.
        clip = self.clip
        return self._batched(lambda x: clip.visual_projection(clip.vision_model(pixel_values=x * 2 - 1).pooler_output),
                             images)

    @torch.no_grad()
    def text_embeds(self, captions: list[str]) -> torch.Tensor:
        def embed(chunk):
            ids = self.tokenizer(list(chunk), padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            return self.clip.text_projection(self.clip.text_model(input_ids=ids).pooler_output)

        return self._batched(embed, captions)

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[tuple[str, dict]]:
        """What the classifier sees: (background, {cell: (shape, colour, size)}) per image."""
        out = []
        for i in range(0, len(images), self.batch_size):
            logits = self.classifier(images[i : i + self.batch_size])
            shape, colour, size = (logits[k].argmax(-1) for k in ("shape", "colour", "size"))
            bg = logits["background"].argmax(-1)
            for b in range(shape.shape[0]):
                objects = {
                    CELLS[c]: (SHAPE_CLASSES[shape[b, c]], COLOUR_CLASSES[colour[b, c]], SIZE_CLASSES[size[b, c]])
                    for c in range(len(CELLS)) if shape[b, c] != 0
                }
                out.append((BACKGROUND_CLASSES[bg[b]], objects))
        return out
