# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""GSM8K loading (local JSONL and the Hub error path), answer normalisation and the assistant prefill."""

import doctest
import json
import logging
import os
import time

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from qerl_repro import data
from qerl_repro.data import (
    QERL_SYSTEM_PROMPT,
    GSM8KLoadReport,
    add_assistant_prefill,
    extract_gsm8k_solution,
    load_bigmath,
    load_gsm8k,
    make_prompt,
    normalize_number,
)


GSM8K_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
requires_local_gsm8k = pytest.mark.skipif(
    not os.path.isfile(os.path.join(GSM8K_DIR, "train.jsonl")), reason="test requires ../shared/data/gsm8k"
)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


class TestNormalizeNumber:
    @pytest.mark.parametrize(
        "text, expected",
        [
            ("72", "72"),  # plain integer
            (" 72 ", "72"),  # surrounding spaces
            ("1,080", "1080"),  # thousands comma
            ("109,200,000", "109200000"),  # several commas (a GSM8K train gold)
            ("$18", "18"),  # currency sign
            ("$ 1,080.00", "1080"),  # all of them
            ("+5", "5"),  # leading plus
            ("-5", "-5"),  # negative
            ("-0", "0"),  # negative zero
            ("72.0", "72"),  # trailing .0
            ("72.00", "72"),  # trailing .00
            ("3.50", "3.5"),  # trailing decimal zero
            ("72.", "72"),  # bare decimal point
            (".5", "0.5"),  # leading decimal point
            ("007", "7"),  # leading zeros
            ("0.25", "0.25"),  # decimal kept
            ("12345678901234567890", "12345678901234567890"),  # no float rounding
        ],
    )
    def test_numeric(self, text, expected):
        assert normalize_number(text) == expected

    @pytest.mark.parametrize(
        "text",
        [
            "",  # empty
            "abc",  # words
            "72 clips",  # number and words
            "1/2",  # fraction
            "5%",  # percent
            "1e3",  # exponent notation
            "--5",  # double sign
            "-",  # sign only
            ".",  # point only
            "1.2.3",  # two points
            None,  # missing
        ],
    )
    def test_not_numeric(self, text):
        assert normalize_number(text) is None


class TestExtractGsm8kSolution:
    @pytest.mark.parametrize(
        "answer, expected",
        [
            ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),  # GSM8K gold format
            ("#### 72", "72"),  # gold only
            ("####72", "72"),  # no space
            ("... = 1,080\n#### 1,080", "1080"),  # comma in the gold (79 train / 14 test rows)
            ("#### -3", "-3"),  # negative
            ("#### $5.00", "5"),  # currency and decimals
            ("#### 1\n#### 2", "2"),  # last marker wins
        ],
    )
    def test_valid(self, answer, expected):
        assert extract_gsm8k_solution(answer) == expected

    @pytest.mark.parametrize(
        "answer",
        [
            "The answer is 72",  # no marker
            "#### ",  # nothing after the marker
            "#### seventy-two",  # words
            "",  # empty
            None,  # missing
        ],
    )
    def test_invalid(self, answer):
        assert extract_gsm8k_solution(answer) is None


class TestSystemPrompt:
    def test_verbatim_qerl_prompt(self):
        # QeRL's triple-quoted string: leading newline, 8-space indentation, "\n    " at the end.
        assert QERL_SYSTEM_PROMPT.startswith("\n        Solve the following math problem step by step.")
        assert "i.e., <think> reasoning process here </think> <answer> answer here </answer>: \n" in QERL_SYSTEM_PROMPT
        assert QERL_SYSTEM_PROMPT.endswith("        </answer>\n    ")
        assert QERL_SYSTEM_PROMPT.splitlines()[2:] == [
            "        <think>",
            "        ...",
            "        </think>",
            "        <answer>",
            "        ...",
            "        </answer>",
            "    ",
        ]

    def test_make_prompt(self):
        assert make_prompt("Q?") == [
            {"role": "system", "content": QERL_SYSTEM_PROMPT},
            {"role": "user", "content": "Q?"},
        ]
        assert make_prompt("Q?", system_prompt=None) == [{"role": "user", "content": "Q?"}]


@requires_local_gsm8k
class TestLoadLocalGsm8k:
    @pytest.mark.parametrize("split, num_rows", [("train", 7473), ("test", 1319)])
    def test_real_files(self, split, num_rows):
        dataset, report = load_gsm8k(split, dataset_path=GSM8K_DIR, return_report=True)
        assert len(dataset) == num_rows
        assert report.num_read == report.num_valid == report.num_returned == num_rows
        assert report.num_skipped == 0
        assert set(dataset.column_names) == {"prompt", "solution", "question"}
        assert all(normalize_number(s) == s for s in dataset["solution"])

    def test_first_train_row(self):
        dataset = load_gsm8k("train", dataset_path=GSM8K_DIR, limit=2)
        assert len(dataset) == 2
        row = dataset[0]
        assert row["solution"] == "72"
        assert row["question"].startswith("Natalia sold clips to 48 of her friends")
        assert row["prompt"] == [
            {"role": "system", "content": QERL_SYSTEM_PROMPT},
            {"role": "user", "content": row["question"]},
        ]
        assert dataset[1]["solution"] == "10"

    def test_file_path_and_seed(self):
        path = os.path.join(GSM8K_DIR, "test.jsonl")
        first = load_gsm8k("test", dataset_path=path, limit=5, seed=0)
        again = load_gsm8k("test", dataset_path=path, limit=5, seed=0)
        unshuffled = load_gsm8k("test", dataset_path=path, limit=5)
        assert first["question"] == again["question"]
        assert first["question"] != unshuffled["question"]


class TestLoadMalformed:
    def test_malformed_rows_are_counted_and_skipped(self, tmp_path, caplog):
        path = write_jsonl(
            tmp_path / "train.jsonl",
            [
                {"question": "Q1", "answer": "#### 72"},  # line 1: valid
                {"question": "Q2", "answer": "no marker"},  # line 2: no ####
                "",  # line 3: blank lines are allowed
                {"question": "  ", "answer": "#### 3"},  # line 4: empty question
                {"question": "Q5", "answer": "#### many"},  # line 5: non-numeric answer
                {"question": "Q6"},  # line 6: missing answer
                {"answer": "#### 7"},  # line 7: missing question
                {"question": "Q8", "answer": "x\n#### 1,080"},  # line 8: valid
                {"question": "Q9", "answer": None},  # line 9: answer is not a string
            ],
        )
        with caplog.at_level(logging.WARNING, logger="qerl_repro.data"):
            dataset, report = load_gsm8k(dataset_path=str(tmp_path), return_report=True)
        assert dataset["question"] == ["Q1", "Q8"]
        assert dataset["solution"] == ["72", "1080"]
        assert isinstance(report, GSM8KLoadReport)
        assert report.source == path
        assert (report.num_read, report.num_valid, report.num_skipped) == (8, 2, 6)
        assert report.skipped == {"no_####": 1, "empty_question": 1, "non_numeric_answer": 1, "missing_keys": 3}
        assert report.examples == {
            "no_####": [2],
            "empty_question": [4],
            "non_numeric_answer": [5],
            "missing_keys": [6, 7, 9],
        }
        assert "skipped 6 of 8 rows" in caplog.text and "[6, 7, 9]" in caplog.text

    def test_examples_are_capped(self, tmp_path):
        write_jsonl(
            tmp_path / "train.jsonl", [{"question": "Q", "answer": "#### 1"}] + [{"question": "Q", "answer": "?"}] * 9
        )
        _, report = load_gsm8k(dataset_path=str(tmp_path), return_report=True)
        assert report.skipped == {"no_####": 9}
        assert report.examples == {"no_####": [2, 3, 4, 5, 6]}

    def test_not_jsonl(self, tmp_path):
        path = write_jsonl(tmp_path / "train.jsonl", [{"question": "Q", "answer": "#### 1"}, "question,answer", "{}"])
        with pytest.raises(ValueError, match=rf"{path} is not valid JSONL: line 2 is not JSON"):
            load_gsm8k(dataset_path=path)

    def test_json_array_line(self, tmp_path):
        path = write_jsonl(tmp_path / "train.jsonl", ['["Q", "#### 1"]'])
        with pytest.raises(ValueError, match=r"line 1 is a JSON list, expected an object"):
            load_gsm8k(dataset_path=path)

    def test_missing_columns(self, tmp_path):
        path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "Q", "answer": "#### 1"}, {"problem": "Q2"}])
        with pytest.raises(ValueError, match=rf"{path} is not a GSM8K file: no row has column\(s\) \['question'\]"):
            load_gsm8k(dataset_path=path)

    def test_all_rows_malformed(self, tmp_path):
        write_jsonl(tmp_path / "test.jsonl", [{"question": "Q", "answer": "no marker"}])
        with pytest.raises(ValueError, match="no usable GSM8K rows"):
            load_gsm8k("test", dataset_path=str(tmp_path))

    def test_missing_split_file(self, tmp_path):
        write_jsonl(tmp_path / "train.jsonl", [{"question": "Q", "answer": "#### 1"}])
        with pytest.raises(FileNotFoundError, match=r"No test.jsonl in .*train.jsonl"):
            load_gsm8k("test", dataset_path=str(tmp_path))


class TestLoadHub:
    def test_hub_rows(self, monkeypatch):
        import datasets

        def fake_load_dataset(name, config, split):
            assert (name, config, split) == ("openai/gsm8k", "main", "test")
            return Dataset.from_dict({"question": ["Q0", "Q1", "Q2"], "answer": ["#### 1", "none", "#### 2,000"]})

        monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
        dataset, report = load_gsm8k("test", return_report=True)
        assert dataset["solution"] == ["1", "2000"]
        assert report.examples == {"no_####": [1]}  # Hub rows are numbered by 0-based index
        assert report.source == "openai/gsm8k (main) on the Hub"

    def test_hub_missing_column(self, monkeypatch):
        import datasets

        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_dict({"problem": ["Q"]}))
        with pytest.raises(ValueError, match=r"lacks column\(s\) \['question', 'answer'\]; it has \['problem'\]"):
            load_gsm8k("train")

    def test_offline_error_suggests_dataset_path(self):
        assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest.py
        start = time.perf_counter()
        with pytest.raises(
            ConnectionError, match=r"'openai/gsm8k'.*unreachable.*--dataset_path \.\./shared/data/gsm8k"
        ):
            load_gsm8k("train")
        assert time.perf_counter() - start < 30  # fails fast, no retries


class TestAssistantPrefill:
    @pytest.fixture
    def tokenizer(self, tiny_model_dir):
        return AutoTokenizer.from_pretrained(tiny_model_dir)

    @pytest.fixture
    def dataset(self):
        rows = [{"prompt": make_prompt(q), "solution": s, "question": q} for q, s in [("1+1?", "2"), ("2+2?", "4")]]
        return Dataset.from_list(rows)

    def test_prompt_ends_in_open_assistant_turn(self, tokenizer, dataset):
        prefilled = add_assistant_prefill(dataset, tokenizer)
        assert set(prefilled.column_names) == {"prompt", "solution", "question", "prefill"}
        assert prefilled["prefill"] == ["<think>", "<think>"]
        for row, original in zip(prefilled, dataset):
            generation_prompt = tokenizer.apply_chat_template(
                original["prompt"], tokenize=False, add_generation_prompt=True
            )
            assert row["prompt"] == generation_prompt + "<think>"
            # TRL tokenizes plain-text prompts with `tokenizer(text=...)`: same ids as the chat template + prefill.
            template_ids = tokenizer.apply_chat_template(
                original["prompt"], add_generation_prompt=True, return_dict=True
            )
            ids = tokenizer(text=row["prompt"])["input_ids"]
            assert ids[: len(template_ids["input_ids"])] == template_ids["input_ids"]

    def test_trl_closes_a_conversational_prefill(self, tokenizer, dataset):
        # Why the helper renders text: GRPOTrainer 1.16 uses add_generation_prompt=True for conversational prompts,
        # which closes a final assistant message and opens a new turn.
        conversation = dataset[0]["prompt"] + [{"role": "assistant", "content": "<think>"}]
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<think><|im_end|>\n<|im_start|>assistant\n")

    def test_rejects_double_prefill(self, tokenizer, dataset):
        prefilled_conversation = dataset.map(
            lambda r: {"prompt": r["prompt"] + [{"role": "assistant", "content": "x"}]}
        )
        with pytest.raises(ValueError, match="already ends in an assistant message"):
            add_assistant_prefill(prefilled_conversation, tokenizer)

    def test_rejects_tokenizer_adding_bos(self, tokenizer, dataset):
        class BosAddingTokenizer:
            def apply_chat_template(self, *args, **kwargs):
                return tokenizer.apply_chat_template(*args, **kwargs)

            def __call__(self, text, add_special_tokens=True):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                return {"input_ids": ([0] if add_special_tokens else []) + ids}

        with pytest.raises(ValueError, match="adds special tokens to plain text"):
            add_assistant_prefill(dataset, BosAddingTokenizer())

    def test_grpo_trainer_generates_after_the_prefill(self, tiny_model_dir, tokenizer, dataset, tmp_dir):
        # One GRPO step on the tiny model: the trainer accepts the text prompts, and rewards receive the `prefill`
        # column next to completions that start after it.
        from trl import GRPOConfig, GRPOTrainer

        seen = {}

        def spy_reward(completions, solution, **kwargs):
            seen.update(prompts=kwargs["prompts"], completions=completions, prefill=kwargs["prefill"])
            return [0.0] * len(completions)

        args = GRPOConfig(
            output_dir=tmp_dir,
            per_device_train_batch_size=3,  # 3 completions per step
            num_generations=3,  # one prompt x 3 generations
            max_completion_length=8,  # short: this only checks the data path
            learning_rate=0.1,
            max_steps=1,
            report_to="none",
            use_cpu=True,
        )
        trainer = GRPOTrainer(
            model=tiny_model_dir,
            args=args,
            reward_funcs=spy_reward,
            train_dataset=add_assistant_prefill(dataset, tokenizer),
            processing_class=tokenizer,
        )
        trainer.train()
        assert all(isinstance(p, str) and p.endswith("<|im_start|>assistant\n<think>") for p in seen["prompts"])
        assert all(isinstance(c, str) for c in seen["completions"])
        assert seen["prefill"] == ["<think>"] * 3


def test_docstring_examples():
    result = doctest.testmod(data, raise_on_error=False)
    assert result.attempted >= 2 and result.failed == 0


# Rows in the format of open-r1/Big-Math-RL-Verified-Processed (its create_dataset.py: SynthLabsAI/Big-Math-RL-Verified
# with `problem` -> `prompt` and `answer` -> `solution`; `source`, `domain` and `llama8b_solve_rate` kept).
BIGMATH_ROWS = [
    {
        "prompt": "Simplify $\\sqrt{12}$.",
        "solution": "2\\sqrt{3}",
        "source": "synthetic_math",
        "domain": ["Mathematics -> Algebra -> Radicals"],
        "llama8b_solve_rate": 0.40625,
    },
    {
        "prompt": "What is 1/2 + 1/4?",
        "solution": " \\frac{3}{4} ",
        "source": "orca_math",
        "domain": ["Mathematics -> Arithmetic"],
        "llama8b_solve_rate": 0.25,
    },
    {"prompt": "x" * 1025, "solution": "1", "source": "s", "domain": [], "llama8b_solve_rate": 0.1},  # too long
    {"prompt": "No answer", "solution": "", "source": "s", "domain": [], "llama8b_solve_rate": 0.1},  # empty gold
]


class TestLoadBigMath:
    def _check(self, dataset):
        assert dataset.column_names == ["prompt", "solution", "question"]
        assert len(dataset) == 2  # the 1025-character problem and the empty answer are dropped
        assert dataset[0]["prompt"] == make_prompt("Simplify $\\sqrt{12}$.")  # QeRL's system prompt + the problem
        assert dataset[0]["solution"] == "2\\sqrt{3}"
        assert dataset[1]["solution"] == "\\frac{3}{4}"  # stripped
        assert dataset[1]["question"] == "What is 1/2 + 1/4?"

    def test_local_jsonl_folder(self, tmp_path):
        write_jsonl(tmp_path / "train.jsonl", BIGMATH_ROWS)
        self._check(load_bigmath("train", dataset_path=str(tmp_path)))

    def test_local_parquet_in_the_hub_layout(self, tmp_path):
        Dataset.from_list(BIGMATH_ROWS).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
        self._check(load_bigmath("train", dataset_path=str(tmp_path)))

    def test_limit_seed_and_no_length_filter(self, tmp_path):
        path = write_jsonl(tmp_path / "rows.jsonl", BIGMATH_ROWS)
        assert len(load_bigmath(dataset_path=path, max_prompt_chars=None)) == 3
        assert len(load_bigmath(dataset_path=path, limit=1, seed=0)) == 1

    def test_missing_column_is_named(self, tmp_path):
        path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "Q", "solution": "1"}])  # the unprocessed name
        with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt'\] \(found: \['problem', 'solution'\]\)"):
            load_bigmath(dataset_path=path)

    def test_missing_split_file(self, tmp_path):
        write_jsonl(tmp_path / "test.jsonl", BIGMATH_ROWS)
        with pytest.raises(FileNotFoundError, match="No train.jsonl / train.parquet / train-\\*.parquet"):
            load_bigmath("train", dataset_path=str(tmp_path))

    def test_no_usable_rows(self, tmp_path):
        path = write_jsonl(tmp_path / "train.jsonl", BIGMATH_ROWS[2:])
        with pytest.raises(ValueError, match="no usable Big-Math rows"):
            load_bigmath(dataset_path=path)

    def test_offline_error_suggests_dataset_path(self):
        assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest.py
        with pytest.raises(ConnectionError, match="Big-Math-RL-Verified-Processed.*--dataset_path"):
            load_bigmath("train")
