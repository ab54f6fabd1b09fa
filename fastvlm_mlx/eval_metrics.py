"""The scores of ``python -m fastvlm_mlx.eval``: small pure functions of one prediction and its answers.

Each follows the rules lmms-eval scores the public benchmarks with, quirks included, so that a score here can be
set beside a published one: ``vqa`` (VQAv2), ``textvqa`` (TextVQA: VQAv2's rule after EvalAI's tokenizing),
``anls`` (DocVQA, InfoVQA), ``relaxed`` (ChartQA), ``multiple_choice`` (MMMU's answer parsing, which also reads
AI2D's and ScienceQA's letter answers) and ``exact_match``.  tests/fixtures/make_eval_reference.py runs
lmms-eval's own functions over cases aimed at every rule; tests/test_eval.py checks these give the same scores.
"""

import re
import string

# VQAv2's answer normalisation (the official VQA evaluation, as lmms-eval applies it)
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# the contractions the official table restores: each is reached from itself less any one of its apostrophes
CONTRACTED = """
'ow's'at 'twas ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've mightn't mightn't've must've mustn't
needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've
""".split()
CONTRACTIONS = {form[:i] + form[i + 1 :]: form for form in CONTRACTED for i, c in enumerate(form) if c == "'"} | {
    "somebody'd": "somebodyd"
}  # the official table's one entry written the wrong way round, kept for parity
# the official table's keys "Im", "Ive", "Id've", "I'dve" never match: the words are lower-cased first
VQA_PUNCTUATION = ';/[]"{}()=+\\_->?<@`,!'
DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
PERIOD_STRIP_COUNT = 32  # the official code passes re.UNICODE (32) where sub() takes its count

# ANLS (DocVQA, InfoVQA)
ANLS_THRESHOLD = 0.5
# relaxed accuracy (ChartQA)
RELAXED_TOLERANCE = 0.05
# multiple choice: MMMU's parser trims these from the ends of an answer, one after the other
MC_TRIM = ",.!?;:'"
LETTERS = string.ascii_uppercase


def vqa_punctuation(text: str) -> str:
    """Drop VQA's punctuation marks, or turn them into spaces when none stands beside a space (and no comma sits
    between digits, which drops them all); then the periods not before a digit."""
    drop = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        gone = drop or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if gone else " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=PERIOD_STRIP_COUNT)


def vqa_words(text: str) -> str:
    """Lower-case words with number words as digits, articles dropped and contractions given their apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(text: str) -> str:
    """An answer as VQAv2's evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_words(vqa_punctuation(text))


def normalize_textvqa(text: str) -> str:
    """An answer as lmms-eval's TextVQA compares it: EvalAI's tokenizing (lower case, no commas or question marks,
    possessive 's split off), then VQAv2's normalisation."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa(text)


def consensus(prediction: str, answers: list[str]) -> float:
    """VQA's accuracy over already normalised strings: min(#humans who gave the prediction / 3, 1), averaged
    over the subsets that leave one of the human answers out."""
    if not answers:
        return 0.0
    scores = []
    for left_out in range(len(answers)):
        agree = sum(1 for i, a in enumerate(answers) if i != left_out and a == prediction)
        scores.append(min(1.0, agree / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2's accuracy of one prediction against its (usually ten) human answers."""
    return consensus(normalize_vqa(prediction), [normalize_vqa(a) for a in answers])


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA's accuracy: VQA's rule after TextVQA's normalisation."""
    return consensus(normalize_textvqa(prediction), [normalize_textvqa(a) for a in answers])


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one prediction: 1 - distance / length against the closest
    answer, 0 below ``threshold``.  The distance is between lower-cased, whitespace-collapsed strings; the length
    is the longer of the two as given (as lmms-eval counts it, so surrounding blanks lengthen it)."""
    squeeze = lambda s: " ".join(s.strip().lower().split())  # noqa: E731
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(squeeze(answer), squeeze(prediction)) / length if length else 0.0)
    if not distances:
        return 0.0
    similarity = 1 - min(distances)
    return similarity if similarity >= threshold else 0.0


def _number(text: str) -> float | None:
    """A number as ChartQA reads it (a trailing % divides by 100), or None."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> bool:
    """ChartQA's relaxed correctness: numbers within ``tolerance`` of a non-zero target, relatively; anything
    else the same string up to case."""
    predicted, expected = _number(prediction), _number(target)
    if predicted is not None and expected:
        return abs(predicted - expected) / abs(expected) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: list[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """1 when the prediction is relaxed-correct for any answer."""
    return float(any(relaxed_match(prediction, a, tolerance) for a in answers))


def exact_match(prediction: str, answers: list[str]) -> float:
    """1 when the prediction equals an answer after trimming blanks, lower-casing and dropping ASCII punctuation
    (lmms-eval's exact_match with ignore_case and ignore_punctuation)."""
    plain = lambda s: s.strip().lower().translate(str.maketrans("", "", string.punctuation))  # noqa: E731
    return float(any(plain(prediction) == plain(a) for a in answers))


def choice_letters(count: int) -> list[str]:
    """The letters of ``count`` options: A, B, C, ..."""
    return list(LETTERS[:count])


def parse_choice(prediction: str, choices: list[str]) -> str | None:
    """The option letter a free answer names, by MMMU's rules: "(B)" first, then "B " or "B.", then (in an answer
    of more than five words) an option's text; the last one mentioned wins.  None where it names none (MMMU then
    draws a letter at random; here that scores 0)."""
    letters = choice_letters(len(choices))
    for mark in MC_TRIM:
        prediction = prediction.strip(mark)
    padded = f" {prediction} "
    found = [x for x in letters if f"({x})" in padded]
    if found:
        return max(found, key=lambda x: (padded.rfind(f"({x})"), -letters.index(x)))
    found = [x for x in letters if f"{x} " in padded] or [x for x in letters if f"{x}." in padded]
    if found:
        return max(found, key=lambda x: (padded.rfind(f" {x} "), -letters.index(x)))
    if len(padded.split()) > 5:
        lowered = padded.lower()
        found = [x for x, text in zip(letters, choices) if text.lower() in lowered]
        if found:
            return max(found, key=lambda x: (lowered.rfind(choices[letters.index(x)].lower()), -letters.index(x)))
    return None


def multiple_choice(prediction: str, answer: str, choices: list[str]) -> float:
    """1 when the letter the prediction names is ``answer`` (a letter)."""
    return float(parse_choice(prediction, choices) == answer)


# --metric NAME -> score(prediction, answers) for the free-answer metrics; multiple_choice takes the item's choices
METRICS = {
    "exact_match": exact_match,
    "vqa": vqa_accuracy,
    "textvqa": textvqa_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
}
METRIC_NAMES = (*METRICS, "multiple_choice")
