"""ModalPrompt (`modalprompt`): dual-modality guided prompt learning, no LoRA.

Zeng et al., "ModalPrompt: Dual-Modality Guided Prompt for Continual Learning of Large Multimodal Models" (2024),
as run in MCITlib. The language model and the vision tower stay frozen (the projector trains, as in the reference).
Each task t owns

- `prefix_len` prompt tokens: trainable embedding rows, initialised from random rows of the vocabulary, and
- an MLP `d -> d -> SiLU -> d_feature` mapping those tokens into the space of the image/instruction features.

Its prototype is p_t = mean over its tokens of MLP_t(prompt tokens of t). A sample's score for prompt i is
g_i = 0.5 cos(image feature, p_i) + 0.5 cos(instruction-text feature, p_i). The prompts chosen for a sample are
written into its sequence right after BOS (at the row's start where tokenizer and template write no BOS: Qwen2, the
tiny base), lowest score first, so the best prompt sits nearest the instruction (the reference's order):

- inference: the top-`top_k` prompts by g among the tasks trained so far (paper: 3; MCITlib runs 1);
- training task t (the reference's rule for k > 1): t <= k-1 -> every prompt 1..t in task order; otherwise the
  top-(k-1) earlier prompts by g, then prompt t. With k = 1 only prompt t (MCITlib).

Loss = CE + w_img (1 - cos(image feature, p_t)) + w_txt (1 - cos(text feature, p_t)), batch means, w = 1 by default
(the runner owns CE, weight 1). The selection accuracy (is the top-1 prompt the sample's own task's?) is reported as
the router accuracy of every evaluation row.

How the prompts reach the model: the method does not add vocabulary. Per-sample state travels to whatever batch rows
the evaluator (or the training loop) builds through `SampleRouting` (mcit.methods.experts.rows: rows are recognised by
their prompt tokens, thumbnails tell identical prompts apart), exactly as HiDe/DISCO route. A forward pre-hook on the
model then widens the call: placeholder ids after each row's BOS (so `input_ids` keep their image tokens and every
family finds its images), ones in the attention mask, IGNORE in the labels, zeros in token-type ids, shifted position
ids; a forward hook on the input embeddings puts the prompt rows where the placeholders are. Calls that continue a
KV cache (decoding steps, candidates scored on a prompt cache) carry the caller's narrower mask and positions: the hook
inserts the same number of ones in the mask and shifts the positions, so left padding and batching change nothing.

Deviations from the reference (ModalPrompt's code in MCITlib), each on purpose:
- prompt rows are separate parameters, one per task, outside the vocabulary: earlier tasks' rows get no gradient and
  no optimizer state (the reference trains the whole embedding matrix and writes the frozen rows back before every
  step; the outcome is the same, without touching the vocabulary or the output layer);
- features come from the router's source (`router.source`): `clip` loads CLIP as the reference does (image: CLIP
  image embeddings; text: CLIP text pooled output of the instruction, <= 77 tokens; the reference reads both from
  clip-vit-large-patch14-336); `model` (default, and what the tiny world uses) takes the model's own frozen vision
  tower and input embeddings, as HiDe/DISCO do. Where image and text features have different widths (the model's
  own: vision width vs LM width) the MLP's last layer has one head per modality (its output is split); with equal
  widths (CLIP: 768 and 768) one shared output as in the reference;
- the instruction text is the sample's question (the reference decodes the prompt, drops the system line and cuts at
  " ASSISTANT"); a sample without an image is scored and regularised on text alone (the reference has no such case);
- per-sample features are computed once per task before training (the encoders are frozen, so this equals the
  reference's per-step CLIP forward) and the earlier prompts' scores with them (earlier prompts and MLPs are frozen);
- the reference's trainer puts prompt rows and MLPs into the projector's optimizer group (lr 2e-5 in its scripts);
  here they get `train.lr` unless `prompt_lr` is set (`prompt_lr: 2.0e-5` reproduces the reference).

Not exercised yet: training under ZeRO-3 (the bank's rows are its own parameters, so ZeRO-3 gathers them when the bank
runs inside the forward, but no test covers it; the UCIT recipe uses ZeRO-2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcit.config import TrainConfig
from mcit.data.collate import IGNORE_INDEX
from mcit.data.records import Sample
from mcit.errors import CheckpointError, EvalError, ModelError, RecipeError
from mcit.methods.base import Method, TaskData, register
from mcit.methods.experts.rows import SampleRouting
from mcit.models.loading import set_trainable_extras
from mcit.routing.features import ClipFeatures, FeatureExtractor
from mcit.routing.prototypes import RouterOptions, SampleFeatures, check_router_options
from mcit.runtime import dist
from mcit.runtime.zero import full_shape, visible_parameters

BANK = "mcit_modalprompt"
"""Attribute of the base model holding the prompt rows and MLPs (`mcit_` keys are saved with every checkpoint)."""
IMAGE_SHARE = 0.5
"""Weight of the image cosine in the selection score g (the reference's lam = 0.5)."""


@dataclass
class ModalPromptOptions:
    prefix_len: int = 10
    """Prompt tokens per task (reference: 10 on UCIT, 20 on MLLM-DCL)."""
    top_k: int = 3
    """Prompts prepended at inference (the paper's 3; MCITlib runs 1); training follows the reference's rule."""
    image_loss_weight: float = 1.0
    """Weight of 1 - cos(image feature, p_t) in the loss (CE has weight 1)."""
    text_loss_weight: float = 1.0
    """Weight of 1 - cos(instruction-text feature, p_t) in the loss."""
    prompt_lr: float | None = None
    """Learning rate of the prompt rows and MLPs (None: train.lr; the reference trains them at its projector lr)."""
    router: RouterOptions = field(default_factory=lambda: RouterOptions(features="both"))
    """Feature source (`source`, `image_encoder`, `text_encoder`), `features` and `mode` (`oracle`: the sample's own
    prompt ranks first) as for HiDe/DISCO; `tau` and `max_samples` do not apply (top-k, every training sample)."""


@dataclass(frozen=True)
class FeatureSpace:
    """Widths of the image and text features (None: that modality is not used); the MLP's output layout."""

    image_dim: int | None
    text_dim: int | None

    @property
    def shared(self) -> bool:
        """One output compared with both modalities (equal widths, as CLIP's 768/768 in the reference)."""
        return self.image_dim is not None and self.image_dim == self.text_dim

    @property
    def out_dim(self) -> int:
        if self.shared:
            return int(self.image_dim)
        return (self.image_dim or 0) + (self.text_dim or 0)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image part, text part) of MLP outputs `x` (..., out_dim)."""
        if self.shared:
            return x, x
        image = x[..., :self.image_dim] if self.image_dim else None
        text = x[..., self.image_dim or 0:] if self.text_dim else None
        return image, text

    def pack(self, features: SampleFeatures) -> torch.Tensor:
        """(n, 1 + image_dim + text_dim) rows [has_image, image, text] that travel with batch rows."""
        n = len(features)
        parts = [features.has_image.float()[:, None]]
        for dim, value, name in ((self.image_dim, features.image, "image"), (self.text_dim, features.text, "text")):
            if not dim:
                continue
            if value is None:
                value = torch.zeros(n, dim)
            if value.shape[1] != dim:
                raise ModelError(f"modalprompt: {name} features have width {value.shape[1]}, expected {dim} (the "
                                 "prompt MLPs were sized from the feature source)")
            parts.append(value.float())
        return torch.cat(parts, dim=1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        has_image = rows[:, 0] > 0.5
        start = 1
        image = text = None
        if self.image_dim:
            image, start = rows[:, start:start + self.image_dim], start + self.image_dim
        if self.text_dim:
            text = rows[:, start:start + self.text_dim]
        return has_image, image, text


def prompt_scores(has_image: torch.Tensor, image: torch.Tensor | None, text: torch.Tensor | None,
                  proto_image: torch.Tensor | None, proto_text: torch.Tensor | None) -> torch.Tensor:
    """(n, T) selection scores g = 0.5 cos(image, p) + 0.5 cos(text, p); text alone for samples without an image
    (and image alone when only image features are used)."""
    n = has_image.shape[0]
    rows = proto_image.shape[0] if proto_image is not None else proto_text.shape[0]
    total = torch.zeros(n, rows, dtype=torch.float64)
    weight = torch.zeros(n, 1, dtype=torch.float64)
    if image is not None and proto_image is not None:
        mask = has_image.to(torch.float64)[:, None]
        total += IMAGE_SHARE * _cosine(image, proto_image) * mask
        weight += IMAGE_SHARE * mask
    if text is not None and proto_text is not None:
        share = 1.0 - IMAGE_SHARE if image is not None and proto_image is not None else 1.0
        total += share * _cosine(text, proto_text)
        weight += share
    return total / weight.clamp_min(1e-12)


def _cosine(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.detach().cpu().to(torch.float64), dim=-1) @ \
        F.normalize(protos.detach().cpu().to(torch.float64), dim=-1).T


def inference_selection(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n, min(k, T)) prompt indices per sample: the top-k by score, lowest first (the best sits nearest the text)."""
    k = min(k, scores.shape[1])
    return torch.topk(scores, k, dim=1).indices.flip(1)


def training_selection(previous_scores: torch.Tensor | None, stage: int, k: int, n: int) -> torch.Tensor:
    """(n, m) prompt indices for samples of 0-based `stage` (the reference's rule): k = 1 -> the current prompt only;
    stage + 1 <= k - 1 -> every prompt 0..stage in task order; else the top-(k-1) earlier prompts by score, lowest
    first, then the current one."""
    current = torch.full((n, 1), stage, dtype=torch.long)
    if k <= 1 or stage == 0:
        return current
    if stage + 1 <= k - 1:
        return torch.arange(stage + 1).repeat(n, 1)
    if previous_scores is None or previous_scores.shape != (n, stage):
        raise ModelError(f"modalprompt: stage {stage + 1} needs scores of its {n} samples for {stage} earlier prompts")
    return torch.cat([torch.topk(previous_scores, k - 1, dim=1).indices.flip(1), current], dim=1)


class PromptBank(nn.Module):
    """The prompt rows (`prompt<i>`, prefix_len x d) and MLPs (`mlps.<i>`) of every task so far. Its forward runs
    inside the model's forward (the selected prompts, and for training the current prototype), and the rows are its
    own parameters rather than a ParameterList's, so ZeRO-3 gathers them when the bank is called."""

    def __init__(self) -> None:
        super().__init__()
        self.mlps = nn.ModuleList()

    @property
    def prompts(self) -> list[nn.Parameter]:
        return [getattr(self, f"prompt{i}") for i in range(len(self.mlps))]

    def add(self, rows: torch.Tensor, mlp: nn.Module) -> None:
        self.register_parameter(f"prompt{len(self.mlps)}", nn.Parameter(rows))
        self.mlps.append(mlp)

    def prototype(self, index: int) -> torch.Tensor:
        """p_index = mean over the prompt's tokens of MLP_index(tokens)."""
        mlp = self.mlps[index]
        tokens = getattr(self, f"prompt{index}")
        return mlp(tokens.to(mlp[0].weight.dtype)).mean(dim=0)

    def forward(self, selection: torch.Tensor, current: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows x selected tokens x d) prompt rows for `selection` (rows x m indices), and p_current (None)."""
        stacked = torch.stack(self.prompts)  # (T, P, d); only the trainable prompt carries gradient
        chosen = stacked[selection.to(stacked.device)]  # (rows, m, P, d)
        vectors = chosen.reshape(selection.shape[0], -1, stacked.shape[-1])
        return vectors, (self.prototype(current) if current is not None else None)


class PromptContext:
    """The evaluation context of one group: routed rows get their selected prompts; `.routes[k]` names the top-1
    prompt of the group's k-th sample."""

    def __init__(self, method: ModalPrompt, model, routing: SampleRouting, count: int, routes: Sequence[str]):
        self.method, self.model, self.routing, self.count = method, model, routing, count
        self.routes = list(routes)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> PromptContext:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.routing.attached(self.model))  # first: the insertion reads its rows
        self._stack.enter_context(self.method.inserting(self.model, self.routing, self.count))
        return self

    def __exit__(self, *exc) -> None:
        assert self._stack is not None
        self._stack.close()


@register("modalprompt")
class ModalPrompt(Method):
    Options = ModalPromptOptions

    def __init__(self, recipe, options: ModalPromptOptions):
        super().__init__(recipe, options)
        if options.prefix_len < 1:
            raise RecipeError(f"method.prefix_len must be >= 1 prompt token, got {options.prefix_len}")
        if options.top_k < 1:
            raise RecipeError(f"method.top_k must be >= 1 prompt, got {options.top_k}")
        for key in ("image_loss_weight", "text_loss_weight"):
            if getattr(options, key) < 0:
                raise RecipeError(f"method.{key} must be >= 0, got {getattr(options, key)}")
        if options.prompt_lr is not None and options.prompt_lr <= 0:
            raise RecipeError(f"method.prompt_lr must be > 0 or null, got {options.prompt_lr}")
        if recipe.model.full_finetune:
            raise RecipeError("method modalprompt keeps the language model frozen; set model.full_finetune: false")
        check_router_options(options.router, recipe)
        self.prompt_tasks: list[list[str]] = []
        """Tasks of each prompt (index = stage); a prompt is trained once it has tasks."""
        self.model = None
        self.bank: PromptBank | None = None
        self.space: FeatureSpace | None = None
        self.loss_terms: dict[str, float] = {}
        """Mean of each loss term over the last stage's micro-batches (ce, image, text)."""
        self._extractor: FeatureExtractor | None = None
        self._bos: int | None = None
        self._placeholder = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._proto: torch.Tensor | None = None
        self._train: tuple[contextlib.ExitStack, SampleRouting, int] | None = None
        self._sums: dict[str, float] = {}
        self._count = 0
        self._eval_cache: dict[tuple, torch.Tensor] = {}
        self._routes: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._thumbnails: dict[str, torch.Tensor] = {}

    # --- structure -------------------------------------------------------------------------------------------------
    def setup(self, model):
        model.requires_grad_(False)
        set_trainable_extras(model, self.recipe.model)  # the projector, as the reference trains it
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.bank = PromptBank()
        base.add_module(BANK, self.bank)
        self.model = model
        self._extractor = FeatureExtractor(self.options.router, model, self.ctx.processor)
        self.space = _feature_space(self._extractor, base, self.options.router.features)
        tokenizer = self.ctx.processor.tokenizer
        self._bos = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._placeholder = int(pad if pad is not None else 0)
        return model

    def _base(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _add_prompt(self, index: int) -> None:
        """Prompt `index`: rows copied from random vocabulary rows and a fresh MLP, both seeded by (seed, index), so
        a rebuild creates the same structure (its values are then loaded)."""
        embed = self._base().get_input_embeddings().weight
        vocab, width = full_shape(embed)
        generator = torch.Generator().manual_seed(self.recipe.seed * 7919 + index)
        rows = torch.randint(vocab, (self.options.prefix_len,), generator=generator)
        with visible_parameters([embed]), torch.no_grad():
            init = embed[rows.to(embed.device)].detach().float().clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.seed * 7919 + index)
            mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, self.space.out_dim))
        self.bank.add(init, mlp.to(embed.device))

    def prepare(self, model, stage: int, task_ids: Sequence[int]) -> None:
        while len(self.bank.mlps) <= stage:
            self._add_prompt(len(self.bank.mlps))
        for i, (prompt, mlp) in enumerate(zip(self.bank.prompts, self.bank.mlps)):
            prompt.requires_grad_(i == stage)
            mlp.requires_grad_(i == stage)

    def trained_prompts(self) -> int:
        return sum(1 for tasks in self.prompt_tasks if tasks)

    def prototypes(self, count: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(image part, text part) of p_0..p_{count-1}, detached."""
        params = list(self.bank.parameters())
        with visible_parameters(params), torch.no_grad():
            stacked = torch.stack([self.bank.prototype(i).float() for i in range(count)]).cpu()
        return self.space.split(stacked)

    # --- training --------------------------------------------------------------------------------------------------
    def before_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        self._detach_training()
        while len(self.prompt_tasks) <= stage:
            self.prompt_tasks.append([])
        self.prompt_tasks[stage] = [data.names[t] for t in task_ids]
        samples = self.train_samples(stage, task_ids, data)
        features = self.space.pack(self._extractor(samples))
        has_image, image, text = self.space.unpack(features)
        k = self.options.top_k
        scores = None
        if k > 1 and stage + 1 > k - 1:
            scores = prompt_scores(has_image, image, text, *self.prototypes(stage))
        selection = training_selection(scores, stage, k, len(samples))
        routing = SampleRouting(self.ctx.processor, self.recipe.train.max_length, self._thumbnails)
        routing.register(samples, torch.cat([selection.float(), features], dim=1))
        stack = contextlib.ExitStack()
        stack.enter_context(routing.attached(model))
        stack.enter_context(self.inserting(model, routing, selection.shape[1], current=stage))
        self._train = (stack, routing, selection.shape[1])
        self._sums, self._count = {}, 0

    def _detach_training(self) -> None:
        if self._train is not None:
            self._train[0].close()
            self._train = None
        self._proto = None

    def param_groups(self, model, train: TrainConfig) -> list[dict]:
        mine = {id(p) for p in self.bank.parameters()}
        groups = []
        for group in super().param_groups(model, train):
            prompt = [p for p in group["params"] if id(p) in mine]
            rest = [p for p in group["params"] if id(p) not in mine]
            if prompt:
                groups.append({**group, "params": prompt, "lr": self.options.prompt_lr or train.lr})
            if rest:
                groups.append({**group, "params": rest})
        return groups

    def extra_loss(self, model, batch: dict, outputs) -> torch.Tensor | None:
        """w_img (1 - cos(image, p_t)) + w_txt (1 - cos(text, p_t)), batch means; p_t from this forward pass."""
        if self._train is None or self._proto is None or self._train[1].current is None:
            return None
        _, routing, selected = self._train
        has_image, image, text = self.space.unpack(routing.current[:, selected:].float())
        proto_image, proto_text = self.space.split(self._proto.float())
        self._proto = None
        terms: dict[str, torch.Tensor] = {}
        if image is not None and self.options.image_loss_weight and bool(has_image.any()):
            cos = F.cosine_similarity(image[has_image].to(proto_image.device), proto_image[None], dim=-1)
            terms["image"] = 1.0 - cos.mean()
        if text is not None and self.options.text_loss_weight:
            cos = F.cosine_similarity(text.to(proto_text.device), proto_text[None], dim=-1)
            terms["text"] = 1.0 - cos.mean()
        self._count += 1
        for name, value in [("ce", getattr(outputs, "loss", None)), *terms.items()]:
            if value is not None:
                self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
        self.loss_terms = {k: round(v / self._count, 6) for k, v in self._sums.items()}
        if not terms:
            return None
        weights = {"image": self.options.image_loss_weight, "text": self.options.text_loss_weight}
        return sum(weights[k] * v for k, v in terms.items())

    def after_task(self, model, stage: int, task_ids: Sequence[int], data: TaskData) -> None:
        self._detach_training()

    # --- the prompt insertion --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inserting(self, model, routing: SampleRouting, count: int, current: int | None = None) -> Iterator[None]:
        """While open, every model call gets `count` prompts per row after BOS: the first `count` columns of the
        rows' routed state are the prompt indices; `current` also computes p_current in the forward (training)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        tokens = count * self.options.prefix_len

        def pre_hook(_module, args, kwargs):
            self._pending = None
            if args:
                if len(args) > 1:
                    raise ModelError("modalprompt: call the model with keyword arguments (input_ids=...)")
                kwargs = {"input_ids": args[0], **kwargs}
            ids = kwargs.get("input_ids")
            if ids is None:
                raise EvalError("modalprompt: the model must be called with input_ids (got inputs_embeds only)")
            cache = kwargs.get("past_key_values")
            cache = kwargs.get("cache") if cache is None else cache  # named `cache` since transformers 5.24
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            if past > 0:
                return (), self._continued(kwargs, ids, past, tokens)
            if routing.current is None:
                raise EvalError("modalprompt: no prompt selection for this batch (the routing hook did not run)")
            selection = routing.current[:, :count].round().long()
            vectors, proto = self.bank(selection, current)
            self._proto = proto
            kwargs, where = self._widened(kwargs, ids, tokens)
            self._pending = (where, vectors)
            return (), kwargs

        def embed_hook(_module, _args, output):
            if self._pending is None or output.shape[:2] != self._pending[0].shape:
                return None
            where, vectors = self._pending
            self._pending = None
            return output.masked_scatter(where[..., None].expand_as(output), vectors.to(output.dtype))

        def post_hook(_module, _args, _output):
            if self._pending is not None:
                self._pending = None
                raise ModelError("modalprompt: the model never embedded the widened input_ids, so the prompts were "
                                 "not applied (does this family embed through get_input_embeddings()?)")

        handles = [base.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   base.get_input_embeddings().register_forward_hook(embed_hook),
                   base.register_forward_hook(post_hook)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._pending = None

    def _first_real(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per row, the column of its first unmasked token (rows are left- or right-padded)."""
        if mask is None:
            return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return mask.long().argmax(dim=1)

    def _widened(self, kwargs: dict, ids: torch.Tensor, n: int) -> tuple[dict, torch.Tensor]:
        """A prompt-carrying call's kwargs with `n` placeholder columns after each row's BOS (at its start where
        the row has none: Qwen2's tokenizer, the tiny base's template); and where they are."""
        rows, width = ids.shape
        mask = kwargs.get("attention_mask")
        at = self._first_real(ids, mask)
        if self._bos is not None:
            at = at + (ids.gather(1, at[:, None].clamp(max=width - 1))[:, 0] == self._bos).long()
        columns = torch.arange(width, device=ids.device)
        after = (columns[None] >= at[:, None]).long()  # (rows, width): the token moves right by n
        target = columns[None] + n * after
        out = dict(kwargs)

        def spread(x: torch.Tensor, fill) -> torch.Tensor:
            new = x.new_full((*x.shape[:-1], width + n), fill)
            return new.scatter(-1, target.expand(*x.shape[:-2], rows, width), x)

        where = spread(torch.zeros_like(ids, dtype=torch.bool), True)
        out["input_ids"] = spread(ids, self._placeholder)
        if mask is not None:
            out["attention_mask"] = spread(mask, 1)
        if kwargs.get("labels") is not None:
            out["labels"] = spread(kwargs["labels"], IGNORE_INDEX)
        for key in ("mm_token_type_ids", "token_type_ids"):
            if kwargs.get(key) is not None and kwargs[key].shape == ids.shape:
                out[key] = spread(kwargs[key], 0)
        positions = kwargs.get("position_ids")
        if positions is not None:
            # text positions (rows x width) or multimodal RoPE's (3 x rows x width): the inserted tokens continue
            # from the position of the token they precede, everything after moves n further
            index = at.clamp(max=width - 1).expand(*positions.shape[:-2], rows)[..., None]
            start = positions.gather(-1, index)
            start = torch.where((at >= width).expand_as(start[..., 0])[..., None], start + 1, start)
            moved = spread(positions + n * after, 0)
            inserted = start + torch.arange(n, device=ids.device)
            out["position_ids"] = moved.masked_scatter(where.expand_as(moved), inserted)
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            out["cache_position"] = torch.arange(width + n, device=cache_position.device) + cache_position[0]
        return out, where

    def _continued(self, kwargs: dict, ids: torch.Tensor, past: int, n: int) -> dict:
        """A call on a cache built with prompts: the caller's mask lacks the prompts' columns and its positions
        count without them."""
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.shape[1] == past + ids.shape[1]:
                return out  # the caller already counts every cached column
            if mask.shape[1] + n != past + ids.shape[1]:
                raise EvalError(f"modalprompt: a cached call's attention mask has {mask.shape[1]} columns for "
                                f"{past} cached + {ids.shape[1]} new tokens with {n} prompt tokens in the cache")
            at = self._first_real(ids, mask)  # any column inside the run of ones gives the same mask
            columns = torch.arange(mask.shape[1], device=mask.device)
            target = columns[None] + n * (columns[None] >= at[:, None]).long()
            out["attention_mask"] = mask.new_ones(mask.shape[0], mask.shape[1] + n).scatter(1, target, mask)
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = kwargs["position_ids"] + n
        if kwargs.get("cache_position") is not None:
            out["cache_position"] = kwargs["cache_position"] + n
        return out

    # --- inference -------------------------------------------------------------------------------------------------
    def _eval_features(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Packed features of evaluation samples, cached for one evaluation row (generation and candidate ranking
        see the same samples; `routing_report` clears the cache)."""
        keys = [(s.task, s.id, s.image, s.question) for s in samples]
        missing = [i for i, key in enumerate(keys) if key not in self._eval_cache]
        if missing:
            fresh = self.space.pack(self._extractor([samples[i] for i in missing]))
            for j, i in enumerate(missing):
                self._eval_cache[keys[i]] = fresh[j]
        return torch.stack([self._eval_cache[key] for key in keys])

    def selection_scores(self, samples: Sequence[Sample]) -> torch.Tensor:
        """(n, trained prompts) scores g of `samples` (oracle mode: the sample's own prompt first)."""
        count = self.trained_prompts()
        scores = prompt_scores(*self.space.unpack(self._eval_features(samples)), *self.prototypes(count))
        if self.options.router.mode == "oracle":
            for i, sample in enumerate(samples):
                own = self.prompt_of_task(sample.task)
                if own is not None:
                    scores[i, own] = float("inf")
        return scores

    def prompt_of_task(self, task: str) -> int | None:
        return next((i for i, tasks in enumerate(self.prompt_tasks) if task in tasks), None)

    def _label(self, index: int) -> str:
        return f"prompt{index}:{'+'.join(self.prompt_tasks[index])}"

    def eval_groups(self, model, samples: Sequence[Sample]):
        count = self.trained_prompts()
        if not count or not samples:
            yield contextlib.nullcontext(), list(range(len(samples)))
            return
        selection = inference_selection(self.selection_scores(samples), self.options.top_k)
        top = selection[:, -1].tolist()
        for sample, index in zip(samples, top):
            self._routes[(sample.task, sample.id)] = (self.prompt_tasks[index][0]
                                                      if sample.task not in self.prompt_tasks[index] else sample.task,
                                                      sample.task if self.prompt_of_task(sample.task) is not None
                                                      else None)
        routing = SampleRouting(self.ctx.processor, self.recipe.train.max_length, self._thumbnails)
        routing.register(samples, selection.float())
        # One group: every row carries its own selection, so differently routed samples still share batches.
        yield PromptContext(self, model, routing, selection.shape[1], [self._label(i) for i in top]), \
            list(range(len(samples)))

    def routing_report(self) -> dict[str, Any] | None:
        """Selection accuracy (%): the top-1 prompt is the sample's own task's (over samples of trained tasks), and a
        true-task x top-1-prompt-task confusion (counts); resets for the next evaluation row."""
        self._eval_cache = {}
        if dist.is_distributed():
            for routes in dist.all_gather_objects(self._routes):
                self._routes.update(routes)
        if not self._routes:
            return None
        tasks = list(self.ctx.data.names) if self.ctx.data.names else sorted({t for t, _ in self._routes})
        confusion = [[0] * len(tasks) for _ in tasks]
        hits = total = 0
        for (task, _), (routed, true) in self._routes.items():
            if task in tasks and routed in tasks:
                confusion[tasks.index(task)][tasks.index(routed)] += 1
            if true is not None:
                total += 1
                hits += routed == true
        self._routes = {}
        return {"accuracy": 100.0 * hits / total if total else None, "confusion": confusion, "tasks": tasks,
                "prompts": [self._label(i) for i in range(self.trained_prompts())],
                "top_k": self.options.top_k, "mode": self.options.router.mode}

    # --- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"prompt_tasks": [list(t) for t in self.prompt_tasks], "prefix_len": self.options.prefix_len,
                "feature_dims": {"image": self.space.image_dim, "text": self.space.text_dim},
                "loss_terms": dict(self.loss_terms)}

    def load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        if int(state.get("prefix_len", self.options.prefix_len)) != self.options.prefix_len:
            raise CheckpointError(f"modalprompt: the checkpoint has {state['prefix_len']} prompt tokens per task but "
                                  f"the recipe says method.prefix_len {self.options.prefix_len}")
        dims = state.get("feature_dims", {})
        if dims and (dims.get("image"), dims.get("text")) != (self.space.image_dim, self.space.text_dim):
            raise CheckpointError(f"modalprompt: the checkpoint's prompt MLPs map to features of widths {dims}, this "
                                  f"recipe's feature source gives image {self.space.image_dim} / text "
                                  f"{self.space.text_dim} (method.router.source / features differ)")
        self.prompt_tasks = [list(t) for t in state.get("prompt_tasks", [])]
        self.loss_terms = dict(state.get("loss_terms", {}))
        while len(self.bank.mlps) < len(self.prompt_tasks):
            self._add_prompt(len(self.bank.mlps))


def _feature_space(extractor: FeatureExtractor, base, features: str) -> FeatureSpace:
    """Feature widths from the configured source, known before any data: CLIP's image embeddings and text pooled
    output; or the model's vision tower width (LLaVA-1.5's pooled patches) / LM width (families pooled from the
    projected image tokens) and its input-embedding width."""
    impl = extractor.impl
    if isinstance(impl, ClipFeatures):
        image = impl.vision.config.projection_dim if impl.vision is not None else None
        text = impl.text_model.config.hidden_size if impl.text_model is not None else None
    else:
        width = int(full_shape(base.get_input_embeddings().weight)[1])
        image = int(impl.vision.config.hidden_size) if impl.per_patch_tower else width
        text = width
    return FeatureSpace(image if features != "text" else None, text if features != "image" else None)
