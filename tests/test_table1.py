# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""The Table 1 grid (`qerl_repro.table1`): rows and seeds, the statistics between arms, the smoke test of
run -> skip-on-rerun -> report on a tiny organism, and that the committed table regenerates from its JSONs."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from qerl_repro import table1, testbed
from qerl_repro.stats import holm_adjust


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "results", "table1_cpu")


class TestRows:
    def test_plan_runs_bases_once_and_training_rows_per_seed(self):
        assert table1.plan(["nvfp4", "nvfp4_lora", "bf16_aqn"], 2) == [
            ("nvfp4", None),  # an untrained base is evaluated once
            ("nvfp4_lora", 42),  # seed-major: a grid stopped part-way leaves the arms at equal seed counts
            ("bf16_aqn", 42),
            ("nvfp4_lora", 43),
            ("bf16_aqn", 43),
        ]

    def test_unknown_rows_and_bad_seeds_are_refused(self):
        with pytest.raises(SystemExit, match="nvfp4_qlora"):
            table1.plan(["nvfp4_qlora"], 1)
        with pytest.raises(SystemExit, match="--seeds 0"):
            table1.plan(["bf16"], 0)

    def test_the_rows_are_table1_plus_the_bf16_aqn_ablation(self):
        from qerl_repro.report import PAPER_TABLE1

        assert set(table1.ROWS) == set(PAPER_TABLE1["Qwen2.5-3B-Instruct"]) | {"bf16_aqn"}

    @pytest.mark.parametrize(
        "scale,model", [("cpu", "adder3"), ("gpu", "Qwen2.5-3B-Instruct"), ("gpu", "Qwen2.5-7B-Instruct")]
    )
    def test_every_command_points_at_files_that_exist(self, scale, model):
        import yaml

        for row in table1.ROWS:
            command = table1.build_command(scale, model, row, 42, "runs/x")
            for word in command:
                if word.startswith(("recipes/", "accelerate_configs/")):
                    assert os.path.isfile(os.path.join(ROOT, word)), (row, word)
            if table1.ROWS[row].trained:
                with open(os.path.join(ROOT, command[command.index("--config") + 1])) as f:
                    values = yaml.safe_load(f)
                assert values["quant_format"] == table1.ROWS[row].base_format
                assert values["aqn"] == row.endswith("aqn")
            else:
                assert command[command.index("--quant_format") + 1] == table1.ROWS[row].base_format


class TestRINRows:
    """RIN arms (table1.EXTRA_ROWS): CPU testbed only, run only when named, shown in the report only when present."""

    def test_default_grid_does_not_run_them(self, tmp_path):
        results = tmp_path / "results"
        # Every job "finished", the RIN rows' too: the grid lists the rows it would run as skipped and launches nothing
        # (also when this test fails).
        for row in table1.ALL_ROWS:
            path = results / "adder3" / table1.result_name(row, None if not table1.ALL_ROWS[row].trained else 42)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        run = [sys.executable, "-m", "qerl_repro.table1", "run", "--scale", "cpu", "--results_dir", str(results)]
        proc = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        listed = [line.split(": ")[1].split(" seed")[0] for line in proc.stdout.splitlines()]
        assert sorted(listed) == sorted(table1.ROWS)
        assert not set(table1.EXTRA_ROWS) & set(listed)
        assert {"nvfp4_rin_targeted", "nvfp4_rin_variable", "nvfp4_w4a4", "nvfp4_aqn_dapo"} <= set(table1.EXTRA_ROWS)

    @pytest.mark.parametrize("row", ["nvfp4_rin_targeted", "nvfp4_rin_variable"])
    def test_cpu_recipes_exist_and_gpu_scale_is_refused(self, row, tmp_path):
        import yaml

        command = table1.build_command("cpu", "adder3", row, 42, "runs/x")
        with open(os.path.join(ROOT, command[command.index("--config") + 1])) as f:
            values = yaml.safe_load(f)
        assert (values["quant_format"], values["aqn"], values["aqn_rin"]) == ("nvfp4", True, row.split("_")[-1])
        assert os.path.isfile(os.path.join(ROOT, values["aqn_rin_srdd"]))  # the committed testbed SRDD JSON
        with pytest.raises(SystemExit, match="have no recipe at scale gpu"):
            table1.run_grid("gpu", "Qwen2.5-3B-Instruct", [row], 1, results_dir=str(tmp_path), runs_dir=str(tmp_path))

    @pytest.mark.skipif(not os.path.isdir(COMMITTED), reason="no committed grid results")
    def test_report_shows_them_only_when_present(self, tmp_path):
        source = os.path.join(COMMITTED, "adder3", "nvfp4_aqn-seed42.json")
        with open(source) as f:
            result = json.load(f)
        (tmp_path / "adder3").mkdir()
        (tmp_path / "adder3" / "nvfp4_aqn-seed42.json").write_text(json.dumps(result))
        without = table1.render_report(str(tmp_path), "cpu")
        assert "RIN" not in without
        result["row"] = "nvfp4_rin_targeted"  # the same run relabelled: the report's layout is under test
        (tmp_path / "adder3" / "nvfp4_rin_targeted-seed42.json").write_text(json.dumps(result))
        text = table1.render_report(str(tmp_path), "cpu")
        assert "| NVFP4 | LoRA + RIN targeted (seeds' SRDD-guided AQN) | 1 |" in text
        assert "| NVFP4 LoRA + AQN (QeRL) | NVFP4 LoRA + RIN targeted (seeds' SRDD-guided AQN) | +0.0" in text
        # one command for the Table 1 rows and one for the extra rows, each with its own seed count
        assert (
            "make reproduce-table1 SCALE=cpu SEEDS=1 ROWS=nvfp4_aqn\nmake reproduce-table1 SCALE=cpu SEEDS=1 ROWS=nvfp4_rin_targeted\n"
            in text
        )
        assert "RIN variable" not in text


def _run(row, seed, pass1, *, first=None, auc=None):
    """A results JSON as `collect` writes it (only the fields the statistics read)."""
    first = first if first is not None else [int(p >= 0.5) for p in pass1]
    return {
        "row": row,
        "seed": seed,
        "_file": f"{row}-seed{seed}.json",
        "per_question": {"index": list(range(len(pass1))), "pass1_after": pass1, "first_sample_after": first},
        "metrics": {"test_after": {"pass1": sum(pass1) / len(pass1), "ci95": [0.0, 1.0]}, "reward_auc": auc},
    }


class TestComparisons:
    def test_one_seed_each_uses_mcnemar_on_the_first_sample(self):
        a = _run("bf16_lora", 42, [0.0] * 60 + [1.0] * 40, auc=0.5)
        b = _run("nvfp4_lora", 42, [0.0] * 20 + [1.0] * 80, auc=0.9)
        c = table1.compare([a], [b])
        assert "welch" not in c and c["mcnemar"]["b_only"] == 40 and c["mcnemar"]["a_only"] == 0
        assert c["mcnemar"]["p_value"] < 1e-6 and c["bootstrap"]["p_value"] < 0.01
        assert c["bootstrap"]["difference"] == pytest.approx(0.4)
        assert c["auc_difference"] == pytest.approx(0.4) and "auc_welch" not in c

    def test_several_seeds_use_welch_and_the_bootstrap(self):
        a = [_run("bf16_lora", 42 + s, [0.0] * (60 - s) + [1.0] * (40 + s), auc=0.5 + 0.01 * s) for s in range(3)]
        b = [_run("nvfp4_aqn", 42 + s, [0.0] * (59 - s) + [1.0] * (41 + s), auc=0.5 + 0.01 * s) for s in range(3)]
        c = table1.compare(a, b)
        assert "mcnemar" not in c
        assert c["welch"]["difference"] == pytest.approx(0.01) and c["welch"]["p_value"] > 0.05
        assert c["auc_welch"]["difference"] == pytest.approx(0.0)
        words = table1.in_words("A", "B", 100 * c["welch"]["difference"], c["welch"]["p_value"], "points")
        assert words.startswith("not distinguishable at this sample size (+1.00 points")

    def test_same_seeds_are_paired_by_seed(self):
        """Seeds that move both arms together (shared prompt order and init): pairing by seed sees a steady +2 points
        that Welch's t, blind to the pairing, cannot separate from the seed-to-seed spread."""
        seed_level = [30, 45, 60]  # questions right per seed of arm A, out of 100: a large seed effect
        bump = [2, 3, 1]  # B - A within each seed
        a = [_run("bf16_lora", 42 + s, [0.0] * (100 - k) + [1.0] * k, auc=0.5) for s, k in enumerate(seed_level)]
        b = [
            _run("nvfp4_aqn", 42 + s, [0.0] * (100 - k - d) + [1.0] * (k + d), auc=0.6)
            for s, (k, d) in enumerate(zip(seed_level, bump))
        ]
        c = table1.compare(a, b)
        paired, welch = c["paired_seeds"], c["welch"]
        assert paired["n"] == 3 and paired["difference"] == pytest.approx(0.02)
        # t = 2 / (1 / sqrt 3) = 3.46 on 2 df; for 2 df the two-sided p is 1 - t / sqrt(t^2 + 2) = 0.0742
        assert paired["p_value"] == pytest.approx(0.0742, abs=1e-3)
        assert welch["p_value"] > 0.8  # the seed spread (15 points) swamps the 2-point difference
        assert c["auc_paired_seeds"]["difference"] == pytest.approx(0.1)
        # no seed in common: no pairing; one arm missing a seed: paired on the seeds both ran
        shifted = [dict(run, seed=run["seed"] + 10) for run in b]
        assert "paired_seeds" not in table1.compare(a, shifted)
        common = table1.compare(a, b[:2])["paired_seeds"]
        assert common["n"] == 2 and common["difference"] == pytest.approx(0.025)  # bumps 2 and 3 points
        assert "paired_seeds" not in table1.compare(a, b[:1])

    def test_readme_claims_carry_holm_adjusted_p_values(self):
        """Two claims tested across the same 3 seeds: each line shows its raw p and the Holm p over the list (the
        smaller p times 2, the larger carried up), for accuracy and for reward AUC; a claim whose arm has one seed is
        named as not yet tested and takes no part in the adjustment."""
        seed_level = [30, 45, 60]
        base = [_run("nvfp4_lora", 42 + s, [0.0] * (100 - k) + [1.0] * k, auc=0.5) for s, k in enumerate(seed_level)]

        def arm(row, bumps, aucs):
            return [
                _run(row, 42 + s, [0.0] * (100 - k - d) + [1.0] * (k + d), auc=u)
                for s, (k, d, u) in enumerate(zip(seed_level, bumps, aucs))
            ]

        rows = {
            "nvfp4_lora": base,
            "nvfp4_aqn": arm("nvfp4_aqn", [2, 3, 1], [0.6, 0.62, 0.61]),
            "nvfp4_w4a4": arm("nvfp4_w4a4", [-1, 4, 0], [0.5, 0.45, 0.52])[:1],
            "bf16_lora": arm("bf16_lora", [5, -2, 0], [0.52, 0.49, 0.5]),
        }
        claims = [
            ("nvfp4_lora", "nvfp4_aqn", "AQN", "prior A"),
            ("nvfp4_lora", "bf16_lora", "BF16", "prior B"),
            ("nvfp4_lora", "nvfp4_w4a4", "W4A4", "prior C"),
        ]
        lines = table1._readme_claims(rows, claims)
        assert len(lines) == 3 and lines[2].startswith("- W4A4 (prior C): ")
        assert "3 and 1 seeds: not yet a test across seeds" in lines[2]
        p = [table1.compare(base, rows[b])["paired_seeds"]["p_value"] for b in ("nvfp4_aqn", "bf16_lora")]
        auc_p = [table1.compare(base, rows[b])["auc_paired_seeds"]["p_value"] for b in ("nvfp4_aqn", "bf16_lora")]
        for line, raw, adjusted, auc_raw, auc_adjusted in zip(lines, p, holm_adjust(p), auc_p, holm_adjust(auc_p)):
            assert f"p = {raw:.2g} (Holm {adjusted:.2g})" in line
            assert f"p = {auc_raw:.2g} (Holm {auc_adjusted:.2g})" in line
        assert min(holm_adjust(p)) == pytest.approx(min(1.0, 2 * min(p)))  # the smaller p is doubled

    def test_different_questions_are_refused(self):
        a = _run("bf16_lora", 42, [0.0, 1.0])
        b = _run("nvfp4_lora", 42, [0.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="same test questions"):
            table1.compare([a], [b])

    def test_in_words(self):
        assert table1.in_words("A", "B", -3.0, 0.001, "points") == "B is lower than A by 3.00 points (p = 0.001)"
        assert table1.in_words("A", "B", 3.0, 0.2, "points").startswith("not distinguishable")


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("table1") / "organism")
    testbed.build_organism(path, testbed.OrganismConfig(max_steps=3, eval_every=1000, train_size=512, batch_size=16))
    return path


def test_smoke_run_skip_on_rerun_and_report(tiny_organism, tmp_dir):
    """`python -m qerl_repro.table1 run` on 2 rows x 2 steps of a tiny organism (real recipe subprocesses, HF
    generate), rerun (every row skipped, JSONs untouched), then `report` (table, comparison, figure)."""
    results, runs = os.path.join(tmp_dir, "results", "table1_cpu"), os.path.join(tmp_dir, "runs")
    # fmt: off
    run = [
        sys.executable, "-m", "qerl_repro.table1", "run", "--scale", "cpu",
        "--rows", "bf16_lora,nvfp4_aqn",
        "--seeds", "1",
        "--results_dir", results,
        "--runs_dir", runs,
        "--model_dir", tiny_organism,
        "--max_steps", "2",
        "--eval_limit", "6",
        "--extra", "--use_vllm false --per_device_train_batch_size 8 --gradient_accumulation_steps 1 "
                   "--train_limit 64 --eval_num_samples 2 --plots false --report_to none",
    ]
    # fmt: on
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    first = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.splitlines() == [
        f"ran: bf16_lora seed 42 -> {results}/adder3/bf16_lora-seed42.json",
        f"ran: nvfp4_aqn seed 42 -> {results}/adder3/nvfp4_aqn-seed42.json",
    ]
    paths = [os.path.join(results, "adder3", f"{row}-seed42.json") for row in ("bf16_lora", "nvfp4_aqn")]
    contents = []
    for path in paths:
        with open(path) as f:
            contents.append(f.read())
        result = json.loads(contents[-1])
        assert result["schema"] == table1.SCHEMA and result["seed"] == 42
        assert "--seed 42" in result["command"] and "--max_steps 2" in result["command"]
        assert result["git"]["git_commit"] and result["versions"]["trl"] and result["machine"]["cpu_count"]
        assert result["config"]["values"]["quant_format"] == ("none" if "bf16" in path else "nvfp4")
        m = result["metrics"]
        assert m["steps"] == 2 and m["reward"]["steps"] == [1, 2] and len(m["entropy"]["values"]) == 2
        assert m["reward_auc"] == pytest.approx(sum(m["reward"]["values"]) / 2)
        assert m["test_after"]["n"] == 6 and m["test_after"]["k"] == 2 and len(m["test_after"]["ci95"]) == 2
        assert m["test_after"]["first_sample"]["ci_method"] == "wilson"
        assert result["per_question"]["index"] == list(range(6)) and len(result["per_question"]["pass1_before"]) == 6
        assert '"completions":' not in contents[-1]  # compact: per-question pass@1 only
        assert result["config"]["overrides"][:2] == [
            "--output_dir",
            os.path.join(runs, "adder3", "bf16_lora-seed42" if "bf16" in path else "nvfp4_aqn-seed42"),
        ]

    started = time.perf_counter()
    again = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line.split(":")[0] for line in again.stdout.splitlines()] == ["skipped", "skipped"]
    assert time.perf_counter() - started < 60  # no recipe was launched
    for path, content in zip(paths, contents):
        with open(path) as f:
            assert f.read() == content

    output = os.path.join(tmp_dir, "results", "table1_cpu.md")
    report = [sys.executable, "-m", "qerl_repro.table1", "report", "--scale", "cpu", "--results_dir", results]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme_before = f.read()
    proc = subprocess.run([*report, "--output", output], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(ROOT, "README.md")) as f:  # the README block is the committed grid's, not a smoke run's
        assert f.read() == readme_before
    with open(output) as f:
        text = f.read()
    assert "make reproduce-table1 SCALE=cpu SEEDS=1 ROWS=bf16_lora,nvfp4_aqn" in text
    assert "| BF16 | LoRA | 1 |" in text and "| NVFP4 | LoRA + AQN (QeRL) | 1 |" in text
    assert "| NVFP4 | LoRA | 0 | not run | – | – | – | 83.3 (+22.2) | 88.5 (+12.2) | – |" in text  # paper, as printed
    assert "| BF16 LoRA | NVFP4 LoRA + AQN (QeRL) |" in text and "McNemar (first sample" in text
    assert "![reward and entropy per step](table1_cpu.png)" in text
    with open(os.path.join(tmp_dir, "results", "table1_cpu.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not os.path.isdir(COMMITTED), reason="no committed grid results")
def test_committed_table_is_regenerated_from_the_committed_jsons():
    with open(os.path.join(ROOT, "results", "table1_cpu.md")) as f:
        committed = f.read()
    assert committed == table1.render_report(COMMITTED, "cpu", figure="table1_cpu.png")
    assert os.path.isfile(os.path.join(ROOT, "results", "table1_cpu.png"))
    for runs in table1.load_results(COMMITTED)["adder3"].values():
        for run in runs:  # every committed run is on the testbed's full fixed test set
            assert run["metrics"]["test_after"]["n"] == testbed.TEST_SIZE
            gold = testbed.load_split("test")["index"]
            assert run["per_question"]["index"] == gold


def test_readme_results_block_is_regenerated_from_the_committed_jsons():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = table1.readme_section(COMMITTED, "cpu")
    assert section.rstrip("\n") in readme
    # every row of the block names the committed JSON(s) it comes from
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| row"):
            source = line.rsplit("`", 2)[1]
            assert glob.glob(os.path.join(ROOT, source)), line


def test_update_readme_rewrites_only_its_own_block(tmp_path):
    readme = tmp_path / "README.md"
    begin, end = table1.README_BEGIN.format(scale="cpu"), table1.README_END.format(scale="cpu")
    readme.write_text(f"intro\n{begin}\nold numbers\n{end}\noutro\n")
    assert table1.update_readme(str(readme), f"{begin}\nnew numbers\n{end}\n", "cpu")
    assert readme.read_text() == f"intro\n{begin}\nnew numbers\n{end}\noutro\n"
    assert not table1.update_readme(str(readme), "anything", "gpu")  # no gpu block: nothing written
    assert not table1.update_readme(str(tmp_path / "missing.md"), "anything", "cpu")  # run from another folder
    assert readme.read_text() == f"intro\n{begin}\nnew numbers\n{end}\noutro\n"


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(ROOT, "results", "testbed", "base_nvfp4.json")), reason="no committed base eval"
)
def test_base_rows_read_the_testbed_evaluation_output():
    """An untrained-base row is read from `python -m qerl_repro.testbed evaluate`'s JSON (the committed one here)."""
    with open(os.path.join(ROOT, "results", "testbed", "base_nvfp4.json")) as f:
        evaluation = json.load(f)
    summary, per_question = table1.test_metrics(evaluation)
    assert summary["pass1"] == evaluation["sampled"]["pass1"] and summary["ci95"] == evaluation["sampled"]["ci95"]
    assert summary["n"] == testbed.TEST_SIZE and summary["k"] == testbed.GROUP_SIZE
    assert sum(per_question["pass1"]) / summary["n"] == pytest.approx(summary["pass1"])
    assert summary["first_sample"]["rate"] == evaluation["sampled"]["first_sample"]["rate"]


@pytest.mark.parametrize(
    "scale, model, row, config",
    [
        ("cpu", "adder3", "bf16_full", "accelerate_configs/cpu.yaml"),
        ("gpu", "Qwen2.5-3B-Instruct", "bf16_full", "accelerate_configs/single_gpu.yaml"),
        ("gpu", "Qwen2.5-7B-Instruct", "bf16_full", "accelerate_configs/deepspeed_zero3.yaml"),  # 122 GB of state
        ("gpu", "Qwen2.5-7B-Instruct", "nvfp4_aqn", "accelerate_configs/single_gpu.yaml"),
    ],
)
def test_each_training_row_gets_a_launcher_that_can_hold_it(scale, model, row, config):
    assert table1.accelerate_config(scale, model, row) == config
    assert os.path.isfile(os.path.join(ROOT, config))


def test_results_json_keeps_numeric_lists_on_one_line_and_round_trips(tmp_path):
    data = {"curve": [0.5, -1.0, 1e-05, 3] + [0.125] * 40 + [None], "pass1": [1.0, 0.0, 0.5], "nested": {"x": [-0.25]}}
    path = str(tmp_path / "row.json")
    table1._write_json(data, path)  # a list of numbers ending in null once made the regex backtrack exponentially
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == data
    assert '"pass1": [1.0, 0.0, 0.5]' in text
