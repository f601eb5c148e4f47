"""ModalPrompt: only the current task's prompt rows and MLP train, selection follows the scores g, the loss carries CE
and the two cosine terms, prompts enter every batch row after BOS (padding and batching change nothing), and a saved
stage reloads to the same generations."""

from __future__ import annotations

import pytest
import torch

from mcit.config import recipe_from_dict
from mcit.data.collate import IGNORE_INDEX, Encoder, PixelCache, collate
from mcit.errors import RecipeError
from mcit.evaluation.generate import _padded, candidate_logprobs, generate
from mcit.methods.base import build_method
from mcit.methods.modalprompt import inference_selection, prompt_scores, training_selection
from mcit.models.families import family_of
from mcit.train.stages import load_stage, save_stage
from tests.methods.harness import build

TWO = ["shape", "mc-color"]


def _batches(ctx, samples, size: int = 4):
    """Training batches of `size` samples, as the runner's collate builds them (small: the steps are the cost)."""
    encoder, pixels = Encoder(ctx.processor, 160), PixelCache(ctx.processor)
    for k in range(0, len(samples), size):
        yield collate([encoder.encode(s) for s in samples[k:k + size]], encoder.tokenizer.pad_token_id, pixels)


def _steps(model, method, ctx, stage: int, steps: int = 2, lr: float = 5e-2) -> list[list[int]]:
    """prepare + before_task + AdamW steps on CE + extra_loss + after_task, as the runner's loop does; returns the
    prompt indices each training sample was registered with."""
    method.prepare(model, stage, [stage])
    method.before_task(model, stage, [stage], ctx.data)
    _, routing, count = method._train
    selected = routing.weights[:, :count].long().tolist()
    optimizer = torch.optim.AdamW([{**g, "lr": lr} for g in method.param_groups(model, method.recipe.train)])
    model.train()
    for _, batch in zip(range(steps), _batches(ctx, method.train_samples(stage, [stage], ctx.data))):
        outputs = model(**batch)
        (outputs.loss + method.extra_loss(model, batch, outputs)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    method.after_task(model, stage, [stage], ctx.data)
    return selected


def _untrained(model, method, tasks) -> None:
    """Prompts for `tasks` without training (their initial rows and MLPs), as if each stage had run."""
    for stage in range(len(tasks)):
        method.prepare(model, stage, [stage])
    method.prompt_tasks = [[t] for t in tasks]


def _set_prototypes(method, vectors: torch.Tensor) -> None:
    """p_i = vectors[i]: the MLP's last layer outputs its bias alone."""
    with torch.no_grad():
        for mlp, v in zip(method.bank.mlps, vectors):
            mlp[2].weight.zero_()
            mlp[2].bias.copy_(v)


def _bank(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.bank.state_dict().items()}


def test_training_task_t_changes_only_its_prompt_and_mlp(synthcit_root):
    model, method, ctx = build(synthcit_root, "modalprompt", tasks=TWO, prefix_len=3)
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "mcit_" not in k}
    _untrained(model, method, TWO[:1])  # task 0's prompt as a finished stage left it
    first = _bank(method)
    method.prepare(model, 1, [1])
    embed = model.get_input_embeddings().weight
    # the new rows start as copies of vocabulary rows
    assert all(bool((embed == row).all(dim=1).any()) for row in method.bank.prompts[1].detach())
    grouped = {id(p) for g in method.param_groups(model, method.recipe.train) for p in g["params"]}
    mine = {id(p) for p in [method.bank.prompts[1], *method.bank.mlps[1].parameters()]}
    earlier = {id(p) for p in [method.bank.prompts[0], *method.bank.mlps[0].parameters()]}
    assert mine <= grouped and not grouped & earlier
    start = _bank(method)
    selected = _steps(model, method, ctx, 1)
    assert {tuple(s) for s in selected} == {(0, 1)}  # k = 3, t = 2 <= k - 1: both prompts in every row
    now = _bank(method)
    for key, value in first.items():
        assert torch.equal(now[key], value), key  # task 0's prompt rows and MLP: used, but bit-identical
    assert all(not torch.equal(now[k], start[k]) for k in now if k not in first)  # task 1's all moved
    assert method.bank.prompts[0].grad is None and method.bank.mlps[0][0].weight.grad is None
    # the harness's recipe leaves the projector frozen: nothing outside the prompt bank moved (LLM, tower, vocabulary)
    assert all("mcit_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(v, base_before[k]) for k, v in model.state_dict().items() if "mcit_" not in k)
    assert method.prompt_tasks == [["shape"], ["mc-color"]]


def test_training_and_inference_selection_rules():
    """The selection rule of training: all prompts in task order while t <= k-1, then the top-(k-1) earlier ones by
    score, lowest first, and the current one last; k = 1 trains the current prompt alone."""
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]], dtype=torch.float64)
    assert training_selection(scores, 3, k=3, n=2).tolist() == [[2, 0, 3], [1, 2, 3]]
    assert training_selection(None, 1, k=3, n=2).tolist() == [[0, 1], [0, 1]]
    assert training_selection(None, 2, k=4, n=1).tolist() == [[0, 1, 2]]
    assert training_selection(scores, 3, k=1, n=2).tolist() == [[3], [3]]
    assert inference_selection(scores, 2).tolist() == [[2, 0], [1, 2]]
    assert inference_selection(scores, 5).tolist() == [[1, 2, 0], [0, 1, 2]]


def test_selection_follows_the_scores_and_is_reported(synthcit_root):
    tasks = ["shape", "mc-color", "caption"]
    model, method, ctx = build(synthcit_root, "modalprompt", tasks=tasks, prefix_len=2, top_k=2)
    _untrained(model, method, tasks)
    samples = [ctx.data.test[t][0] for t in tasks]
    has_image, image, text = method.space.unpack(method._eval_features(samples))
    # prototypes by hand: p_0 = sample 1's features, p_1 = sample 2's, p_2 = sample 0's
    vectors = torch.cat([image, text], dim=1)[[1, 2, 0]]
    _set_prototypes(method, vectors)
    proto_image, proto_text = method.prototypes(3)
    torch.testing.assert_close(proto_image, image[[1, 2, 0]])
    scores = method.selection_scores(samples)
    expected = 0.5 * torch.nn.functional.cosine_similarity(image[:, None].double(), proto_image[None].double(), -1) \
        + 0.5 * torch.nn.functional.cosine_similarity(text[:, None].double(), proto_text[None].double(), -1)
    torch.testing.assert_close(scores, expected)
    assert scores.argmax(1).tolist() == [2, 0, 1]
    groups = list(method.eval_groups(model, samples))
    assert len(groups) == 1 and groups[0][1] == [0, 1, 2]
    assert groups[0][0].routes == ["prompt2:caption", "prompt0:shape", "prompt1:mc-color"]
    report = method.routing_report()
    assert report["accuracy"] == 0.0 and report["confusion"] == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    # the sample's own prototype: top-1 is its own prompt, the runner-up sits before it (lowest first)
    _set_prototypes(method, torch.cat([image, text], dim=1))
    selection = inference_selection(method.selection_scores(samples), 2)
    assert selection[:, -1].tolist() == [0, 1, 2]
    assert selection[:, 0].tolist() == method.selection_scores(samples).topk(2).indices[:, 1].tolist()
    list(method.eval_groups(model, samples))
    assert method.routing_report()["accuracy"] == 100.0
    # a sample without an image is scored on its text alone
    no_image = torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(prompt_scores(no_image, image, text, image, text),
                               torch.nn.functional.cosine_similarity(text[:, None].double(), text[None].double(), -1))


def test_loss_is_ce_plus_two_cosine_terms_that_pull_the_prototype(synthcit_root):
    model, method, ctx = build(synthcit_root, "modalprompt", tasks=TWO, prefix_len=3)
    method.prepare(model, 0, [0])
    method.before_task(model, 0, [0], ctx.data)
    samples = method.train_samples(0, [0], ctx.data)[:4]
    batch = next(_batches(ctx, samples))
    has_image, image, text = method.space.unpack(method.space.pack(method._extractor(samples)))

    def distance() -> tuple[float, float]:
        proto_image, proto_text = method.prototypes(1)
        cos = torch.nn.functional.cosine_similarity
        return (float(1 - cos(image[has_image], proto_image, -1).mean()), float(1 - cos(text, proto_text, -1).mean()))

    start = distance()
    model.train()
    outputs = model(**batch)
    extra = method.extra_loss(model, batch, outputs)
    assert outputs.loss is not None and float(outputs.loss.detach()) > 0
    assert float(extra.detach()) == pytest.approx(sum(start), abs=1e-4)
    assert set(method.loss_terms) == {"ce", "image", "text"}
    assert method.loss_terms["image"] == pytest.approx(start[0], abs=1e-4)
    optimizer = torch.optim.AdamW([{**g, "lr": 2e-2} for g in method.param_groups(model, method.recipe.train)])
    for _ in range(4):
        outputs = model(**batch)
        method.extra_loss(model, batch, outputs).backward()  # the cosine terms alone
        optimizer.step()
        optimizer.zero_grad()
    end = distance()
    assert end[0] < start[0] and end[1] < start[1]
    method.after_task(model, 0, [0], ctx.data)


def _language_inputs(model, call):
    """The inputs_embeds / attention_mask / position_ids the decoder receives during `call()`."""
    seen = {}

    def hook(_module, _args, kwargs):
        seen.update({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    decoder = family_of(model).part(model, "language_model")
    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen


def test_prompts_enter_each_padded_row_after_bos_and_batching_changes_nothing(synthcit_root):
    model, method, ctx = build(synthcit_root, "modalprompt", tasks=TWO, prefix_len=3, top_k=2)
    _untrained(model, method, TWO)
    encoder, pixels = Encoder(ctx.processor, 160), PixelCache(ctx.processor)
    samples = [ctx.data.test["shape"][0], ctx.data.test["mc-color"][0], ctx.data.test["mc-color"][1]]
    prompts = [encoder.prompt_ids(s) for s in samples]
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths: the batch is left-padded
    inputs = _padded(prompts, encoder.tokenizer.pad_token_id, torch.device("cpu"), "left")
    inputs.update(pixels.inputs([s.image for s in samples]))
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate derives them
    plain = _language_inputs(model, lambda: model(**inputs))
    selection = inference_selection(method.selection_scores(samples), 2)
    (context, _), = method.eval_groups(model, samples)
    with context:
        hooked = _language_inputs(model, lambda: model(**inputs))
    n = 2 * 3
    mask = inputs["attention_mask"]
    assert hooked["inputs_embeds"].shape[1] == plain["inputs_embeds"].shape[1] + n
    for row in range(len(samples)):
        first = int(mask[row].argmax())  # no BOS in the tiny template: the prompts open the row's real tokens
        embeds, before = hooked["inputs_embeds"][row], plain["inputs_embeds"][row]
        expected = torch.cat([method.bank.prompts[i].detach() for i in selection[row].tolist()])
        torch.testing.assert_close(embeds[first:first + n], expected)
        torch.testing.assert_close(embeds[:first], before[:first])
        torch.testing.assert_close(embeds[first + n:], before[first:])
        assert hooked["attention_mask"][row].tolist() == [0] * first + [1] * (mask.shape[1] - first + n)
        assert hooked["position_ids"][row, first:].tolist() == list(range(mask.shape[1] - first + n))
    with context:  # decoding steps and candidate scoring continue a cache that holds the prompts
        together = generate(model, encoder, samples, pixels, batch_size=8, max_new_tokens=6)
        alone = [generate(model, encoder, [s], pixels, batch_size=1, max_new_tokens=6)[0] for s in samples]
        cands = [["circle", "square", "red"]] * 3
        scored = candidate_logprobs(model, encoder, samples, cands, pixels, batch_size=8, chunk=2)
        singly = [candidate_logprobs(model, encoder, [s], [c], pixels)[0] for s, c in zip(samples, cands)]
    assert together == alone
    torch.testing.assert_close(torch.tensor(scored), torch.tensor(singly), atol=1e-4, rtol=0)


def test_widened_training_row_after_bos(synthcit_root):
    """A right-padded training batch whose rows start with BOS: prompts after BOS, labels ignored there, positions
    shifted; a left-padded one with position ids likewise."""
    _, method, _ = build(synthcit_root, "modalprompt", tasks=TWO, prefix_len=2)
    method._bos, method._placeholder = 1, 9
    ids = torch.tensor([[1, 5, 6, 7], [1, 5, 0, 0]])
    kwargs = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
              "labels": torch.tensor([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]])}
    out, where = method._widened(kwargs, ids, 2)
    assert out["input_ids"].tolist() == [[1, 9, 9, 5, 6, 7], [1, 9, 9, 5, 0, 0]]
    assert where.tolist() == [[False, True, True, False, False, False]] * 2
    assert out["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert out["labels"][:, 1:3].eq(IGNORE_INDEX).all() and out["labels"][0, 3:].tolist() == [5, 6, 7]
    left = torch.tensor([[0, 1, 5, 6], [1, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    out, where = method._widened({"input_ids": left, "attention_mask": mask,
                                  "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}, left, 2)
    assert out["input_ids"].tolist() == [[0, 1, 9, 9, 5, 6], [1, 9, 9, 5, 6, 7]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == (out["attention_mask"].cumsum(-1) - 1).clamp(min=0).tolist()


def test_a_saved_stage_reloads_to_the_same_generations(synthcit_root, tmp_path):
    model, method, ctx = build(synthcit_root, "modalprompt", tasks=TWO, prefix_len=3, top_k=1)
    _untrained(model, method, TWO)
    with torch.no_grad():  # move every prompt tensor away from its seeded start, as training would
        for p in method.bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoder, pixels = Encoder(ctx.processor, 160), PixelCache(ctx.processor)
    samples = ctx.data.test["shape"][:2] + ctx.data.test["mc-color"][:2]

    def answers(m, md):
        (context, _), = m.eval_groups(md, samples)
        with context:
            return generate(md, encoder, samples, pixels, batch_size=8, max_new_tokens=6)

    before = answers(method, model)
    save_stage(model, method, tmp_path / "stage", 1, "mc-color")
    fresh_model, fresh, _ = build(synthcit_root, "modalprompt", tasks=TWO, prefix_len=3, top_k=1)
    for stage in range(2):  # as rebuild_stage replays prepare before loading
        fresh.prepare(fresh_model, stage, [stage])
    assert not torch.equal(fresh.bank.prompts[0], method.bank.prompts[0])
    load_stage(fresh_model, fresh, tmp_path / "stage")
    saved, loaded = _bank(method), _bank(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert fresh.prompt_tasks == [["shape"], ["mc-color"]]
    assert answers(fresh, fresh_model) == before


@pytest.mark.parametrize("options, message", [
    ({"prefix_len": 0}, "prefix_len"), ({"top_k": 0}, "top_k"), ({"image_loss_weight": -1.0}, "image_loss_weight"),
    ({"prompt_lr": 0.0}, "prompt_lr"),
])
def test_option_errors(options, message):
    recipe = recipe_from_dict({"output_dir": "x", "method": {"name": "modalprompt", **options}})
    with pytest.raises(RecipeError, match=message):
        build_method(recipe)
    with pytest.raises(RecipeError, match="full_finetune"):
        build_method(recipe_from_dict({"output_dir": "x", "model": {"full_finetune": True},
                                       "method": {"name": "modalprompt"}}))
