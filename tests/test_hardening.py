"""Catalog of bad inputs and faults (issue 23): each case asserts the message or the behaviour, and that
nothing on disk or in the user's model changed. Add a case here with every bug report."""
import os
import warnings

import pytest
import torch
from torch import nn

import igq_plugin as igq
from nets import MLP
from igq_plugin.cli import main


Net = MLP


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 6, 16, generator=g) for _ in range(2)]


CFG = dict(num_groups=2)


@pytest.fixture
def saved(tmp_path):
    model = Net().eval()
    qmodel = igq.quantize(model, igq.IGQConfig(**CFG), _data(), progress=False)
    path = tmp_path / "q.pt"
    igq.save(qmodel, path)
    return model, qmodel, path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- saving -------------------------------------------------------------------------------------

def test_failed_overwrite_keeps_the_old_checkpoint(saved, monkeypatch):
    model, qmodel, path = saved
    before = path.read_bytes()
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        igq.save(qmodel, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["q.pt"]  # no temporary file left behind
    x = torch.randn(2, 6, 16)
    assert torch.equal(igq.load(path, model)(x), qmodel(x))


def test_save_refuses_an_uncalibrated_model(tmp_path):
    prepared = igq.prepare(Net().eval(), igq.IGQConfig(**CFG))
    with pytest.raises(ValueError, match="not calibrated .*fc1.input_quantizer.*igq.convert"):
        igq.save(prepared, tmp_path / "q.pt")
    assert not (tmp_path / "q.pt").exists()


def test_save_into_a_missing_directory_or_onto_a_directory(saved, tmp_path):
    _, qmodel, _ = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        igq.save(qmodel, tmp_path / "missing" / "q.pt")
    with pytest.raises(ValueError, match="is a directory"):
        igq.save(qmodel, tmp_path)


# --- already quantized ----------------------------------------------------------------------------

def test_quantizing_or_loading_onto_a_quantized_model_is_refused(saved):
    model, qmodel, path = saved
    before = _state(qmodel)
    with pytest.raises(ValueError, match="already has igq quantizers.*Re-quantize from the float model"):
        igq.quantize(qmodel, igq.IGQConfig(weight_bits=8), _data(), progress=False)
    with pytest.raises(ValueError, match="pass the float model"):
        igq.load(path, qmodel)
    assert _same(before, _state(qmodel))


# --- loading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\x00" * 64, os.urandom(512)], ids=["empty", "zeros", "random"])
def test_unreadable_files_are_refused_by_name(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    model = Net()
    before = _state(model)
    with pytest.raises(ValueError, match="bad.pt' is not a readable igq_plugin checkpoint"):
        igq.load(path, model)
    assert _same(before, _state(model))


def test_truncated_checkpoint_and_directory_are_refused(saved, tmp_path):
    model, _, path = saved
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable igq_plugin checkpoint"):
        igq.load(tmp_path / "cut.pt", model)
    with pytest.raises(ValueError, match="is a directory"):
        igq.load(tmp_path, model)


def _tampered(path, change):
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("config"), "has no 'config' entry"),
    (lambda c: c["state_dict"]["fc1.input_quantizer.lo"].fill_(float("nan")), r"fc1.input_quantizer.lo holds NaN"),
    (lambda c: c["state_dict"]["fc2.input_quantizer.calibrated"].fill_(False), r"fc2.input_quantizer.calibrated is False"),
    (lambda c: c["state_dict"].__setitem__("fc1.weight_int", torch.zeros(3, 3, dtype=torch.uint8)),
     r"fc1.weight_int is torch.uint8 \(3, 3\); expected empty or torch.uint8 \(32, 16\)"),
    (lambda c: c["state_dict"].__setitem__("fc1.weight_scale", torch.ones(5)), "does not fit this model.*fc1.weight_scale"),
    (lambda c: c["state_dict"]["fc1.weight_calibrated"].fill_(False), "fc1.weight_calibrated is False"),
], ids=["no-config", "nan-range", "uncalibrated", "weight-codes-shape", "scale-shape", "weight-uncalibrated"])
def test_damaged_checkpoints_name_the_key(saved, change, message):
    model, _, path = saved
    _tampered(path, change)
    before = _state(model)
    with pytest.raises(ValueError, match=message):
        igq.load(path, model)
    assert _same(before, _state(model))


def test_format_1_checkpoints_load_with_a_warning(saved, caplog):
    model, qmodel, path = saved
    _tampered(path, lambda c: c.__setitem__("format_version", 1))
    x = torch.randn(2, 6, 16)
    with caplog.at_level("WARNING", logger="igq_plugin"):
        assert torch.equal(igq.load(path, model)(x), qmodel(x))
    assert "format 1" in caplog.text


# --- command line ---------------------------------------------------------------------------------

def test_cli_refuses_out_equal_to_weights_before_any_work(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    torch.save({"not": torch.ones(1)}, weights)
    before = weights.read_bytes()
    code = main(["quantize", "--model", "deit_tiny_patch16_224", "--weights", str(weights), "--out", str(weights)])
    assert code == 2 and "is also an input" in capsys.readouterr().err
    assert weights.read_bytes() == before
    code = main(["quantize", "--model", "deit_tiny_patch16_224", "--out", str(tmp_path / "no" / "q.pt")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


# --- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    (dict(tanq_steepness=8.0), "tanq_steepness"),
    (dict(act_percentile=99.9, matmul_scheme="igq"), "act_percentile"),
    (dict(quantize_attention=False, softmax_quantizer="tanq"), "softmax_quantizer"),
    (dict(quantize_attention=False, softmax_groups=2), "softmax_groups"),
    (dict(bop_budget=0.5), "bop_budget"),
    (dict(sensitivity_images=8), "sensitivity_images"),
    (dict(gptq_damp=0.2), "gptq_damp"),
    (dict(weight_clipping="mse", weight_percentile=0.1), "weight_percentile"),
    (dict(range_update="mean", range_quantile=0.9), "range_quantile"),
    (dict(act_scheme="layer", num_groups=4), "num_groups"),
])
def test_fields_that_have_no_effect_warn_by_name(fields, field):
    with pytest.warns(UserWarning, match=f"{field}=.* has no effect"):
        igq.IGQConfig(**fields)


def test_defaults_and_presets_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cfg in (igq.IGQConfig(), igq.IGQConfig.igq_plus(4), igq.IGQConfig.repq_vit(6), igq.IGQConfig.dopq_vit(4),
                    igq.IGQConfig(act_scheme="layer", act_percentile=99.99), igq.IGQConfig(group_allocation="bop")):
            igq.IGQConfig.from_dict(cfg.to_dict())


@pytest.mark.parametrize("fields, message", [
    (dict(act_scheme="layer", group_allocation="bop"), "needs act_scheme='igq'"),
    (dict(softmax_groups=10**6), "softmax_groups must be <= 1024"),
    (dict(num_groups=5000), "num_groups must be <= 1024"),
    (dict(group_allocation="bop", allocation_candidates=(1, 4096)), "allocation_candidates entries must be <= 1024"),
    (dict(range_quantile=True), r"range_quantile must be None \(bit-aware default\) or a float"),
])
def test_contradictory_or_oversized_fields_are_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        igq.IGQConfig(**fields)


# --- calibration inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch, error, message", [
    (torch.randn(4, 6, 16).half(), TypeError, "batch 0 has dtype torch.float16 but the model's parameters are torch.float32"),
    (torch.randint(0, 255, (4, 6, 16), dtype=torch.uint8), TypeError, "batch 0 is a torch.uint8 tensor"),
    ((torch.tensor([3, 1, 4, 1]), torch.randn(4, 6, 16)), TypeError, "looks like \\(label, image\\)"),
    (torch.randn(4, 6, 15), ValueError, r"failed on calibration batch 0 \(input \(4, 6, 15\)\)"),
], ids=["fp16", "uint8", "label-first", "wrong-width"])
def test_bad_first_calibration_batch_is_named(batch, error, message):
    model = Net().eval()
    before = _state(model)
    with pytest.raises(error, match=message):
        igq.quantize(model, igq.IGQConfig(**CFG), [batch], progress=False)
    assert _same(before, _state(model))


def test_mixed_sizes_are_refused_at_the_first_mismatching_batch():
    ran = []
    model = Net().eval()
    prepared = igq.prepare(model, igq.IGQConfig(**CFG))
    prepared.register_forward_pre_hook(lambda m, a: ran.append(tuple(a[0].shape)))
    batches = [torch.randn(2, 6, 16), torch.randn(2, 9, 16), torch.randn(2, 6, 16)]
    with pytest.raises(ValueError, match=r"batch 1 has per-instance shape \(9, 16\) but batch 0 has \(6, 16\)"):
        igq.calibrate(prepared, batches, progress=False)
    assert ran == [(2, 6, 16)]  # refused before running the mismatching batch


def test_wrong_rank_images_for_a_timm_model_name_the_shape():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3).eval()
    with pytest.raises(ValueError, match=r"failed on calibration batch 0 \(input \(2, 3, 48, 48\)\)"):
        igq.quantize(model, igq.IGQConfig(**CFG), [torch.randn(2, 3, 48, 48)], progress=False)


# --- no silent behaviour change ---------------------------------------------------------------------

class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_linear_subclass_with_its_own_forward_is_left_float_with_a_warning(caplog):
    model = Net().eval()
    model.fc1 = ScaledLinear(16, 32)
    x = torch.randn(2, 6, 16)
    with caplog.at_level("WARNING", logger="igq_plugin"):
        qmodel = igq.quantize(model, igq.IGQConfig(**CFG), _data(), progress=False)
    assert "ScaledLinear 'fc1' overrides forward: left in full precision" in caplog.text
    assert type(qmodel.fc1) is ScaledLinear and [s.consumer for s in igq.sites(qmodel)] == ["fc2"]
    with igq.modules.fake_quant_disabled(qmodel):
        assert torch.allclose(qmodel(x), model(x))  # the subclass's forward (x2) is still there


def test_a_module_under_two_names_is_quantized_once_and_used_everywhere():
    model = Net().eval()
    model.alias = model.fc2  # the same Linear reachable as fc2 and alias
    qmodel = igq.quantize(model, igq.IGQConfig(**CFG), _data(), progress=False)
    assert qmodel.alias is qmodel.fc2 and isinstance(qmodel.fc2, igq.QuantLinear)
    assert [s.consumer for s in igq.sites(qmodel)] == ["fc1", "fc2"]
    assert isinstance(model.alias, nn.Linear) and model.alias is model.fc2  # the user's model is untouched


def test_multihead_attention_projection_and_unknown_attention_warn_what_happens(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    with caplog.at_level("WARNING", logger="igq_plugin"):
        qmodel = igq.quantize(Block().eval(), igq.IGQConfig(**CFG), _data(), progress=False)
    assert "'attn.out_proj' belongs to nn.MultiheadAttention" in caplog.text
    assert "torch.nn.modules.activation.MultiheadAttention has no igq attention adapter" in caplog.text
    assert [s.consumer for s in igq.sites(qmodel)] == ["fc"]


class _NotATensor:
    pass


@pytest.mark.parametrize("case", ["unknown-model", "weights-dir", "weights-corrupt", "weights-unsafe-pickle",
                                  "weights-other-arch", "calib-missing", "calib-empty", "report-corrupt",
                                  "demo-bad-bits"])
def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, case):
    import pickle

    model = ["--model", "deit_tiny_patch16_224", "--num-classes", "3"]
    if case == "unknown-model":
        argv = ["quantize", "--model", "deit_tinny_patch16_224"]
        message = "unknown timm model 'deit_tinny_patch16_224'; similar names: deit"
    elif case == "weights-dir":
        argv, message = ["quantize", *model, "--weights", str(tmp_path)], "is a directory"
    elif case == "weights-corrupt":
        (tmp_path / "w.pt").write_bytes(b"garbage")
        argv, message = ["quantize", *model, "--weights", str(tmp_path / "w.pt")], "cannot read weights file"
    elif case == "weights-unsafe-pickle":
        (tmp_path / "w.pt").write_bytes(pickle.dumps(_NotATensor()))
        argv, message = ["quantize", *model, "--weights", str(tmp_path / "w.pt")], "loads tensors only"
    elif case == "weights-other-arch":
        import timm

        torch.save(timm.create_model("deit_small_patch16_224", num_classes=3).state_dict(), tmp_path / "w.pt")
        argv, message = ["quantize", *model, "--weights", str(tmp_path / "w.pt")], "does not fit timm model"
    elif case == "calib-missing":
        argv, message = ["quantize", *model, "--calib-dir", str(tmp_path / "none")], "does not exist"
    elif case == "calib-empty":
        argv, message = ["quantize", *model, "--calib-dir", str(tmp_path)], "no images"
    elif case == "report-corrupt":
        (tmp_path / "q.pt").write_bytes(b"")
        argv, message = ["report", str(tmp_path / "q.pt"), *model], "not a readable igq_plugin checkpoint"
    else:
        argv, message = ["demo", "--bits", "1"], "weight_bits must be in [2, 8]"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
