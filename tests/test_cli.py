"""The igq command line."""
import json
import subprocess
import sys

import torch

import igq_plugin as igq
from igq_plugin.cli import main


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "igq_plugin.cli", "--help"], capture_output=True, text=True, check=True)
    assert "quantize" in out.stdout and "config" in out.stdout


def test_config_command_prints_valid_config(capsys):
    assert main(["config", "--w-bits", "6", "--a-bits", "6", "--groups", "12"]) == 0
    cfg = igq.IGQConfig.from_json(capsys.readouterr().out)
    assert (cfg.weight_bits, cfg.act_bits, cfg.num_groups) == (6, 6, 12)


def test_config_command_presets_and_softmax_levels(capsys):
    assert main(["config", "--preset", "dopq-vit", "--w-bits", "6", "--tanq-steepness", "3"]) == 0
    cfg = igq.IGQConfig.from_json(capsys.readouterr().out)
    assert cfg == igq.IGQConfig.dopq_vit(6, tanq_steepness=3.0)
    assert main(["config", "--softmax-quantizer", "log_sqrt2", "--reparam", "repq"]) == 0
    cfg = igq.IGQConfig.from_json(capsys.readouterr().out)
    assert (cfg.act_scheme, cfg.softmax_quantizer, cfg.reparam) == ("igq", "log_sqrt2", "repq")
    assert main(["config", "--preset", "repq-vit", "--reparam", "none"]) == 0
    assert igq.IGQConfig.from_json(capsys.readouterr().out).reparam is None
    assert main(["config", "--preset", "repq-vit", "--config", "x.json"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["config", "--preset", "igq-plus", "--w-bits", "6", "--weight-rounding", "nearest"]) == 0
    cfg = igq.IGQConfig.from_json(capsys.readouterr().out)
    assert cfg == igq.IGQConfig.igq_plus(6, weight_rounding="nearest")
    assert (cfg.softmax_quantizer, cfg.weight_clipping, cfg.matmul_scheme, cfg.act_scheme) == ("tanq", "mse", "igq", "igq")
    assert main(["config", "--weight-clipping", "mse", "--weight-rounding", "gptq"]) == 0
    cfg = igq.IGQConfig.from_json(capsys.readouterr().out)
    assert (cfg.weight_clipping, cfg.weight_rounding) == ("mse", "gptq")


def test_config_command_rejects_bad_bits(capsys):
    assert main(["config", "--w-bits", "9"]) == 2
    assert "weight_bits must be in [2, 8]" in capsys.readouterr().err


def test_quantize_command_saves_loadable_model(tmp_path, capsys):
    import timm
    out = tmp_path / "q.pt"
    rc = main(["quantize", "--model", "deit_tiny_patch16_224", "--num-calib", "2", "-q",
               "--w-bits", "8", "--a-bits", "8", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    report, end = json.JSONDecoder().raw_decode(text)
    assert report["output_cosine_vs_fp"] > 0.9
    assert "blocks.11.mlp.fc2" in text[end:] and "ratio to FP32" in text[end:]  # the BOP table
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    loaded = igq.load(out, model)
    assert loaded(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_quantize_with_allocation_then_report_command(tmp_path, capsys):
    out = tmp_path / "q.pt"
    rc = main(["quantize", "--model", "deit_tiny_patch16_224", "--num-calib", "1", "-q", "--group-allocation", "bop",
               "--alloc-candidates", "1", "4", "--groups", "4", "--out", str(out)])
    assert rc == 0
    report, _ = json.JSONDecoder().raw_decode(capsys.readouterr().out)
    assert report["config"]["group_allocation"] == "bop"
    assert main(["report", str(out), "--model", "deit_tiny_patch16_224", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    linear = [s for s in rep["sites"] if s["kind"] == "linear" and s["site"].startswith("blocks.")]
    assert len(linear) == 48 and {s["groups"] for s in linear} <= {1, 4}
    assert rep["total_bops"] < rep["fp_bops"]
    # Budgets below the cheapest allocation fail with the minimum in the message.
    assert main(["quantize", "--model", "deit_tiny_patch16_224", "--num-calib", "1", "-q", "--group-allocation",
                 "bop", "--alloc-candidates", "1", "--bop-budget", "1e-6"]) == 2
    assert "bop_budget >=" in capsys.readouterr().err


def test_demo_command_rejects_weights_without_model(capsys):
    assert main(["demo", "--weights", "w.pth"]) == 2
    assert "--weights needs --model" in capsys.readouterr().err


def test_demo_runs_on_real_weights_small(capsys, tmp_path):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--num-train", "60", "--num-test", "20", "--num-calib", "8", "--bits", "4", "-q",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Layer-wise W4A4" in text and "IGQ G=8 W4A4" in text and "probe top-1" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["FP32", "Layer-wise W4A4", "IGQ G=8 W4A4", "IGQ-plus G=8 W4A4",
                                           "Best G=8 W4A4"]
    assert rows[0]["top1"] > 40 and all(0 <= r["top1"] <= 100 for r in rows)
    assert rows[3]["cosine"] > rows[2]["cosine"] > rows[1]["cosine"]
    assert rows[4]["cosine"] > rows[2]["cosine"]  # the validation-chosen configuration, task-domain calibration
    deployed = json.loads(out.read_text())["deployment"]  # IGQ act_grid=8 on OpenVINO INT8, measured on OV
    assert deployed["int8_gemms"] == 12 * 6 + 1 and 0 <= deployed["top1"] <= 100 and deployed["cosine"] > 0.2
    assert set(deployed["latency_ms"]) == {"IGQ", "layer", "FP32"} and "Deployed: IGQ G=8 W4A4" in text


def test_qat_command_trains_saves_and_resumes(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "train"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    quantized = tmp_path / "q.pt"
    assert main(["quantize", "--model", "deit_tiny_patch16_224", "--num-calib", "2", "-q", "--w-bits", "4",
                 "--a-bits", "4", "--module-bits", "*.mlp.fc2=6,8", "--out", str(quantized)]) == 0
    capsys.readouterr()
    args = ["qat", str(quantized), "--model", "deit_tiny_patch16_224", "--train-dir", str(images), "--steps", "2",
            "--batch-size", "2", "--crops", "1", "-q"]
    assert main(args) == 2  # neither --out nor --checkpoint: refused before any work
    assert "--out" in capsys.readouterr().err
    state, out = tmp_path / "state.pt", tmp_path / "t.pt"
    assert main(args + ["--checkpoint", str(state), "--out", str(out)]) == 0
    trained = igq.load(out, __import__("timm").create_model("deit_tiny_patch16_224", pretrained=False))
    fc2 = trained.blocks[0].mlp.fc2
    assert (fc2.w_bits, fc2.input_quantizer.bits, trained.blocks[0].mlp.fc1.w_bits) == (6, 8, 4)
    assert torch.load(state, weights_only=False)["step"] == 2
    again = tmp_path / "again.pt"  # resuming a finished run gives the same model
    assert main(args + ["--checkpoint", str(state), "--resume", "--out", str(again)]) == 0
    a, b = torch.load(out, weights_only=False), torch.load(again, weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert main(args + ["--checkpoint", str(state), "--resume", "--lr", "1e-3"]) == 2
    assert "settings differ" in capsys.readouterr().err
