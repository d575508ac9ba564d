# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The CPU testbed's organism (`qerl_repro.testbed`): task data, tokenizer, exact-reply reward, a tiny real build
(TRL SFTTrainer), the recipe YAMLs, and that the committed results describe the test set they claim."""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qerl_repro import testbed
from qerl_repro.grpo import make_parser
from qerl_repro.rewards import answer_reward, exact_reply_reward, get_reward_funcs


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results", "testbed")


class TestTask:
    def test_question_format(self):
        assert testbed.make_question(1234, 5678) == ("1234+5678=", "6912")
        assert testbed.make_question(0, 7) == ("0+7=", "7")
        assert testbed.make_question(9999, 9999) == ("9999+9999=", "19998")

    def test_splits_are_deterministic(self):
        assert testbed.make_splits(train_size=2000) == testbed.make_splits(train_size=2000)

    def test_test_set_does_not_depend_on_the_other_sizes(self):
        small = testbed.make_splits(validation_size=10, train_size=10)
        assert small["test"] == testbed.make_splits(train_size=2000)["test"]

    def test_splits_are_disjoint_as_unordered_pairs(self):
        splits = testbed.make_splits()
        keys = {name: {(min(a, b), max(a, b)) for a, b in pairs} for name, pairs in splits.items()}
        assert len(keys["test"]) == testbed.TEST_SIZE == len(splits["test"])  # no duplicate inside the test set
        assert len(keys["validation"]) == testbed.VALIDATION_SIZE
        assert len(keys["train"]) == testbed.TRAIN_SIZE
        assert not keys["test"] & keys["train"]
        assert not keys["test"] & keys["validation"]
        assert not keys["validation"] & keys["train"]

    def test_operands_cover_the_range(self):
        test = testbed.make_splits(train_size=10)["test"]
        assert all(0 <= a < 10**testbed.DIGITS and 0 <= b < 10**testbed.DIGITS for a, b in test)
        assert max(max(a, b) for a, b in test) > 0.9 * 10**testbed.DIGITS and min(min(a, b) for a, b in test) < 100

    def test_grpo_rows(self):
        rows = testbed.load_split("test", limit=3)
        assert rows.column_names == ["prompt", "solution", "question", "index"]
        a, b = testbed.make_splits(train_size=10)["test"][0]
        assert rows[0] == {"prompt": f"{a}+{b}=", "solution": str(a + b), "question": f"{a}+{b}=", "index": 0}


class TestTokenizer:
    def test_round_trip_after_save_and_load(self, tmp_dir):
        testbed.build_tokenizer().save_pretrained(tmp_dir)
        tokenizer = AutoTokenizer.from_pretrained(tmp_dir)
        for text in ["1234+5678=", "0+0=", "9999+9999=19998", "12-3=9"]:
            ids = tokenizer(text)["input_ids"]
            assert len(ids) == len(text)  # one token per character, no BOS/EOS added
            assert tokenizer.decode(ids) == text
        assert len(tokenizer) == 16
        assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>" and tokenizer.bos_token is None
        assert tokenizer.padding_side == "left"

    def test_special_tokens(self):
        tokenizer = testbed.build_tokenizer()
        ids = tokenizer("6912<eos>")["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id and len(ids) == 5
        assert tokenizer.decode(ids, skip_special_tokens=True) == "6912"
        assert tokenizer("a")["input_ids"] == [tokenizer.unk_token_id]  # outside the task's alphabet

    def test_sft_rows_train_on_the_answer_only(self):
        tokenizer = testbed.build_tokenizer()
        row = testbed.sft_dataset(tokenizer, [(12, 34)])[0]
        assert tokenizer.decode(row["input_ids"]) == "12+34=46<eos>"
        assert row["labels"] == [-100] * len("12+34=") + tokenizer("46<eos>")["input_ids"]


class TestExactReplyReward:
    def test_pays_right_answers(self):
        completions = [
            "6912",  # the sum
            " 6912 ",  # surrounding whitespace is stripped
            "6912\n",  # newline
        ]
        assert exact_reply_reward(completions, solution=["6912"] * 3) == [2.0, 2.0, 2.0]

    def test_pays_nothing_else(self):
        completions = [
            "6911",  # off by one
            "06912",  # leading zero
            "6912 6912",  # repeated
            "69120",  # extra digit
            "",  # empty reply
            "6912=",  # trailing symbol
            "5678+1234",  # restates the question
        ]
        assert exact_reply_reward(completions, solution=["6912"] * len(completions)) == [0.0] * len(completions)

    def test_conversational_and_registry(self):
        assert exact_reply_reward([[{"role": "assistant", "content": "7"}]], solution=["7"]) == [2.0]
        assert [f.__name__ for f in get_reward_funcs(["exact_reply"])] == ["exact_reply_reward"]

    def test_agrees_with_the_evaluation_criterion_on_tag_free_replies(self):
        completions = ["6912", "6911", " 6912", "", "06912", "19998"]
        solution = ["6912"] * len(completions)
        assert exact_reply_reward(completions, solution) == answer_reward(completions, solution)


class TestRecipes:
    ARMS = {
        "testbed_bf16_full": ("none", False, False),
        "testbed_bf16_lora": ("none", False, True),
        "testbed_nf4_qlora": ("nf4", False, True),
        "testbed_mxfp4_lora": ("mxfp4", False, True),
        "testbed_nvfp4_lora": ("nvfp4", False, True),
        "testbed_nvfp4_aqn": ("nvfp4", True, True),
        "testbed_bf16_aqn": ("none", True, True),  # not a paper row: QeRL issue #11's ablation
        "testbed_nvfp4_rin_targeted": ("nvfp4", True, True),  # not paper rows: the seeds' RIN (table1.EXTRA_ROWS)
        "testbed_nvfp4_rin_variable": ("nvfp4", True, True),
        "testbed_nvfp4_w4a4": ("nvfp4", False, True),  # not a paper row: W4A4 (quant_activations)
        "testbed_nvfp4_aqn_dapo": ("nvfp4", True, True),  # QeRL with TRL's dapo loss
        # issue 11's extra rows (qerl_repro.table1.EXTRA_ROWS): AQN variants and the hardware-error simulation
        "testbed_nvfp4_aqn_act": ("nvfp4", True, True),
        "testbed_nvfp4_aqn_linear": ("nvfp4", True, True),
        "testbed_nvfp4_aqn_cosine": ("nvfp4", True, True),
        "testbed_bf16_hw_error": ("none", False, True),
        "testbed_bf16_hw_error_aqn": ("none", True, True),
    }

    def test_one_yaml_per_table1_row(self):
        found = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "recipes", "testbed", "*.yaml")))
        assert found == sorted(self.ARMS)

    @pytest.mark.parametrize("arm", sorted(ARMS))
    def test_yaml_parses_and_matches_its_row(self, arm, monkeypatch):
        monkeypatch.chdir(ROOT)  # the RIN arms name their SRDD JSON relative to the repository, as the grid runs them
        path = os.path.join(ROOT, "recipes", "testbed", f"{arm}.yaml")
        with open(path) as f:
            values = yaml.safe_load(f)
        assert (values["quant_format"], values["aqn"], values["use_peft"]) == self.ARMS[arm]
        script_args, training_args, model_args = make_parser().parse_args_and_config(
            args=["--config", path, "--output_dir", "/tmp/unused"]
        )
        assert script_args.reward_funcs == ["exact_reply"] and script_args.dataset_name is None
        assert training_args.temperature == script_args.eval_temperature == testbed.GRPO_TEMPERATURE
        assert training_args.num_generations == testbed.GROUP_SIZE
        assert training_args.max_completion_length >= len(str(2 * (10**testbed.DIGITS - 1))) + 1  # answer + EOS
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 128
        assert model_args.model_name_or_path == "data/testbed/adder3"
        assert training_args.quant_activations == (arm == "testbed_nvfp4_w4a4")
        assert training_args.loss_type == ("dapo" if arm == "testbed_nvfp4_aqn_dapo" else "bnpo")


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory):
    """A real SFTTrainer build, 3 steps on 512 rows (far from any skill): `(path, info)`."""
    path = str(tmp_path_factory.mktemp("testbed") / "organism")
    config = testbed.OrganismConfig(max_steps=3, eval_every=1000, train_size=512, batch_size=16)
    return path, testbed.build_organism(path, config)


def test_tiny_build_gives_a_loadable_hf_folder(tiny_organism):
    """The build's folder loads with AutoModel/AutoTokenizer and generates."""
    path, info = tiny_organism
    assert testbed.is_built(path) and info["stopped_at_step"] == 3 and not info["reached_target"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.dtype.is_floating_point
    assert model.config.head_dim >= 32 and model.config.vocab_size == len(tokenizer) == 16
    assert str(model.dtype) == "torch.bfloat16"
    assert model.num_parameters() == info["num_parameters"]
    batch = tokenizer(["12+34="], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3
    with open(os.path.join(path, testbed.MARKER)) as f:
        assert json.load(f)["config"]["train_size"] == 512


def test_build_is_deterministic_given_the_seed(tiny_organism, tmp_dir):
    """The same config builds bit-identical weights (one thread; the data and the trainer are seeded)."""
    from safetensors.torch import load_file

    path, _ = tiny_organism
    again = os.path.join(tmp_dir, "again")
    testbed.build_organism(again, testbed.OrganismConfig(max_steps=3, eval_every=1000, train_size=512, batch_size=16))
    first, second = (
        load_file(os.path.join(path, "model.safetensors")),
        load_file(os.path.join(again, "model.safetensors")),
    )
    assert first.keys() == second.keys()
    assert all(first[name].equal(second[name]) for name in first)


def test_grpo_recipe_runs_one_step_from_the_organism(tiny_organism, tmp_dir):
    """recipes/testbed_grpo.py end to end (subprocess, 1 step, HF generate): trains, evaluates on the test split."""
    path, _ = tiny_organism
    output_dir = os.path.join(tmp_dir, "run")
    # fmt: off
    args = [
        "--config", os.path.join(ROOT, "recipes", "testbed", "testbed_nvfp4_aqn.yaml"),
        "--model_name_or_path", path,
        "--output_dir", output_dir,
        "--max_steps", "1",
        "--use_vllm", "false",  # the vLLM path is what the pilot ran; here the recipe wiring is under test
        "--per_device_train_batch_size", "8",  # one group of 8
        "--gradient_accumulation_steps", "1",
        "--train_limit", "64",
        "--eval_limit", "4",
        "--eval_num_samples", "2",
        "--plots", "false",
        "--report_to", "none",
    ]
    # fmt: on
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "testbed_grpo.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(output_dir, "eval_after.json")) as f:
        after = json.load(f)
    assert after["n"] == 4 and after["k"] == 2 and after["config"]["quant_format"] == "nvfp4"
    assert [r["gold"] for r in after["records"]] == testbed.load_split("test", limit=4)["solution"]
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        log = json.load(f)["log_history"]
    assert "rewards/exact_reply_reward/mean" in log[0] and "aqn/sigma" in log[0]


@pytest.mark.skipif(not os.path.isfile(os.path.join(RESULTS, "base_none.json")), reason="no committed results")
def test_committed_results_are_on_the_fixed_test_set():
    gold = {i: str(a + b) for i, (a, b) in enumerate(testbed.make_splits(train_size=10)["test"])}
    for path in sorted(glob.glob(os.path.join(RESULTS, "base_*.json"))):
        with open(path) as f:
            result = json.load(f)
        assert result["n"] == testbed.TEST_SIZE == len(result["records"]), path
        assert {r["index"]: r["gold"] for r in result["records"]} == gold, path
        assert all(len(r["samples"]) == result["sampled"]["k"] == testbed.GROUP_SIZE for r in result["records"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(RESULTS, "README.md")), reason="no committed summary")
def test_committed_summary_is_regenerated_from_the_jsons():
    with open(os.path.join(RESULTS, "README.md")) as f:
        assert f.read() == testbed.summarize_results(RESULTS)


@pytest.mark.parametrize("quant_format", ["nf4", "nvfp4"])
def test_served_4bit_base_holds_the_dequantized_weights_training_uses(tiny_organism, quant_format, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qerl_repro.loading import load_dequantized_base

    path, _ = tiny_organism
    served = testbed.save_dequantized_base(path, quant_format, str(tmp_path / quant_format))
    model = AutoModelForCausalLM.from_pretrained(served, dtype=torch.bfloat16)
    assert getattr(model.config, "quantization_config", None) is None  # a plain checkpoint vLLM can load
    expected = load_dequantized_base(path, quant_format, dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).state_dict()
    changed = 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
        changed += not torch.equal(tensor, original[name])
    assert changed > 0  # the 4-bit rounding is there
    assert AutoTokenizer.from_pretrained(served)("12+34=")["input_ids"]
