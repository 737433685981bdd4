"""The igq command line."""
import json
import subprocess
import sys

import pytest
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


def test_config_command_rejects_bad_bits(capsys):
    assert main(["config", "--w-bits", "9"]) == 2
    assert "weight_bits must be in [2, 8]" in capsys.readouterr().err


def test_quantize_command_saves_loadable_model(tmp_path, capsys):
    import timm
    out = tmp_path / "q.pt"
    rc = main(["quantize", "--model", "deit_tiny_patch16_224", "--num-calib", "2", "-q",
               "--w-bits", "8", "--a-bits", "8", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.split("\nsaved")[0])
    assert report["output_cosine_vs_fp"] > 0.9
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    loaded = igq.load(out, model)
    assert loaded(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_demo_command_rejects_weights_without_model(capsys):
    assert main(["demo", "--weights", "w.pth"]) == 2
    assert "--weights needs --model" in capsys.readouterr().err


def test_demo_runs_on_real_weights_small(capsys, tmp_path):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--num-train", "60", "--num-test", "20", "--num-calib", "8", "-q", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Layer-wise W4A4" in text and "IGQ G=8 W4A4" in text and "probe top-1" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["FP32", "Layer-wise W4A4", "IGQ G=8 W4A4"]
    assert rows[0]["top1"] > 40 and all(0 <= r["top1"] <= 100 for r in rows)
    assert rows[2]["cosine"] > rows[1]["cosine"]
