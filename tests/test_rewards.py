# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Reward functions: literal tables of positive and negative replies, the registry and the template-copy reward hack."""

import doctest

import pytest

from qerl_repro import rewards
from qerl_repro.rewards import (
    QERL_REWARD_FUNCS,
    REWARD_FUNCS,
    answer_reward,
    answer_starts_with_number_reward,
    extract_answer,
    format_reward,
    get_reward_funcs,
    get_soft_overlong_reward,
    math_verify_latex_reward,
    math_verify_reward,
    numeric_answer_reward,
    shaped_format_reward,
    strict_numeric_format_reward,
)


# The reward hack measured in the CPU demo: the system prompt's template copied verbatim.
TEMPLATE_COPY = "<think> reasoning process here </think> <answer> answer here </answer>"
GOOD = "<think> 48 / 2 = 24, 48 + 24 = 72 </think> <answer> 72 </answer>"


def conversational(text):
    return [{"role": "assistant", "content": text}]


class TestExtractAnswer:
    @pytest.mark.parametrize(
        "text, expected",
        [
            (GOOD, "72"),  # QeRL's format
            ("<answer>72</answer>", "72"),  # no spaces
            ("<answer> 1 </answer> then <answer> 2 </answer>", "2"),  # the last block wins
            ("<think> x </think> <answer> 72", "72"),  # unclosed answer: up to the end, as QeRL's split
            ("<answer>\n  72 clips\n</answer>", "72 clips"),  # stripped, not normalised
            ("<answer></answer>", ""),  # empty answer
            ("The answer is 72.", None),  # no tag
            ("", None),  # empty reply
        ],
    )
    def test_extract_answer(self, text, expected):
        assert extract_answer(text) == expected


class TestFormatReward:
    @pytest.mark.parametrize(
        "text",
        [
            GOOD,  # QeRL's format
            "<think>a</think><answer>b</answer>",  # no whitespace
            "<think>\nstep 1\nstep 2\n</think>\n\n<answer>\n72\n</answer>",  # newlines (DOTALL)
            "Sure! <think> x </think> <answer> y </answer> Done.",  # re.search: text around is allowed
            TEMPLATE_COPY,  # QeRL's soft format accepts the template copy (hence the strict demo reward)
        ],
    )
    def test_positive(self, text):
        assert format_reward([conversational(text)]) == [0.2]
        assert format_reward([text]) == [0.2]  # plain-string completions too

    @pytest.mark.parametrize(
        "text",
        [
            "<think> x </think> The answer is 72.",  # no answer block
            "<answer> 72 </answer>",  # no think block
            "<answer> 72 </answer> <think> x </think>",  # wrong order
            "<think> x </think> so <answer> 72 </answer>",  # text between the blocks (only whitespace allowed)
            "<think> x <answer> 72 </answer>",  # unclosed think
            "",  # empty reply
        ],
    )
    def test_negative(self, text):
        assert format_reward([conversational(text)]) == [0.0]

    def test_prefill_is_prepended(self):
        # With add_assistant_prefill the completion starts after the prefilled "<think>".
        completion = " 48 / 2 = 24 </think> <answer> 72 </answer>"
        assert format_reward([completion]) == [0.0]
        assert format_reward([completion], prefill=["<think>"]) == [0.2]


class TestAnswerReward:
    @pytest.mark.parametrize(
        "text, gold",
        [
            (GOOD, "72"),  # QeRL's format
            ("<answer>72</answer>", "72"),  # no spaces, no think block (correctness only)
            ("<answer> 1 </answer> <answer> 72 </answer>", "72"),  # last block
            ("<think> x </think> <answer> 72", "72"),  # unclosed: QeRL's split still extracts it
            ("72", "72"),  # no tag at all: QeRL's split compares the whole reply
            ("<answer> -5 </answer>", "-5"),  # negative gold
        ],
    )
    def test_positive(self, text, gold):
        assert answer_reward([conversational(text)], solution=[gold]) == [2.0]

    @pytest.mark.parametrize(
        "text, gold",
        [
            ("<answer> 71 </answer>", "72"),  # wrong number
            ("<answer> 72.0 </answer>", "72"),  # exact string match: no normalisation
            ("<answer> 1,080 </answer>", "1080"),  # commas are not removed
            ("<answer> $72 </answer>", "72"),  # currency sign
            ("<answer> 72 </answer> <answer> 7 </answer>", "72"),  # only the last block counts
            ("The answer is 72", "72"),  # no tag: the whole reply is not "72"
            (TEMPLATE_COPY, "72"),  # template copy
        ],
    )
    def test_negative(self, text, gold):
        assert answer_reward([conversational(text)], solution=[gold]) == [0.0]

    def test_total_of_qerl_rewards(self):
        # QeRL's total reward takes the values {0, 0.2, 2.0, 2.2}.
        texts = [GOOD, "<think> x </think> <answer> 7 </answer>", "<answer> 72 </answer>", "nothing"]
        totals = [f + a for f, a in zip(format_reward(texts), answer_reward(texts, solution=["72"] * 4))]
        assert totals == pytest.approx([2.2, 0.2, 2.0, 0.0])


class TestNumericAnswerReward:
    @pytest.mark.parametrize(
        "text, gold",
        [
            ("<answer> 72 </answer>", "72"),  # plain
            ("<answer> 72.0 </answer>", "72"),  # trailing .0
            ("<answer> 72.00 </answer>", "72"),  # trailing .00
            ("<answer> 1,080 </answer>", "1080"),  # thousands comma
            ("<answer> $1,080 </answer>", "1080"),  # currency and comma
            ("<answer> + 72 </answer>", "72"),  # leading plus and space
            ("<answer> -5 </answer>", "-5"),  # negative
            ("<answer> 0.50 </answer>", "0.5"),  # decimal with trailing zero
            ("<answer> 72 </answer>", "72.0"),  # normalisation applies to the gold too
        ],
    )
    def test_positive(self, text, gold):
        assert numeric_answer_reward([conversational(text)], solution=[gold]) == [2.0]

    @pytest.mark.parametrize(
        "text, gold",
        [
            ("<answer> 71 </answer>", "72"),  # wrong number
            ("<answer> 72 clips </answer>", "72"),  # not a bare number
            ("<answer> 7.2 </answer>", "72"),  # different value
            ("<answer> -72 </answer>", "72"),  # sign matters
            ("72", "72"),  # no <answer> tag
            (TEMPLATE_COPY, "72"),  # template copy
            ("<answer> 72 </answer>", "not a number"),  # unparsable gold never matches
        ],
    )
    def test_negative(self, text, gold):
        assert numeric_answer_reward([conversational(text)], solution=[gold]) == [0.0]


class TestMathVerifyReward:
    @pytest.mark.parametrize(
        "text, gold",
        [
            ("<answer> 72 </answer>", "72"),  # plain
            ("<answer> 1,080 </answer>", "1080"),  # thousands comma
            ("<answer> 0.5 </answer>", "1/2"),  # equal values, different forms
            ("<answer> \\frac{1}{2} </answer>", "0.5"),  # LaTeX fraction
            ("<answer> $72$ </answer>", "72"),  # inline math
        ],
    )
    def test_positive(self, text, gold):
        assert math_verify_reward([conversational(text)], solution=[gold]) == [2.0]

    @pytest.mark.parametrize(
        "text, gold",
        [
            ("<answer> 71 </answer>", "72"),  # wrong number
            ("<answer> answer here </answer>", "72"),  # unparsable answer
            ("<answer></answer>", "72"),  # empty answer
            ("The answer is 72", "72"),  # no <answer> tag
        ],
    )
    def test_negative(self, text, gold):
        assert math_verify_reward([conversational(text)], solution=[gold]) == [0.0]

    def test_unparsable_gold_gives_none(self):
        texts = [GOOD, "<answer> abc </answer>"]
        assert math_verify_reward(texts, solution=["no number here", "abc"]) == [None, None]


class TestMathVerifyLatexReward:
    """Big-Math golds are bare LaTeX; math-verify's default parse misreads them (`parse("2\\sqrt{3}")` is 2)."""

    @pytest.mark.parametrize(
        "text, gold",
        [
            ("<answer> 2\\sqrt{3} </answer>", "2\\sqrt{3}"),  # same LaTeX, no box
            ("<answer> \\boxed{2\\sqrt{3}} </answer>", "2\\sqrt{3}"),  # boxed inside the answer tag
            ("<answer> \\sqrt{12} </answer>", "2\\sqrt{3}"),  # equal value, different form
            ("<answer> 2 \\sqrt 3 </answer>", "2\\sqrt{3}"),  # braces omitted
            ("<answer> \\pi/2 </answer>", "\\frac{\\pi}{2}"),  # unparsable gold without the LaTeX wrap
            ("<answer> [1, 2) </answer>", "[1,2)"),  # interval
            ("<answer> \\{4, 3\\} </answer>", "3, 4"),  # a set of answers, any order
            ("<answer> 0.5 </answer>", "\\frac12"),  # decimal vs fraction
            ("<answer> $\\frac{1}{2}$ </answer>", "\\frac{1}{2}"),  # inline math inside the tag
            ("<answer> x = 5 </answer>", "5"),  # an equation for the variable
            ("<answer> 72 </answer>", "72"),  # GSM8K-style plain number
            ("<think> 6 * 7 </think> so the result is \\boxed{42}.", "42"),  # no tag: the boxed answer
        ],
    )
    def test_positive(self, text, gold):
        assert math_verify_latex_reward([conversational(text)], solution=[gold]) == [2.0]

    @pytest.mark.parametrize(
        "text, gold",
        [
            ("<answer> 2 </answer>", "2\\sqrt{3}"),  # math_verify_reward pays this (both parse to 2)
            ("<answer> 3 </answer>", "3, 4"),  # one of two answers
            ("<answer> (1, 2) </answer>", "[1,2)"),  # wrong interval end
            ("<answer> \\boxed{41} </answer>", "42"),  # wrong boxed answer
            ("<answer> 0.333 </answer>", "\\frac{1}{3}"),  # rounded decimal is not the fraction
            ("<answer></answer>", "42"),  # empty answer
            ("<think> 40 + 2 = 42 </think> so 42.", "42"),  # no tag, no box: a bare number is not extracted
        ],
    )
    def test_negative(self, text, gold):
        assert math_verify_latex_reward([conversational(text)], solution=[gold]) == [0.0]

    def test_the_default_parse_would_pay_a_wrong_answer(self):
        # Why this reward exists: the plain math-verify reward scores the bare "2" as 2\sqrt{3}.
        assert math_verify_reward([conversational("<answer> 2 </answer>")], solution=["2\\sqrt{3}"]) == [2.0]

    def test_unparsable_gold_gives_none(self):
        assert math_verify_latex_reward([GOOD], solution=["\\text{}"]) == [None]


class TestSoftOverlongReward:
    """DAPO Eq. 13 through TRL's reward: L = 100 tokens, buffer B = 20 (penalty from L - B = 80 tokens on)."""

    @pytest.mark.parametrize(
        "length, expected",
        [
            (1, 0.0),  # short
            (80, 0.0),  # L - B: last length without penalty
            (81, -0.05),  # first token in the buffer: (80 - 81) / 20
            (90, -0.5),  # middle of the buffer
            (99, -0.95),
            (100, -1.0),  # L: the full penalty
            (101, -1.0),  # beyond L (cannot be generated; TRL's rule)
        ],
    )
    def test_values(self, length, expected):
        reward = get_soft_overlong_reward(max_completion_length=100, buffer_length=20)
        assert reward(completion_ids=[[7] * length]) == [pytest.approx(expected)]

    def test_registry_builds_it_from_the_run_settings(self):
        (reward,) = get_reward_funcs(["soft_overlong"], max_completion_length=10, overlong_buffer_length=4)
        assert reward.__name__ == "soft_overlong_punishment_reward"  # the name TRL logs it under
        assert reward(completion_ids=[[1] * 6, [1] * 8, [1] * 10]) == [0.0, -0.5, -1.0]

    @pytest.mark.parametrize("buffer_length", [0, 11, -3])
    def test_buffer_out_of_range(self, buffer_length):
        with pytest.raises(ValueError, match="overlong_buffer_length"):
            get_soft_overlong_reward(max_completion_length=10, buffer_length=buffer_length)

    def test_registry_needs_the_settings(self):
        with pytest.raises(ValueError, match="overlong_buffer_length"):
            get_reward_funcs(["format", "soft_overlong"])


class TestShapedFormatReward:
    @pytest.mark.parametrize(
        "text, expected",
        [
            (GOOD, 0.2),  # all four tags in order
            (TEMPLATE_COPY, 0.1),  # template phrases are placeholders: the closing tags earn nothing
            ("<think>\n...\n</think> <answer>\n...</answer>", 0.1),  # the skeleton the first CPU demo learned
            ("<think> . . . </think> <answer> … </answer>", 0.1),  # punctuation only is still a placeholder
            ("<think></think><answer></answer>", 0.1),  # empty blocks
            ("<think> 48 / 2 = 24 </think> <answer> ... </answer>", 0.15),  # real thinking, placeholder answer
            ("<think> ... </think> <answer> 72 </answer>", 0.15),  # placeholder thinking, real answer
            ("</think> <answer> 72 </answer>", 0.1),  # a closing tag without its opening tag earns nothing
            ("<think> 48 / 2 = 24 </think> The answer is 72.", 0.1),  # think block only
            ("<think> 48 / 2 = 24", 0.05),  # only the opening tag (the prefill)
            ("<answer> 72 </answer>", 0.1),  # answer block only
            ("<think> x </think> <answer> 72", 0.15),  # unclosed answer
            ("</answer> <answer> </think> <think>", 0.05),  # reversed order: only <think> is found in order
            ("The answer is 72.", 0.0),  # no tags
        ],
    )
    def test_values(self, text, expected):
        assert shaped_format_reward([conversational(text)]) == [pytest.approx(expected)]

    def test_prefill_is_prepended(self):
        assert shaped_format_reward([" 48 / 2 = 24 </think>"], prefill=["<think>"]) == [pytest.approx(0.1)]


class TestStrictNumericFormatReward:
    @pytest.mark.parametrize(
        "text",
        [
            GOOD,  # reasoning and a bare number
            "<think>\n48 / 2 = 24\n48 + 24 = 72\n</think>\n<answer>72</answer>",  # newlines
            "<think> 10 - 15 </think> <answer> -5 </answer>",  # negative number
            "<think> 1000 + 80 </think> <answer> 1,080 </answer>",  # thousands comma is still a number
            "<think> so </think> <answer> 3.5 </answer> trailing text",  # text after the block is allowed
        ],
    )
    def test_positive(self, text):
        assert strict_numeric_format_reward([conversational(text)]) == [0.2]

    @pytest.mark.parametrize(
        "text",
        [
            TEMPLATE_COPY,  # the measured reward hack: the template copied verbatim
            "<think> reasoning process here </think> <answer> 72 </answer>",  # template thinking, real number
            "<think> Reasoning process here. </think> <answer> 72 </answer>",  # case and punctuation variant
            "<think> ... </think> <answer> 72 </answer>",  # the `...` skeleton of the system prompt
            "<think> . . . </think> <answer> 72 </answer>",  # punctuation-only thinking
            "<think> </think> <answer> 72 </answer>",  # empty thinking
            "<think> 48 + 24 </think> <answer> answer here </answer>",  # template answer
            "<think> 48 + 24 </think> <answer> 72 clips </answer>",  # not a bare number
            "<think> 48 + 24 </think> <answer> 72",  # unclosed answer
            "<answer> 72 </answer>",  # no think block
            "<think> 48 + 24 </think> The answer is 72.",  # no answer block
        ],
    )
    def test_negative(self, text):
        assert strict_numeric_format_reward([conversational(text)]) == [0.0]

    def test_template_copy_after_prefill_gets_nothing(self):
        # With the demo's "<think>" prefill the hack is the completion " reasoning process here </think> ...".
        completion = TEMPLATE_COPY.removeprefix("<think>")
        assert strict_numeric_format_reward([completion], prefill=["<think>"]) == [0.0]


class TestAnswerStartsWithNumberReward:
    @pytest.mark.parametrize(
        "text",
        [
            "<answer> 72 </answer>",  # bare number
            "<answer> 72 clips </answer>",  # number then words
            "<answer> -5 </answer>",  # negative
            "<answer> $18 </answer>",  # currency
            "<think> x </think> <answer> 3.5",  # unclosed answer
        ],
    )
    def test_positive(self, text):
        assert answer_starts_with_number_reward([conversational(text)]) == [0.1]

    @pytest.mark.parametrize(
        "text",
        [
            TEMPLATE_COPY,  # "answer here"
            "<answer> The answer is 72 </answer>",  # prose first
            "<answer></answer>",  # empty
            "72",  # no tag
        ],
    )
    def test_negative(self, text):
        assert answer_starts_with_number_reward([conversational(text)]) == [0.0]


class TestGetRewardFuncs:
    @pytest.mark.parametrize(
        "name, function_name",
        [
            ("format", "format_reward"),  # QeRL
            ("answer", "answer_reward"),  # QeRL
            ("numeric_answer", "numeric_answer_reward"),
            ("math_verify", "math_verify_reward"),
            ("math_verify_latex", "math_verify_latex_reward"),  # Big-Math
            ("shaped_format", "shaped_format_reward"),  # CPU demo
            ("strict_numeric_format", "strict_numeric_format_reward"),  # CPU demo
            ("answer_starts_with_number", "answer_starts_with_number_reward"),  # CPU demo
        ],
    )
    def test_registry_names(self, name, function_name):
        (func,) = get_reward_funcs([name])
        assert func.__name__ == function_name
        assert getattr(rewards, function_name) is func

    def test_registry_is_complete(self):
        assert len(REWARD_FUNCS) == 9

    def test_qerl_default(self):
        assert [f.__name__ for f in get_reward_funcs(QERL_REWARD_FUNCS)] == ["format_reward", "answer_reward"]

    def test_unknown_name(self):
        with pytest.raises(ValueError, match="Unknown reward.*'accuracy'.*valid names:.*'answer'.*'format'"):
            get_reward_funcs(["format", "accuracy"])


class TestRewardContract:
    @pytest.mark.parametrize("name", sorted(REWARD_FUNCS))
    def test_batch_and_trainer_kwargs(self, name):
        # TRL calls rewards with prompts, completion_ids, trainer_state, log hooks and every dataset column.
        good = "72" if name == "exact_reply" else GOOD  # the CPU testbed's replies are bare numbers
        completions = [conversational(good), conversational("no format")]
        out = REWARD_FUNCS[name](
            prompts=[[], []],
            completions=completions,
            completion_ids=[[1], [2]],
            solution=["72", "72"],
            question=["q", "q"],
            trainer_state=None,
            log_extra=None,
            log_metric=None,
        )
        assert len(out) == 2
        assert out[0] > 0  # the good reply earns every reward
        assert out[1] == 0.0

    def test_docstring_examples(self):
        result = doctest.testmod(rewards, raise_on_error=False)
        assert result.attempted >= 9 and result.failed == 0
