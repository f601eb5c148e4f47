"""Router features of samples: the base model's own frozen vision tower and input embeddings (`source: model`), or
external CLIP encoders (`source: clip`), pooled to one image and one instruction-text vector per sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mcit.data.collate import PixelCache
from mcit.data.records import Sample
from mcit.errors import ModelError
from mcit.models.families import family_of
from mcit.routing.prototypes import TEXT_TOKENS, RouterOptions, SampleFeatures
from mcit.runtime.precision import eval_mode
from mcit.runtime.zero import visible_parameters


class ModelFeatures:
    """Router features from the base model's own frozen vision tower and input embeddings.

    A LLaVA-1.5-style model (one fixed-size image through a CLIP tower) is pooled as HiDe-LLaVA and DISCO pool it:
    the tower's hidden states at the layer the model reads (`vision_feature_layer`), CLS left out, averaged over the
    patches. Other families (Qwen2-VL's patch rows, OneVision's anyres tiles, InternVL's and Idefics3's tiles) give
    each image a variable number of features, so their images are pooled from the model's own
    `get_image_features` (the projected image tokens the LLM reads), averaged over each image's tokens."""

    def __init__(self, model, processor):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.family = family_of(base)
        try:
            self.vision = self.family.part(base, "vision_tower")
        except ModelError as exc:
            raise ModelError(f"router source 'model': {exc}; use method.router.source: clip") from None
        self.base = base
        self.per_patch_tower = self.family.name == "llava"
        self.embed = base.get_input_embeddings()
        self.layer = getattr(base.config, "vision_feature_layer", -1)
        if isinstance(self.layer, (list, tuple)):
            self.layer = self.layer[-1]
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def image(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One pooled vector per image of `inputs` (a PixelCache batch: pixel_values and the family's extras); for
        the families pooled from `get_image_features`, `inputs` holds one image (how a batch's features split into
        images differs by family: InternVL returns tiles, Qwen2-VL patch rows)."""
        params = list(self.vision.parameters())
        device, dtype = params[0].device, params[0].dtype
        if self.per_patch_tower:
            with visible_parameters(params), eval_mode(self.vision):
                out = self.vision(inputs["pixel_values"].to(device, dtype), output_hidden_states=True)
                hidden = out.hidden_states[self.layer]
                start = 1 if self.family.vision_cls else 0  # CLS is dropped as LLaVA drops it
                return hidden[:, start:].float().mean(dim=1).cpu()
        moved = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
        # only the image path's weights are gathered under ZeRO-3, never the language model's
        image_params = params + list(self.family.part(self.base, "projector").parameters())
        with visible_parameters(image_params), eval_mode(self.base):
            features = self.base.get_image_features(**moved)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, torch.Tensor):
            features = [features]
        # one image's features in whatever grouping the family returns (tiles, patch rows): averaged over them all
        return torch.cat([f.reshape(-1, f.shape[-1]).float() for f in features]).mean(dim=0, keepdim=True).cpu()

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        weight = self.embed.weight
        with visible_parameters([weight]):
            rows = []
            for text in texts:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:TEXT_TOKENS] or \
                    [self.tokenizer.pad_token_id]
                rows.append(weight[torch.tensor(ids, device=weight.device)].float().mean(dim=0).cpu())
            return torch.stack(rows)


class ClipFeatures:
    """Router features from external CLIP encoders (image embeddings; pooled text output of the instruction)."""

    def __init__(self, image_encoder: str | None, text_encoder: str | None, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.vision = self.image_processor = self.text_model = self.tokenizer = None
        try:
            if image_encoder:
                from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

                self.vision = CLIPVisionModelWithProjection.from_pretrained(image_encoder).to(self.device).eval()
                self.image_processor = AutoImageProcessor.from_pretrained(image_encoder)
            if text_encoder:
                from transformers import AutoTokenizer, CLIPTextModel

                self.text_model = CLIPTextModel.from_pretrained(text_encoder).to(self.device).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(text_encoder)
        except OSError as exc:
            raise ModelError(f"method.router: cannot load CLIP encoder {image_encoder or text_encoder!r} "
                             f"({type(exc).__name__}: {exc}); download it where you have internet and set "
                             "method.router.image_encoder / text_encoder to the local directory") from exc
        for module in (self.vision, self.text_model):
            if module is not None:
                module.requires_grad_(False)

    def image(self, images: list) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.vision(pixel_values=pixels).image_embeds.float().cpu()

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=TEXT_TOKENS, return_tensors="pt")
        out = self.text_model(**{k: v.to(self.device) for k, v in enc.items()})
        return out.pooler_output.float().cpu()  # the references route on the pooled output, before projection


class FeatureExtractor:
    """Samples -> SampleFeatures, with the configured source; images are read through the run's processor."""

    def __init__(self, options: RouterOptions, model, processor):
        self.options = options
        self.processor = processor
        if options.source == "clip":
            device = next(model.parameters()).device
            self.impl: Any = ClipFeatures(options.image_encoder if options.features != "text" else None,
                                          options.text_encoder if options.features != "image" else None, device)
        else:
            self.impl = ModelFeatures(model, processor)
        self.pixels = PixelCache(processor, 0)  # each sample's image is read once

    @torch.no_grad()
    def __call__(self, samples: Sequence[Sample]) -> SampleFeatures:
        opts = self.options
        images, texts, has = [], [], []
        for start in range(0, len(samples), opts.batch_size):
            chunk = samples[start:start + opts.batch_size]
            if opts.features != "image":
                texts.append(self.impl.text([s.question for s in chunk]))
            if opts.features != "text":
                with_image = [s for s in chunk if s.image]
                rows = self._images(with_image) if with_image else None
                block = None
                if rows is not None:
                    block = torch.zeros(len(chunk), rows.shape[1])
                    block[torch.tensor([i for i, s in enumerate(chunk) if s.image])] = rows
                images.append(block)
            has.append(torch.tensor([bool(s.image) for s in chunk], dtype=torch.bool))
        has_image = torch.cat(has) if has else torch.zeros(0, dtype=torch.bool)
        image = None
        if opts.features != "text" and any(b is not None for b in images):
            dim = next(b.shape[1] for b in images if b is not None)
            image = torch.cat([b if b is not None else torch.zeros(len(h), dim) for b, h in zip(images, has)])
        text = torch.cat(texts) if texts else None
        return SampleFeatures(image=image, has_image=has_image if image is not None else
                              torch.zeros_like(has_image), text=text)

    def _images(self, samples: Sequence[Sample]) -> torch.Tensor:
        if isinstance(self.impl, ClipFeatures):
            from PIL import Image

            loaded = []
            for s in samples:
                with Image.open(s.image) as img:
                    loaded.append(img.convert("RGB"))
            return self.impl.image(loaded)
        if self.impl.per_patch_tower:
            return self.impl.image(self.pixels.inputs([s.image for s in samples]))
        return torch.cat([self.impl.image(self.pixels.inputs([s.image])) for s in samples])
