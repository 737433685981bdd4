"""The benchmark scripts run end to end on small inputs (their full runs are in benchmarks/results)."""
import json
import subprocess
import sys
from pathlib import Path

import timm
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(args, tmp_path):
    return subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "IGQ_CACHE_DIR": str(tmp_path / "cache")})


def test_imagenet_path_on_a_fake_folder(tmp_path):
    """--imagenet DIR --weights FILE: top-1 of a timm classifier on an ImageFolder, FP and quantized."""
    gen = torch.Generator().manual_seed(0)
    for synset in ("n01440764", "n01443537"):
        (tmp_path / "val" / synset).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(64, 80, 3, generator=gen) * 255).byte().numpy()
            Image.fromarray(pixels).save(tmp_path / "val" / synset / f"{i}.png")
    torch.save({"state_dict": timm.create_model("vit_tiny_patch16_224").state_dict()}, tmp_path / "w.pth")
    out = tmp_path / "res"
    proc = _run(["accuracy.py", "--imagenet", str(tmp_path / "val"), "--timm-model", "vit_tiny_patch16_224",
                 "--weights", str(tmp_path / "w.pth"), "--bits", "8", "--methods", "layer", "igq", "repq", "--groups", "4",
                 "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads((out / "accuracy.json").read_text())["cells"]
    assert set(cells) == {"imagenet|FP32|-", "imagenet|Layer-wise min-max|W8A8", "imagenet|IGQ G=4|W8A8"} | {
        f"imagenet|{row}|W8A8" for row in ("RepQ-ViT", "DopQ-ViT (MOSF + TanQ)", "IGQ G=8 + TanQ", "IGQ G=8 + log-sqrt2")}
    for cell in cells.values():
        assert cell["top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)  # 4 images
    assert cells["imagenet|IGQ G=4|W8A8"]["cosine"] > 0.9
    assert "ImageNet classifier top-1" in (out / "accuracy.md").read_text()
    assert (out / "accuracy_vs_bits.png").stat().st_size > 1000


def test_imagenet_path_needs_model_and_weights(tmp_path):
    proc = _run(["accuracy.py", "--imagenet", str(tmp_path), "--out", str(tmp_path / "r")], tmp_path)
    assert proc.returncode != 0 and "--imagenet needs --timm-model NAME and --weights FILE" in proc.stderr


def test_train_fmnist_vit_smoke(tmp_path):
    ckpt = tmp_path / "vit.pt"
    proc = _run(["train_fmnist_vit.py", "--epochs", "1", "--limit", "256", "--out", str(ckpt)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from igq_plugin.bench.zoo import load_fmnist_vit

    model = load_fmnist_vit(ckpt)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    info = torch.load(ckpt, weights_only=True)["info"]
    assert info["train_images"] == 256 and 0 <= info["test_top1"] <= 100


def test_select_w4a4_chooses_on_validation_and_scores_the_winner(tmp_path):
    out = tmp_path / "res"
    ckpt = tmp_path / "cache" / "fmnist_vit_tiny.pt"  # where load_fmnist_vit looks (IGQ_CACHE_DIR)
    proc = _run(["train_fmnist_vit.py", "--epochs", "1", "--limit", "256", "--out", str(ckpt)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(["select_w4a4.py", "--models", "fmnist-vit", "--only", "q=0.99 (default)", "q=0.8",
                 "--val-images", "32", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((out / "select_w4a4.json").read_text())["models"]["fmnist-vit"]
    cands = entry["candidates"]
    assert set(cands) == {"q=0.99 (default)", "q=0.8"} and entry["val_images"] == 32
    best = max(cands, key=lambda n: cands[n]["val_cosine"])
    assert entry["winner"]["name"] == best and entry["winner"]["chosen_among"] == sorted(cands)
    assert 0.5 < cands[best]["val_cosine"] <= 1.0 and 0.0 <= entry["winner"]["test_top1"] <= 100.0
    assert all(c["calibration_images"] == 32 for c in cands.values())
    assert f"**{best}**" in (out / "select_w4a4.md").read_text()


def test_select_w4a4_validation_images_are_held_out():
    """DINOv2's validation images avoid the probe's training subset and the calibration images."""
    import types
    sys.path.insert(0, str(BENCH))
    from select_w4a4 import split

    from igq_plugin.bench.data import fashion_mnist, gray_to_imagenet

    x_train, _ = fashion_mnist("train")
    task = types.SimpleNamespace(train_indices=torch.arange(0, len(x_train), 2))  # the even images
    calib, val_x, _ = split("dinov2", task, 5)
    assert torch.equal(val_x, gray_to_imagenet(x_train[[1, 3, 5, 7, 9]]))
    assert torch.equal(calib[:32], gray_to_imagenet(x_train[-32:]))  # the ablation's 32 come first
    assert torch.equal(calib[32:], gray_to_imagenet(x_train[-128:-32]))


def test_reconstruction_script_smoke(tmp_path):
    out = tmp_path / "res"
    ckpt = tmp_path / "cache" / "fmnist_vit_tiny.pt"  # where load_fmnist_vit looks (IGQ_CACHE_DIR)
    proc = _run(["train_fmnist_vit.py", "--epochs", "1", "--limit", "256", "--out", str(ckpt)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(["reconstruction.py", "--models", "fmnist-vit", "--bits", "4", "--rec-images", "16", "--iters", "2",
                 "--num-test", "64", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "reconstruction.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["FP32", "IGQConfig() calibration only",
                                           "+ igq.reconstruct (16 images, 2 iters)"]
    assert all(0.0 <= r["top1"] <= 100.0 for r in rows)
    assert "calibration only" in (out / "reconstruction.md").read_text()
    proc = _run(["qat.py", "--bits", "3", "--steps", "2", "--range-lrs", "1e-3", "1e-2", "--lrs", "1e-4", "0",
                 "--batch-size", "4", "--train-images", "32", "--rec-images", "16", "--val-images", "32", "--num-test",
                 "32", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "qat_fmnist.json").read_text())["rows"]
    assert [r["method"].split(" (")[0] for r in rows] == [
        "FP32", "IGQConfig() calibration only", "+ igq.reconstruct", "+ igq.qat.train", "+ igq.reconstruct + igq.qat.train"]
    assert set(rows[3]["val_by_lr_range_lr"]) == {"0.0001,0.001", "0.0001,0.01", "0,0.001", "0,0.01"}
    assert (out / "qat_fmnist.png").stat().st_size > 0


def test_qat_dinov2_script_smoke_and_resume(tmp_path):
    """DINOv2-S probe rows are merged into the results file as they finish; a finished row is not recomputed."""
    out, state = tmp_path / "res", tmp_path / "state"
    args = ["qat_dinov2.py", "--bits", "4", "--num-train", "64", "--num-test", "32", "--steps", "1", "--batch-size", "2",
            "--crops", "1", "--state-dir", str(state), "--out", str(out)]
    proc = _run([*args, "--stages", "calibration", "qat"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "qat_dinov2.json").read_text())["rows"]
    assert [(r["bits"], r["stage"]) for r in rows] == [("-", "FP32"), ("W4A4", "calibration"), ("W4A4", "qat")]
    assert "quantizers only" in rows[2]["method"] and 0.0 <= rows[2]["top1"] <= 100.0 and rows[2]["cosine"] > 0.5
    assert (state / "w4_qat.ckpt").is_file()  # the QAT checkpoint: a cut-off run resumes from it
    proc = _run([*args, "--stages", "calibration", "qat"], tmp_path)  # nothing left to do: rows kept as they were
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "qat_dinov2.json").read_text())["rows"] == rows
    assert "W4A4" not in proc.stderr  # no evaluation ran
    proc = _run([*args, "--stages", "reconstruct+qat"], tmp_path)
    assert proc.returncode != 0 and "needs the reconstruct stage" in proc.stderr
