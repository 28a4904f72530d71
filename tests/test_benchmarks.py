"""Smoke runs of the benchmark scripts (the measurements themselves are not in CI, only their plumbing)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_convergence_smoke_runs_every_path(tmp_path):
    """--smoke: the study (mae, mae_mto_dot, conmim_mto and the random-init floor, fine-tuned at 2 checkpoints each;
    ConMIM through its BEiT classifier, --global_pool false) and an LR
    sweep of mae at 2 learning rates reusing the study's runs, each run a few steps through the real recipes."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--smoke", "--seeds", "0"]
    cmd += ["--output_dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    runs = {run["arm"]: run for run in json.loads((tmp_path / "convergence.json").read_text())["runs"]}
    assert list(runs) == ["mae", "mae_mto_dot", "conmim_mto", "random_init"]
    conmim = runs["conmim_mto"]
    assert conmim["finetune"]["epochs"] == [1.0, 2.0] and len(conmim["eval_knn_accuracy"]) == 2
    ft_flags = json.loads(
        (tmp_path / "conmim_mto-w0.003-lr0.0015-e2-seed0" / "finetune-e1-2x64" / "flags.json").read_text()
    )
    assert ft_flags[ft_flags.index("--global_pool") + 1] == "false"
    for arm in ("mae", "mae_mto_dot"):
        run = runs[arm]
        assert run["lr"] == pytest.approx(1.5e-3)  # the MAE preset's base LR, in the run's folder name too
        assert (tmp_path / f"{arm}-w{run['weight']:g}-lr0.0015-e2-seed0" / "flags.json").is_file()
        assert len(run["eval_knn_accuracy"]) == len(run["epochs"]) == 2  # evaluated after both smoke epochs
        assert all(0 <= value <= 1 for value in run["eval_knn_accuracy"] + run["eval_linear_probe_accuracy"])
        assert run["epoch_seconds"] and all(t > 0 for t in run["epoch_seconds"])
        assert run["finetune"]["epochs"] == [1.0, 2.0]  # one fine-tuning per checkpoint point
        assert all(0 <= value <= 1 for value in run["finetune"]["finetune_accuracy"])
        assert run["wall_seconds"] > 0 and all(t > 0 for t in run["finetune"]["wall_seconds"])
    flags = json.loads((tmp_path / "mae_mto_dot-w0.003-lr0.0015-e2-seed0" / "flags.json").read_text())
    assert flags[flags.index("--mto_affinity") + 1] == "dot"
    floor = runs["random_init"]
    assert floor["epochs"] == [0.0] and floor["epoch_seconds"] == []  # evaluated once, untrained
    assert 0 <= floor["eval_knn_accuracy"][0] <= 1 and 0 <= floor["eval_linear_probe_accuracy"][0] <= 1
    assert floor["finetune"]["epochs"] == [0.0] and 0 <= floor["finetune"]["finetune_accuracy"][0] <= 1
    assert (tmp_path / "convergence.png").stat().st_size > 0
    assert "| mae | 0 | 0.0015 | 1 |" in result.stdout and "| mae_mto_dot | 0.003 | 0.0015 | 1 |" in result.stdout
    assert "| random_init | 0 | - | 1 |" in result.stdout  # the floor row

    sweep = json.loads((tmp_path / "lr_sweep.json").read_text())
    rows = {(row["method"], row["lr"]): row for row in sweep["table"]}
    assert set(rows) == {("mae", 1.5e-3), ("mae", 1.5e-2), ("random_init", None)}
    for row in rows.values():
        assert all(0 <= value <= 1 for value in row["knn"] + row["probe"])
    assert rows[("mae", 1.5e-2)]["knn_last_epoch_improved"] in (0.0, 1.0)
    assert rows[("random_init", None)]["knn_gain_over_floor"] == 0.0
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0
    assert rows[("mae", 1.5e-2)]["epochs"] == 2
    assert "| mae | 0.015 | 2 | 1 |" in result.stdout and "| random_init | - | 0 | 1 |" in result.stdout


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_section(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--output_dir", str(tmp_path)]
    # A budget no part reaches on a busy CPU (the parts end when done): this checks the plumbing, not the budget.
    cmd += ["--time_budget_s", "3600"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}
    assert set(report["step_time"]) == {"compile_off", "compile_on"}
    for by_model in report["step_time"].values():
        assert set(by_model) == {"mae", "simmim"}
        for results in by_model.values():
            assert set(results) == {"upstream", "mto_off", "mto_on"}
            assert results["upstream"]["ratio"] == 1.0
            assert all(r["step_s"] > 0 and r["ratio"] > 0 and r["peak_bytes"] > 0 for r in results.values())
    for method in ("bootmae", "conmim"):  # the methods with a momentum encoder and no upstream
        momentum = report[method]
        assert momentum["batch_size"] == 4 and momentum["precision"] == "fp32"
        assert set(momentum["variants"]) == {"mto_off", "mto_on"} and momentum["variants"]["mto_off"]["ratio"] == 1.0
        assert all(0 < v["teacher_share"] and v["peak_bytes"] > 0 for v in momentum["variants"].values())
    for evolved in (report["evolved"][model] for model in ("mae", "simmim")):
        assert set(evolved["shares"]) == {"attention pass", "tree + mask", "training step"}
        assert sum(evolved["shares"].values()) == pytest.approx(1.0)
        # A no-grad pass through some of the encoder's blocks does less than a training step's forward and backward.
        assert 0 < evolved["attention_flop_share"] < 0.5
    convergence = report["convergence"]
    assert convergence["pretrain_steps"] >= 1 and convergence["finetune_steps"] >= 1
    assert set(convergence["arms"]) == {"mae", "mae_mto"}
    assert convergence["hyper_parameters"]["mto_affinity"] == "cosine"  # the tiny MAE preset's: the default
    for arm in convergence["arms"].values():
        assert 0 <= arm["knn_accuracy"] <= 1 and 0 <= arm["finetune_accuracy"] <= 1
    text = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Step time", "## BootMAE", "## ConMIM", "## Evolved masking", "## Convergence"):
        assert heading in text
    assert "| mae | compile_on | mto_on |" in text and "| simmim | compile_off | mto_off |" in text
    assert "| mae_mto |" in text and "| mto_on |" in text
    assert all(part["status"] == "done" for part in report["parts"].values()) and list(report["parts"]) == [
        "step_time_eager",
        "bootmae",
        "conmim",
        "evolved",
        "convergence",
        "step_time_compiled_mae",
        "step_time_compiled_simmim",
    ]


def test_gpu_check_records_a_failed_part_and_runs_the_rest(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    def fail(*args):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(gpu_check, "step_times", lambda *args: {})
    for name in ("momentum_times", "evolved_shares", "convergence"):
        monkeypatch.setattr(gpu_check, name, fail)
    report = gpu_check.main(["--smoke", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["errors"]) == {"bootmae", "conmim", "evolved", "convergence"}  # each failed part, only those
    assert "out of memory" in report["errors"]["evolved"]
    assert report["step_time"] == {"compile_off": {}, "compile_on": {}}  # compile_on ran after two failed parts
    text = (tmp_path / "gpu_check.md").read_text()
    assert "- convergence: RuntimeError: CUDA error: out of memory" in text
    assert {name: part["status"] for name, part in report["parts"].items()} == {
        "step_time_eager": "done",
        "bootmae": "failed",
        "conmim": "failed",
        "evolved": "failed",
        "step_time_compiled_mae": "done",
        "step_time_compiled_simmim": "done",
        "convergence": "failed",
    }


def test_gpu_check_allots_each_part_its_share_of_the_time_left(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    parts = list(gpu_check.PARTS)
    assert list(gpu_check.PART_SHARES) == parts and sum(gpu_check.PART_SHARES.values()) == pytest.approx(1.0)
    assert gpu_check.allotted_seconds(parts[0], parts, 420.0) == pytest.approx(420.0 * gpu_check.PART_SHARES[parts[0]])
    assert (
        gpu_check.allotted_seconds("convergence", ["convergence"], 100.0) == 100.0
    )  # the last part: all that is left
    assert gpu_check.allotted_seconds("convergence", ["convergence"], -3.0) == 0.0
    # Every part using all it is allotted ends the run exactly at the end of the budget, never after it.
    left = 420.0
    for index, name in enumerate(parts):
        left -= gpu_check.allotted_seconds(name, parts[index:], left)
    assert left == pytest.approx(0.0, abs=1e-9)
    # Time the first parts leave unused goes to the later ones pro rata: convergence keeps its share of the rest.
    rest = parts[parts.index("convergence") :]
    assert (
        gpu_check.allotted_seconds("convergence", ["convergence"], 300.0)
        > gpu_check.allotted_seconds("convergence", rest, 300.0)
        == pytest.approx(300.0 * gpu_check.PART_SHARES["convergence"] / sum(gpu_check.PART_SHARES[p] for p in rest))
    )


def test_gpu_check_cuts_a_part_at_its_deadline_and_still_writes_the_report(tmp_path, monkeypatch):
    """A small budget: the parts that overrun their shares are cut (their processes killed) and recorded, the parts
    after them run, and a cut part keeps what it reported before. (The budget leaves the parts that return at once far
    from their deadlines, so a busy machine does not cut them.)"""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    def overrun(*args):
        time.sleep(600)

    def convergence(sizes, smoke, seconds_left, seed, device, autocast_dtype, progress):
        plan = dict(dataset="fake", num_train=8, num_test=4, knn_bank=8, batch_size=4, seed=seed)
        plan.update(pretrain_steps=2, finetune_steps=1, pretrain_epochs=1.0, finetune_epochs=0.5)
        arm = dict(knn_accuracy=0.5, finetune_accuracy=0.25, final_pretrain_loss=1.0, pretrain_s=1.0, finetune_s=1.0)
        progress({**plan, "seconds_left_at_start": seconds_left, "arms": {"mae": arm}})  # the first arm's results
        time.sleep(600)

    monkeypatch.setattr(gpu_check, "step_times", lambda *args: {})
    monkeypatch.setattr(gpu_check, "momentum_times", lambda *args: {})
    monkeypatch.setattr(gpu_check, "evolved_shares", overrun)
    monkeypatch.setattr(gpu_check, "convergence", convergence)
    budget = 20.0
    report = gpu_check.main(["--smoke", "--time_budget_s", str(budget), "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(report))
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert {name: part["status"] for name, part in parts.items()} == {
        "step_time_eager": "done",
        "bootmae": "done",
        "conmim": "done",
        "evolved": "cut",
        "convergence": "cut",
        "step_time_compiled_mae": "done",
        "step_time_compiled_simmim": "done",
    }
    assert report["errors"] == {}  # a cut is not a failure
    assert "evolved" not in report  # cut before it reported anything
    assert report["step_time"] == {"compile_off": {}, "compile_on": {}} and report["bootmae"] == report["conmim"] == {}
    assert list(report["convergence"]["arms"]) == ["mae"]  # what it reported before its cut
    # It was told to plan for what it was allotted; no part's deadline reaches into the reserve for the report.
    assert report["convergence"]["seconds_left_at_start"] == pytest.approx(parts["convergence"]["allotted_s"], abs=0.5)
    assert all(part["deadline_s"] <= budget - gpu_check.REPORT_RESERVE_S for part in parts.values())
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| evolved | 0.025 |" in text and "Cut at their deadline" in text and "evolved, convergence" in text
    assert "| mae | 0.5000 | 0.2500 |" in text  # the convergence arm it finished


def test_bootmae_step_time_reports_both_variants_and_the_teachers_share(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bootmae_step_time

    flags = [
        "--device",
        "cpu",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--batch_size",
        "4",
        "--bf16",
    ]  # default: tiny preset
    report = bootmae_step_time.main([*flags, "--steps_per_round", "1", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(report))
    assert report["batch_size"] == 4 and report["precision"] == "bfloat16"  # from the flags
    assert report["masking"] == "bootmae_block"  # the preset's
    variants = report["variants"]
    assert set(variants) == {"mto_off", "mto_on"} and variants["mto_off"]["ratio"] == 1.0
    for result in variants.values():
        assert result["step_s"] > 0 and result["peak_bytes"] > 0 and 0 < result["teacher_share"]
    assert report["teacher_s"] > 0 and report["teacher_param_bytes"] > 0
    assert report["teacher_saved_bytes"] == 0  # no gradient through the momentum encoder
    assert "teacher share" in capsys.readouterr().out


def test_mto_cost_counts_operators_without_host_reads_and_times_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import mto_cost

    from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining

    counts = mto_cost._launch_counts(num_states=3, num_patches=16, width=8, num_masked=12)
    for path in ("visible_first", "mask_based"):
        assert counts[path]["operators"] > 0
        assert counts[path]["host_reads"] == 0  # the MTO terms never wait for the device
    # the visible-first path exists to do less: fewer operators than the mask-based one
    assert counts["visible_first"]["operators"] < counts["mask_based"]["operators"]

    config = ViTMAEMTOConfig(
        image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        decoder_hidden_size=8, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=16, mto_affinity="dot",
    )  # fmt: skip
    ViTMAEMTOForPreTraining(config).save_pretrained(tmp_path / "checkpoint-1")
    report = mto_cost.main(["trained", str(tmp_path / "checkpoint-1"), "--repeats", "2"])
    assert list(report) == ["fresh", str(tmp_path / "checkpoint-1")]
    for row in report.values():
        assert row["mto_ms"] > 0 and row["logit_span"] >= 0 and 0 <= row["below_normal"] <= 1
    assert "p < normal" in capsys.readouterr().out


def test_merge_tree_counts_the_trees_operators_and_heights(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import merge_tree

    result = merge_tree.main(
        ["--batch_size", "2", "--num_patches", "8", "--repeats", "1", "--json", str(tmp_path / "r")]
    )
    assert result == json.loads((tmp_path / "r").read_text())
    assert result["patches"] == 8 and result["seconds"] > 0
    # The sequential loop: N - 1 = 7 merges of several operators each, and the input check's one host read.
    assert result["operators"] > 7 and result["syncs"] == 1
    assert 3 <= result["tree_height"]["max"] <= 7  # a binary tree over 8 leaves is 3 to 7 levels high
    assert "a parallel route needs >=" in capsys.readouterr().out


def test_data_throughput_times_both_pipelines_and_the_loader(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import data_throughput

    args = ["--num_images", "6", "--batch_size", "4", "--batches", "1", "--rounds", "2", "--workers", "1"]
    result = data_throughput.main([*args, "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    assert set(result["pipelines"]) == {"uint8", "pil"} and result["default_pipeline"] == "uint8"
    for figures in result["pipelines"].values():
        assert {"read", "decode", "augment"} <= set(figures["stage_ms"]) and all(
            v > 0 for v in figures["stage_ms"].values()
        )
        assert set(figures["images_per_second"]) == {"0", "1"} and all(
            v > 0 for v in figures["images_per_second"].values()
        )
    assert result["images_per_second_per_core"] == result["pipelines"]["uint8"]["images_per_second"]["0"]
    assert result["per_core_ratio"] > 0
    assert result["file_kb"] > 10  # a 500 x 375 JPEG of smooth content, not a flat one of a few kB
    # the rates the GPU steps recorded in docs/ consume, which the loader is compared against
    assert all(rate > 0 for rate in result["gpu_images_per_second"].values())
    out = capsys.readouterr().out
    assert "loader cores" in out and "uint8 / pil" in out
    with pytest.raises(SystemExit):
        data_throughput.main(["--batches", "0"])


def test_data_throughput_device_mode_compares_the_loader_with_the_step(tmp_path, monkeypatch, capsys):
    """The CPU smoke of `--device cuda`: the tiny MAE preset at batch 4, on the CPU."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import data_throughput

    args = ["--device", "cpu", "--preset", "tiny", "--batch_size", "4", "--num_images", "6", "--workers", "1"]
    result = data_throughput.main([*args, "--batches", "2", "--rounds", "1", "--warmup", "1"])
    rates = ("loader_images_per_second", "step_images_per_second", "fed_step_images_per_second")
    assert all(result[name] > 0 for name in rates)
    assert result["loader_over_step"] == pytest.approx(result[rates[0]] / result[rates[1]])
    assert result["bound"] == ("data" if result["loader_over_step"] < 1 else "compute")
    assert f"-> {result['bound']}-bound" in capsys.readouterr().out


def test_mto_collapse_measures_features_and_each_terms_gradient(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import mto_collapse
    import torch

    assert mto_collapse.mean_cosine(torch.ones(6, 4)) == pytest.approx(1.0)  # collapse: every image the same
    assert mto_collapse.mean_cosine(torch.eye(4)) == pytest.approx(0.0)
    # 8 rows on 4 orthogonal directions, equally often: centring removes their mean, leaving 3 equal directions
    assert mto_collapse.effective_rank(torch.eye(4).repeat(2, 1)) == pytest.approx(3.0, abs=1e-3)
    assert mto_collapse.effective_rank(torch.randn(64, 1) @ torch.randn(1, 8)) == pytest.approx(1.0, abs=1e-3)

    if not FASHION_MNIST.exists():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    from hf_mto import ViTMAEMTOConfig, ViTMAEMTOForPreTraining

    config = ViTMAEMTOConfig(
        image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        decoder_hidden_size=8, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
        decoder_intermediate_size=16, mask_ratio=0.5,
    )  # fmt: skip
    for step in (1, 2):
        torch.manual_seed(step)
        ViTMAEMTOForPreTraining(config).save_pretrained(tmp_path / f"checkpoint-{step}")
    rows = mto_collapse.main([str(tmp_path), "--weight", "0.1", "--images", "8", "--affinity", "cosine"])[
        str(tmp_path)
    ]
    assert [row["step"] for row in rows] == [1, 2]  # every checkpoint, in step order
    for row in rows:
        assert set(row) == set(mto_collapse.COLUMNS)
        assert row["grad_reconstruction"] > 0 and row["grad_spa"] > 0  # both reach the encoder
        # MAE's mask token (in the decoder) is what the masked rows of L_e start from
        assert row["mask_token_grad_reconstruction"] > 0 and row["mask_token_grad_e"] > 0
        assert 0 < row["shared_argmax"] <= 1 and row["norm_max_over_median"] >= 1
    assert "| step | feature_rank" in capsys.readouterr().out

    from hf_mto import SimMIMMTOConfig, SimMIMMTOForMaskedImageModeling

    simmim = SimMIMMTOConfig(
        image_size=8, patch_size=4, encoder_stride=4, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, mask_ratio=0.5, mask_patch_size=4,
    )  # fmt: skip
    SimMIMMTOForMaskedImageModeling(simmim).save_pretrained(tmp_path / "simmim")
    (row,) = mto_collapse.main([str(tmp_path / "simmim"), "--weight", "0.1", "--images", "8"])[
        str(tmp_path / "simmim")
    ]
    # SimMIM's mask token is in the encoder: every term's gradient reaches it (MAE's L_spa never sees the encoder's)
    assert row["grad_reconstruction"] > 0 and row["mask_token_grad_reconstruction"] > 0
    assert row["mask_token_grad_spa"] > 0 and row["mask_token_grad_e"] > 0 and row["mask_token_grad_r"] > 0


def _fake_run(arm, seed, knn, width=None, depth=None, lr=1.5e-3, weight=0.0):
    """A convergence.py run record with a 2-epoch k-NN / probe curve and no fine-tuning."""
    return {
        "arm": arm, "seed": seed, "weight": weight, "lr": lr, "epochs": [1.0, 2.0], "num_epochs": 2,
        "eval_knn_accuracy": knn, "eval_linear_probe_accuracy": knn, "epoch_seconds": [1.0, 1.0],
        "wall_seconds": 60.0, "finetune": {"epochs": [], "finetune_accuracy": [], "wall_seconds": []},
        "width": width, "depth": depth,
    }  # fmt: skip


def test_convergence_width_and_depth_reshape_each_preset(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import convergence

    from hf_mto import SimMIMMTOConfig, ViTMAEMTOConfig
    from hf_mto.cli import _parse_overrides

    mae = _parse_overrides(convergence.config_overrides(convergence.MAE, 192, 2), ViTMAEMTOConfig)
    assert (mae["hidden_size"], mae["intermediate_size"], mae["num_attention_heads"]) == (192, 768, 3)  # ViT-Ti
    assert (mae["decoder_hidden_size"], mae["decoder_intermediate_size"], mae["decoder_num_attention_heads"]) == (
        192, 768, 3,
    )  # fmt: skip
    assert (mae["num_hidden_layers"], mae["decoder_num_hidden_layers"]) == (2, 1)
    assert (mae["image_size"], mae["patch_size"]) == (32, 4)  # the rest of the preset's shape is kept
    ViTMAEMTOConfig(**mae)  # a valid config
    simmim = _parse_overrides(convergence.config_overrides(convergence.SIMMIM, 384, None), SimMIMMTOConfig)
    assert (simmim["hidden_size"], simmim["num_attention_heads"], simmim["num_hidden_layers"]) == (384, 6, 4)
    assert not any(key.startswith("decoder") for key in simmim)  # SimMIM has no decoder to widen
    with pytest.raises(ValueError, match="100"):
        convergence.config_overrides(convergence.MAE, 100, None)
    with pytest.raises(ValueError, match="0"):
        convergence.config_overrides(convergence.MAE, None, 0)

    args = convergence.argparse.Namespace(width=384, depth=2, epochs=6)
    assert convergence.run_name("mae_mto", 1, 0.003, 5e-4, args) == "mae_mto-w0.003-lr0.0005-e6-d384-L2-seed1"
    assert convergence.run_name("random_init", 1, 0.0, 5e-4, args) == "random_init-d384-L2-seed1"
    args.width = args.depth = None
    assert convergence.run_name("mae", 0, 0.0, 1.5e-3, args) == "mae-w0-lr0.0015-e6-seed0"  # the old names


def test_convergence_json_gathers_the_pieces_of_a_study(tmp_path, monkeypatch):
    """A study run in pieces (arms, seeds, widths at a time) keeps every piece's runs in its JSON and reports them
    together, each arm against its baseline of the same width; a JSON of other settings is refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import convergence

    args = convergence.main.__globals__["argparse"].Namespace(
        train_samples=4000, test_samples=1000, bank_samples=2000, pooling="mean", finetune_epochs=[],
        finetune_num_epochs=2, finetune_train_samples=3000, finetune_eval_samples=2000, finetune_lr=None,
        finetune_trainable_blocks=None, smoke=False, output_dir=tmp_path,
    )  # fmt: skip
    first = [_fake_run("mae", 0, [0.5, 0.6], width=64), _fake_run("mae_mto_cosine", 0, [0.5, 0.5], width=64)]
    convergence.write(convergence.merge(first, "convergence", args), "convergence", args)
    redone = _fake_run("mae_mto_cosine", 0, [0.6, 0.7], width=64)  # the same run again: replaces its record
    second = [redone, _fake_run("mae", 0, [0.4, 0.45], width=192), _fake_run("mae_mto_cosine", 0, [0.4, 0.5], 192)]
    runs = convergence.merge(second, "convergence", args)
    assert [(run["arm"], run["width"]) for run in runs] == [
        ("mae", 64), ("mae_mto_cosine", 64), ("mae", 192), ("mae_mto_cosine", 192),
    ]  # fmt: skip
    assert runs[1]["eval_knn_accuracy"] == [0.6, 0.7]
    text = convergence.report(runs)
    # each width's MTO arm reaches its own baseline's final k-NN (0.6 at 64-d, 0.45 at 192-d) at its own epoch
    assert "| mae_mto_cosine (64-d) | 0 | 0.0015 | 1 | 0.7000 |" in text
    assert "| mae_mto_cosine (192-d) | 0 | 0.0015 | 1 | 0.5000 |" in text
    head = text.splitlines()[0].split(" | ")
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| mae_mto_cosine")][:2]
    column = head.index("epochs to base final knn")
    assert (rows[0][column], rows[1][column]) == ("1.00", "1.50")

    args.train_samples = 8000
    with pytest.raises(SystemExit, match="train_samples 4000 there, 8000 now"):
        convergence.merge(second, "convergence", args)

    # a JSON written before --finetune_lr / --finetune_trainable_blocks existed: their defaults, the same study
    args.train_samples = 4000
    recorded = json.loads((tmp_path / "convergence.json").read_text())
    for key in ("finetune_lr", "finetune_trainable_blocks"):
        del recorded["args"][key]
    (tmp_path / "convergence.json").write_text(json.dumps(recorded))
    assert len(convergence.merge(second, "convergence", args)) == 4
    args.finetune_trainable_blocks = 1
    with pytest.raises(SystemExit, match="finetune_trainable_blocks None there, 1 now"):
        convergence.merge(second, "convergence", args)


def test_convergence_finetune_lr_and_blocks_are_part_of_the_protocol(tmp_path, monkeypatch):
    """--finetune_lr and --finetune_trainable_blocks reach the fine-tuning recipe (its base LR, partial fine-tuning)
    and name the fine-tuning's folder, so that two protocols of one checkpoint keep their own runs; without them the
    preset's LR, full fine-tuning and the old folder names."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import convergence

    launched = []

    def fake_launch(cmd, run_dir, what):
        launched.append((run_dir.name, cmd))
        (run_dir / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.5 + 0.1 * len(launched)}))
        (run_dir / "wall_seconds.json").write_text("2.0")

    monkeypatch.setattr(convergence, "launch", fake_launch)
    monkeypatch.setattr(convergence, "checkpoints", lambda run_dir: {3.0: run_dir / "checkpoint-96"})
    args = convergence.argparse.Namespace(
        epochs=6, finetune_epochs=[3.0], finetune_num_epochs=3, finetune_train_samples=10000,
        finetune_eval_samples=5000, finetune_lr=1.6e-2, finetune_trainable_blocks=None, smoke=False,
    )  # fmt: skip
    run = {"arm": "mae", "seed": 1}
    tuned = convergence.finetune_points(run, tmp_path, args)
    args.finetune_lr = None
    preset = convergence.finetune_points(run, tmp_path, args)
    assert [name for name, _ in launched] == ["finetune-e3-3x10000-lr0.016", "finetune-e3-3x10000"]
    assert launched[0][1][launched[0][1].index("--base_learning_rate") + 1] == "0.016"
    assert "--base_learning_rate" not in launched[1][1]
    assert (tuned["finetune_accuracy"], preset["finetune_accuracy"]) == ([0.6], [0.7])  # neither overwrote the other
    args.finetune_lr = 1.6e-2
    assert convergence.finetune_points(run, tmp_path, args)["finetune_accuracy"] == [0.6]  # reused, not rerun
    assert len(launched) == 2
    args.finetune_trainable_blocks = 1
    assert convergence.finetune_points(run, tmp_path, args)["finetune_accuracy"] == [0.8]
    name, cmd = launched[-1]
    assert name == "finetune-e3-3x10000-lr0.016-last1" and cmd[cmd.index("--trainable_blocks") + 1] == "1"
