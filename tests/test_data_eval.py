"""Data readers (IDX / Fashion-MNIST, photos) and evaluation tools (probe, fidelity, per-site SQNR)."""
import gzip
import struct

import pytest
import torch
from torch import nn

import igq_plugin as igq
from igq_plugin.bench import data
from igq_plugin.bench.evaluation import LinearProbe, SiteSQNR, extract_features, fidelity
from igq_plugin.calibration import ValueSampleObserver


def _write_idx(path, tensor, code, compress=True):
    header = bytes([0, 0, code, tensor.ndim]) + b"".join(struct.pack(">I", n) for n in tensor.shape)
    if tensor.dtype == torch.uint8:
        body = tensor.numpy().tobytes()
    else:
        body = tensor.numpy().astype(tensor.numpy().dtype.newbyteorder(">")).tobytes()
    raw = header + body
    (gzip.open if compress else open)(path, "wb").write(raw)


def test_read_idx_uint8_and_big_endian_int32(tmp_path):
    images = torch.randint(0, 256, (5, 4, 3), dtype=torch.uint8)
    _write_idx(tmp_path / "a.gz", images, 0x08)
    assert torch.equal(data.read_idx(tmp_path / "a.gz"), images)
    ints = torch.tensor([[1, -2, 70000], [3, 4, -5]], dtype=torch.int32)
    _write_idx(tmp_path / "b", ints, 0x0C, compress=False)
    assert torch.equal(data.read_idx(tmp_path / "b"), ints)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", torch.zeros(4, 2, dtype=torch.uint8), 0x08, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        data.read_idx(tmp_path / "short")


def test_fashion_mnist_from_a_folder_and_missing_files(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 9, 8, 7], dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 0x08)
    x, y = data.fashion_mnist("test", root=tmp_path)
    assert torch.equal(x, images) and y.dtype == torch.int64 and y.tolist() == labels.tolist()
    with pytest.raises(FileNotFoundError, match="train IDX files missing"):
        data.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        data.fashion_mnist("val", root=tmp_path)
    monkeypatch.setenv("IGQ_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist_dir()


def test_real_fashion_mnist_installed_by_setup():
    x, y = data.fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.bincount().tolist() == [1000] * 10
    x, y = data.fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_gray_to_imagenet_shape_and_normalization():
    x = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    out = data.gray_to_imagenet(x, size=56)
    assert out.shape == (2, 3, 56, 56)
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 10, 10], expected)


def test_calibration_photos_are_32_real_photos():
    photos = data.calibration_photos(32)
    assert len(photos) == 32 and len(set(photos)) == 32
    assert all(p.name.startswith("imagenet_") for p in photos[:20])
    assert not any("chessboard" in p.name or p.name in ("color.png", "logo.png", "text.png") for p in photos)


def test_linear_probe_separates_gaussian_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(400) % 4
    feats = centers[labels] + torch.randn(400, 16, generator=g)
    probe = LinearProbe().fit(feats[:300], labels[:300])
    assert probe.accuracy(feats[300:], labels[300:]) > 95
    noise = torch.randn(100, 16, generator=g)
    assert probe.accuracy(noise, labels[300:]) < 50
    with pytest.raises(RuntimeError, match="before fit"):
        LinearProbe().predict(feats)


def test_fidelity_and_extract_features():
    ref = torch.randn(8, 5)
    assert fidelity(ref, ref)["cosine"] == pytest.approx(1.0)
    noisy = fidelity(ref, ref + 0.1 * torch.randn(8, 5))
    assert 0.9 < noisy["cosine"] < 1 and 10 < noisy["sqnr_db"] < 30
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity(ref, ref[:4])
    out = extract_features(lambda x: x * 2, torch.arange(7.0), batch_size=3, progress=False)
    assert torch.equal(out, torch.arange(7.0) * 2)


def test_site_sqnr_measures_each_site_locally():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 10, 16)
    q8 = igq.quantize(model, igq.IGQConfig(weight_bits=8, act_bits=8), x, progress=False)
    q4 = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4), x, progress=False)
    res = {}
    for bits, q in ((8, q8), (4, q4)):
        with SiteSQNR(q) as rec:
            q(x)
        res[bits] = rec.results()
    assert set(res[8]) == {"0", "2"}
    # ~6 dB per bit: 4 more bits buy well over 15 dB at every site
    assert all(res[8][s] > res[4][s] + 15 for s in res[8])
    assert SiteSQNR.worst(res[4], 1)[0][1] == min(res[4].values())
    # hooks are removed on exit
    assert not q4[0]._forward_hooks


def test_layer_percentile_clips_outliers_and_validates():
    x = torch.randn(4, 50, 8)
    x[0, 0, 0] = 100.0  # one outlier
    model = nn.Sequential(nn.Linear(8, 8))
    minmax = igq.quantize(model, igq.IGQConfig(act_scheme="layer", act_bits=8, weight_bits=8), x, progress=False)
    pct = igq.quantize(
        model, igq.IGQConfig(act_scheme="layer", act_bits=8, weight_bits=8, act_percentile=99.9), x, progress=False
    )
    assert float(minmax[0].input_quantizer.hi) == pytest.approx(100.0)
    assert float(pct[0].input_quantizer.hi) < 5.0
    with pytest.raises(ValueError, match="act_percentile must be in"):
        igq.IGQConfig(act_percentile=30.0)
    with pytest.raises(ValueError, match="percentile ranges need scheme 'layer'"):
        igq.ActQuantizer(4, "igq", 8, 2, percentile=99.0, site="s")


def test_value_sample_observer_is_bounded():
    obs = ValueSampleObserver("s", samples_per_call=1000)
    for _ in range(3):
        obs.observe(torch.rand(2, 100, 50))
    lo, hi = obs.percentile_range(99.0)
    assert sum(v.numel() for v in obs._values) == 3000
    assert 0.0 <= float(lo) < 0.05 and 0.95 < float(hi) <= 1.0
