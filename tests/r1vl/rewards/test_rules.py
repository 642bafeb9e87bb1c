"""The paper's rules on one completion's text: step bodies, key steps, StepRVR, the answer
line (docs/method.md)."""
import pytest
from reward_cases import KEY_STEPS, SOLUTION, completion

from r1vl.rewards import final_answer, key_step_match, reference_answer, step_rvr, step_text

# --------------------------------------------------------------------------- StepRAR: key steps


def test_step_text_is_the_authors_regex():
    text = "### Step 1:  First.\nmore\n### Step 2:\nSecond ### Step 9: inline\n### Note\nignored"
    # Bodies run to the next "###" that starts a line; an inline header stays in the body.
    assert step_text(text) == "first.\nmore second ### step 9: inline"


def test_key_step_match_hand_computed():
    # "bd" and the alternative "12/2 = 6" match; "triangle abc" is only in the description,
    # "median" only in the rationale: k = 2/4.
    assert key_step_match(SOLUTION, KEY_STEPS) == 0.5


def test_key_step_match_edges():
    assert key_step_match(SOLUTION, ()) == 0.0  # no key steps: k = 0, not 1
    assert key_step_match(SOLUTION, [["nothing", "X = 6"]]) == 1.0  # case-insensitive, any alt
    assert key_step_match(SOLUTION, [""]) == 0.0  # an empty string is not a match
    assert key_step_match("no steps at all BD = 12/2 = 6", ["bd"]) == 0.0
    assert key_step_match(SOLUTION, {"Steps": ["bd", "zzz"]}) == 0.5  # the record's dict form


def test_key_step_match_normalized_is_opt_in():
    text = completion(steps=("BD = \\frac {12} 2 = 6.0",))
    assert key_step_match(text, ["12/2=6"]) == 0.0
    assert key_step_match(text, ["12/2=6"], normalize=True) == 1.0


# --------------------------------------------------------------------------- StepRVR

@pytest.mark.parametrize("text, expected", [
    (SOLUTION, 1.0),
    (completion(steps=("a",)), 1.0),  # one step is enough
    (completion(numbers=(1, 3)), 0.0),  # a gap
    (completion(numbers=(1, 1)), 0.0),  # a repeat
    (completion(numbers=(2, 3)), 0.0),  # no "### Step 1:" (incomplete)
    (completion(numbers=(1, 2)).replace("### Rationales:", "### Reasons:"), 0.0),
    (completion().replace("### Image Description:", "### Description:"), 0.0),
    (SOLUTION + "\n### The final answer is:\n7", 0.0),  # two final answers
    (SOLUTION.replace("### Rationales:\nAD is a median of BC.\n", "")
     .replace("### Image Description:", "### Rationales:\nr\n### Image Description:"), 0.0),
    (completion(steps=("a", "b"), tail="\n### Step 3:\nafter the answer"), 0.0),
    (SOLUTION.replace("### Step 2:", "### Step 02:"), 1.0),  # int("02") == 2, as the authors
    # Leading zeros do not count towards the digit cap: this is step 2 (it failed before).
    (SOLUTION.replace("### Step 2:", "### Step 0000002:"), 1.0),
    (SOLUTION.replace("### Step 2:", "### Step " + "0" * 100_000 + "2:"), 1.0),
    (SOLUTION.replace("### Step 2:", "### Step 1000002:"), 0.0),  # 7 significant digits
    (SOLUTION.replace("### Step 2:", "### Step " + "9" * 5000 + ":"), 0.0),
])
def test_step_rvr_rules(text, expected):
    assert step_rvr(text) == expected


# --------------------------------------------------------------------------- the answer line

def test_final_answer_takes_first_non_empty_line():
    assert final_answer("### The final answer is:\n\n  6 cm \nmore text") == "6 cm"
    assert final_answer("### The final answer is: 6") == "6"
    assert final_answer("no header") is None
    assert final_answer(completion(answer="   \n\n")) is None  # an empty line is no answer
    assert reference_answer("6") == "6"  # a bare solution is its own answer
    assert reference_answer(SOLUTION) == "6"
