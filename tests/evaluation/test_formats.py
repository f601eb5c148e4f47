"""Format checks and the superficial / essential labels built on them."""

import json

import pytest

from mcit.data.records import ANSWER_STYLES
from mcit.data.signature import AnswerSignature, answer_type, count_words
from mcit.errors import DataError, EvalError
from mcit.evaluation.extract import extract_letter, parse_single_number
from mcit.evaluation.formats import check_format, label_prediction

CASES = {
    "word": (
        ["red", "Circle.", "traffic light", "a fire hydrant truck"],
        ["", "a big red shiny ball", "B. red", "   "],
    ),
    "number": (["3", "3.", "three", "-2.5", "1,000", "3/4", "twenty-one"], ["3 circles", "three or four", "B", "x"]),
    "letter": (["B", "(C)", "A. square", "The answer is D"], ["circle", "E", "the answer is a circle", "3"]),
    "yesno": (["yes", "No.", "Yes, there is."], ["I think yes", "maybe", "B", "The image shows no dogs"]),
    "caption": (["a red circle on the left", "Two dogs play in the park."], ["B", "3", "yes", "a red circle"]),
    "ocr": (["STOP", "ab12", "9780140449136"[:12], "Exit."], ["two words", "", "abcdefghijklm", "a-b"]),
    "box": (["[0.1, 0.2, 0.5, 0.6]", "(10, 20, 30, 40)", "1 2 3 4"], ["[1, 2, 3]", "box at [1,2,3,4]", "[3,3,1,1]"]),
    "free": (["anything", "B"], ["", "  \n"]),
}


@pytest.mark.parametrize("style", ANSWER_STYLES)
def test_check_format_accepts_and_rejects(style):
    accepted, rejected = CASES[style]
    for prediction in accepted:
        assert check_format(style, prediction), f"{style}: {prediction!r} should be in format"
    for prediction in rejected:
        assert not check_format(style, prediction), f"{style}: {prediction!r} should be out of format"


def test_word_style_with_candidates_requires_one_of_them():
    meta = {"candidates": ["red", "Light Blue", "green"]}
    assert check_format("word", "Red.", meta)
    assert check_format("word", "light blue", meta)
    assert not check_format("word", "purple", meta)
    assert check_format("word", "purple")
    assert check_format("word", "B", {"candidates": ["A", "B", "AB", "O"]})  # blood types: the candidates decide
    assert not check_format("word", "B")


def test_letter_style_follows_the_number_of_choices():
    five = {"choices": ["v", "w", "x", "y", "z"]}
    assert check_format("letter", "E", five)
    assert not check_format("letter", "C", {"choices": ["x", "y"]})


def test_label_prediction_separates_superficial_from_essential():
    assert label_prediction("letter", True, "circle", {"choices": ["square", "circle"]}) == "correct"
    assert label_prediction("letter", False, "a red circle on the left") == "wrong_format"
    assert label_prediction("letter", False, "C") == "wrong_content"
    assert label_prediction("number", False, "yes") == "wrong_format"
    assert label_prediction("number", False, "4") == "wrong_content"
    assert label_prediction("caption", False, "B") == "wrong_format"
    assert label_prediction("caption", False, "a blue square in the corner") == "wrong_content"


def test_unknown_style_is_an_error_naming_valid_styles():
    with pytest.raises(EvalError, match="valid styles: word, number, letter"):
        check_format("sentence", "x")
    with pytest.raises(EvalError, match="unknown answer style"):
        label_prediction("sentence", True, "x")


# --- Answer signatures: superficial vs essential forgetting, SEFE-style ---------------------------------------------
# One question about a photo of a dog on a beach, answered in four styles (SEFE, Chen et al., ICML 2025, Fig. 1).
YESNO = "Yes"
LETTER = "B"
BRIEF = "A golden retriever runs along a sandy beach carrying a long stick in its mouth."
DETAILED = (
    "The image shows a golden retriever running along a sandy beach on a sunny afternoon. It carries a long piece of "
    "driftwood in its mouth and its wet fur shines in the light. Behind it, gentle waves roll onto the shore, and a "
    "few people walk near the water under a clear blue sky."
)
CLASS_NAME = "golden retriever"

CLASS_NAMES = [  # ImageNet-R-like
    "golden retriever", "tabby cat", "goldfish", "great white shark", "bald eagle", "tree frog", "american alligator",
    "tarantula", "peacock", "ladybug", "hermit crab", "king penguin", "killer whale", "pug", "jellyfish", "scorpion",
    "hummingbird", "flamingo", "lobster", "accordion", "violin", "cowboy hat", "school bus", "fire engine",
    "pineapple", "strawberry", "broccoli", "cheeseburger", "lighthouse", "submarine", "backpack", "basketball",
]  # fmt: skip
BRIEF_CAPTIONS = [  # Flickr30k-brief-like, 9-13 words
    "A man in a blue shirt rides a bicycle down a busy street.",
    "Two young girls are playing in a fountain on a hot day.",
    "A brown dog jumps over a log in the woods.",
    "A group of people stand outside a small cafe waiting in line.",
    "A woman in a red dress is dancing on a stage.",
    "Several construction workers in orange vests repair a road at night.",
    "A little boy holds a large balloon at the fair.",
    "An older man sits on a park bench reading a newspaper.",
    "A surfer rides a large wave in the ocean.",
    "Four friends hike up a rocky trail with backpacks on a cloudy afternoon.",
    "A chef prepares food in a crowded restaurant kitchen.",
    "A black and white cat sleeps on a windowsill.",
]
DETAILED_CAPTIONS = [  # 53-56 words each
    "A young woman in a yellow raincoat walks her small brown dog along a wet city sidewalk. Tall brick buildings "
    "line the street on the left, a row of parked cars reflects the grey sky, and a red umbrella rests against a lamp "
    "post while puddles mirror the glowing shop windows behind her.",
    "Three children sit around a wooden kitchen table covered with colourful paper, glue sticks and scissors. The "
    "girl in the middle holds up a paper crown decorated with glitter, the boy on the right is cutting out a star, "
    "and sunlight from a large window falls across the flour jars and potted herbs on the counter.",
    "A fishing boat with a faded blue hull is tied to a weathered wooden pier in a quiet harbour at sunrise. Nets and "
    "orange buoys are piled on its deck, two seagulls stand on the railing, and in the background low green hills "
    "rise above the calm water, which reflects the pink and golden clouds.",
    "An elderly man in a flat cap plays an accordion on a cobblestone square in front of a small cafe. Several "
    "people sit at round metal tables drinking coffee, a waiter in a white apron carries a tray of pastries, and "
    "pigeons gather near an open instrument case that holds a few coins.",
    "A snowboarder in a bright orange jacket and black helmet carves down a steep, powdery slope beneath a clear "
    "blue sky. Snow sprays up behind the board in a wide arc, pine trees dusted with white frame the run on both "
    "sides, and a chairlift carrying skiers climbs the mountain in the distance.",
]
VQA_ANSWERS = ["yes"] * 12 + ["no"] * 8 + ["2", "3", "one", "4", "10"] + [
    "red", "frisbee", "tennis", "kitchen", "white and blue", "pizza", "left", "cat", "umbrella", "skateboarding",
    "wood", "giraffe", "surfing", "black", "traffic light", "grass", "sunny", "bus", "table", "dog", "green",
    "baseball", "horse", "water", "christmas",
]  # 40 % yes/no, 10 % numbers, 50 % short phrases (VQAv2-like)  # fmt: skip

FOUR_ABCD = ["sand", "golden retriever", "seagull", "crab"]
# task -> (style, meta, the one prediction of ANSWERS in its own format)
TASKS = {
    "yesno": ("yesno", {"signature": AnswerSignature.learn(["yes", "no", "No", "Yes"] * 5).to_dict()}, YESNO),
    "mc": ("letter", {"choices": FOUR_ABCD, "signature": AnswerSignature.learn(list("ABCDBCAD")).to_dict()}, LETTER),
    "classes": ("word", {"signature": AnswerSignature.learn(CLASS_NAMES).to_dict()}, CLASS_NAME),
    "brief": ("caption", {"signature": AnswerSignature.learn(BRIEF_CAPTIONS).to_dict()}, BRIEF),
    "detailed": ("caption", {"signature": AnswerSignature.learn(DETAILED_CAPTIONS).to_dict()}, DETAILED),
}
ANSWERS = [YESNO, LETTER, CLASS_NAME, BRIEF, DETAILED]


def test_fixture_lengths_are_what_the_cases_claim():
    assert [count_words(a) for a in (YESNO, LETTER, CLASS_NAME)] == [1, 1, 2]
    assert 10 <= count_words(BRIEF) <= 20 and 45 <= count_words(DETAILED) <= 60
    assert all(8 <= count_words(c) <= 15 for c in BRIEF_CAPTIONS)
    assert all(45 <= count_words(c) <= 60 for c in DETAILED_CAPTIONS)


@pytest.mark.parametrize("task", TASKS)
def test_only_the_tasks_own_style_is_in_format(task):
    style, meta, own = TASKS[task]
    for prediction in ANSWERS:
        in_format = check_format(style, prediction, meta)
        assert in_format == (prediction == own), f"{task}: {prediction[:30]!r} in format = {in_format}"
        expected = "wrong_content" if prediction == own else "wrong_format"
        assert label_prediction(style, False, prediction, meta) == expected
        assert label_prediction(style, True, prediction, meta) == "correct"


def test_the_signature_is_what_rejects_a_style_change_the_declared_style_accepts():
    # Without signatures the declared style alone takes these answers for the task's own form.
    assert check_format("word", YESNO) and check_format("word", "3")
    assert check_format("caption", DETAILED)  # a detailed answer for a brief-caption task
    assert check_format("caption", BRIEF)  # a brief answer for a detailed-caption task
    classes = TASKS["classes"][1]
    assert label_prediction("word", False, "yes", classes) == "wrong_format"
    assert label_prediction("word", False, "3", classes) == "wrong_format"
    assert label_prediction("word", False, "no", {}) == "wrong_content"  # the old count, for contrast
    assert label_prediction("word", False, "tabby cat", classes) == "wrong_content"
    assert label_prediction("word", False, "Siamese cat.", classes) == "wrong_content"  # unseen class, same form


def test_ordinary_variation_inside_a_style_stays_in_format():
    brief = TASKS["brief"][1]
    assert check_format("caption", "A dog runs on the beach with a stick.", brief)
    longer = "A big golden dog with wet fur runs along a sandy beach next to the waves while a few people walk past it."
    assert count_words(longer) == 23 and check_format("caption", longer, brief)
    detailed = TASKS["detailed"][1]
    assert check_format("caption", " ".join([DETAILED_CAPTIONS[0], DETAILED_CAPTIONS[1]]), detailed)  # 109 words
    classes = TASKS["classes"][1]
    assert check_format("word", "great white shark", classes)


def test_a_vqa_like_mixed_task_accepts_yesno_numbers_and_phrases_but_not_a_sentence():
    meta = {"signature": AnswerSignature.learn(VQA_ANSWERS).to_dict()}
    assert AnswerSignature.from_dict(meta["signature"]).allowed == {"yesno", "number", "phrase"}
    for prediction in ["yes", "No.", "2", "three", "white and blue", "frisbee"]:
        assert check_format("word", prediction, meta), prediction
    assert not check_format("word", BRIEF, meta)
    sentence = "A man in shorts throws a frisbee to his dog."  # 10 words: the type VQA answers never have
    assert answer_type(sentence) == "sentence" and not check_format("free", sentence, meta)
    assert label_prediction("word", False, "2", meta) == "wrong_content"
    assert label_prediction("word", False, BRIEF, meta) == "wrong_format"


def test_candidates_take_precedence_over_the_signature():
    meta = {"candidates": ["yes", "no", "tabby cat"], "signature": TASKS["classes"][1]["signature"]}
    assert check_format("word", "yes", meta)
    assert not check_format("word", "golden retriever", meta)


def test_the_signature_is_rebuilt_once_per_task_not_per_prediction(monkeypatch):
    import mcit.evaluation.formats as formats

    formats._signature_from_json.cache_clear()
    calls = []
    original = AnswerSignature.from_dict.__func__
    monkeypatch.setattr(AnswerSignature, "from_dict", classmethod(lambda cls, d: calls.append(1) or original(cls, d)))
    stored = TASKS["classes"][1]["signature"]
    for i in range(3000):  # each sample holds its own copy after a JSON round trip
        check_format("word", CLASS_NAMES[i % len(CLASS_NAMES)], {"signature": json.loads(json.dumps(stored))})
    assert len(calls) == 1
    formats._signature_from_json.cache_clear()


def test_a_malformed_signature_is_an_error_naming_the_key():
    with pytest.raises(EvalError, match=r"meta\['signature'\] must be the dict"):
        check_format("word", "red", {"signature": "phrase"})
    with pytest.raises(DataError, match=r"lacks \['length_band', 'n'\]"):
        check_format("word", "red", {"signature": {"shares": {"phrase": 1.0}}})


CONSISTENCY = ["3", "3.", "three", "-2.5", "1,000", "3/4", "twenty-one", "one two", "hundred", "3 circles",
               "B", "(C)", "B.", "[d]", "A. square", "The answer is D", "option c.", "the answer is a circle", "circle",
               "yes", "No.", "Yes, there is.", "I think yes", "maybe", "[0.1, 0.2, 0.5, 0.6]", "1 2 3 4", "[1, 2, 3]",
               "red", "a red circle"]  # fmt: skip


@pytest.mark.parametrize("text", CONSISTENCY)
def test_answer_types_agree_with_the_scorers_extractors(text):
    # mcit.data.signature cannot import the evaluation layer, so it carries its own classifier: keep the two in step.
    kind = answer_type(text)
    assert (kind == "number") == (parse_single_number(text) is not None)
    all_letters = {"choices": [str(i) for i in range(26)]}
    assert (kind == "letter") == (extract_letter(text, all_letters, use_choice_text=False) is not None)
    assert (kind == "yesno") == check_format("yesno", text)
    assert (kind == "box") == check_format("box", text)
