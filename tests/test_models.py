import sys

import pytest
import torch
import torch.nn.functional as F

from segreward.errors import SegrewardError
from segreward.models import build_model, count_parameters, load_model, load_weights, save_weights


def _unet_params(width: int, num_classes: int) -> int:
    """Parameter count of the U-Net written out by hand: 3x3 convs without bias + GroupNorm."""
    def block(cin, cout):
        return 9 * cin * cout + 9 * cout * cout + 2 * 2 * cout
    c = [width, 2 * width, 4 * width, 8 * width]
    enc = block(3, c[0]) + block(c[0], c[1]) + block(c[1], c[2]) + block(c[2], c[3])
    dec = block(c[3] + c[2], c[2]) + block(c[2] + c[1], c[1]) + block(c[1] + c[0], c[0])
    return enc + dec + c[0] * num_classes + num_classes


@pytest.mark.parametrize("width", [16, 24])
def test_unet_shapes_and_parameter_count(width):
    torch.manual_seed(0)
    model = build_model("unet", 8, width=width)
    assert count_parameters(model) == _unet_params(width, 8)
    assert 4e5 < count_parameters(model) < 2e6
    assert model(torch.randn(2, 3, 64, 128)).shape == (2, 8, 64, 128)
    assert model(torch.randn(1, 3, 50, 70)).shape == (1, 8, 50, 70)  # sizes not divisible by 16


def test_unet_batchnorm_variant():
    model = build_model("unet", 3, width=8, norm="bn")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_optimisation_reduces_cross_entropy():
    torch.manual_seed(0)
    model = build_model("unet", 4, width=8, dropout=0.0)
    # piecewise-constant images (8x8 blocks); the class is given by the signs of two channels
    x = torch.randn(4, 3, 4, 6).repeat_interleave(8, 2).repeat_interleave(8, 3)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert "classifier.weight" in changed and "stem.0.0.weight" in changed


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_save_load_roundtrip(tmp_path, suffix):
    torch.manual_seed(0)
    model = build_model("unet", 5, width=8).eval()
    x = torch.randn(1, 3, 32, 32)
    path = save_weights(model, tmp_path / f"w{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"w{suffix}"]  # no temp file left
    torch.manual_seed(1)
    other = build_model("unet", 5, width=8).eval()
    assert not torch.allclose(other(x), model(x))
    meta = load_weights(other, path)
    assert meta["model"] == "unet" and meta["num_classes"] == 5
    torch.testing.assert_close(other(x), model(x))
    rebuilt = load_model(path).eval()
    torch.testing.assert_close(rebuilt(x), model(x))


def test_plain_and_mmseg_style_checkpoints(tmp_path):
    model = build_model("unet", 5, width=8).eval()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    mm = {"meta": {"dataset_meta": {"classes": ["a", "b", "c", "d", "e"]}, "mmengine_version": "0.10"},
          "state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []}}
    torch.save(mm, tmp_path / "iter_100.pth")
    for name in ("plain.pth", "iter_100.pth"):
        other = build_model("unet", 5, width=8).eval()
        load_weights(other, tmp_path / name)
        for k, v in other.state_dict().items():
            torch.testing.assert_close(v, sd[k])


def test_wrong_num_classes_is_a_clear_error(tmp_path):
    path = save_weights(build_model("unet", 5, width=8), tmp_path / "five.safetensors")
    with pytest.raises(SegrewardError) as e:
        load_weights(build_model("unet", 8, width=8), path)
    msg = str(e.value)
    assert "five.safetensors" in msg and "num_classes=5" in msg and "num_classes=8" in msg
    # non-strict: everything but the classifier is loaded
    model = build_model("unet", 8, width=8)
    info = load_weights(model, path, strict=False)
    assert info["missing"] == ["classifier.bias", "classifier.weight"]


def test_missing_and_unexpected_keys(tmp_path):
    sd = build_model("unet", 5, width=8).state_dict()
    sd.pop("up0.1.0.weight")
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(SegrewardError, match=r"bad\.pt.*1 missing keys.*up0\.1\.0\.weight.*1 unexpected keys.*extra"):
        load_weights(build_model("unet", 5, width=8), tmp_path / "bad.pt")
    torch.save(build_model("unet", 5, width=16).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(SegrewardError, match="other shapes"):
        load_weights(build_model("unet", 5, width=8), tmp_path / "wide.pt")


def test_unreadable_weight_files(tmp_path):
    with pytest.raises(SegrewardError, match="not found"):
        load_weights(build_model("unet", 5, width=8), tmp_path / "nope.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(SegrewardError, match="not a checkpoint.*Python objects"):
        load_weights(build_model("unet", 5, width=8), tmp_path / "module.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not really")
    with pytest.raises(SegrewardError, match="junk.safetensors"):
        load_weights(build_model("unet", 5, width=8), tmp_path / "junk.safetensors")


def test_unknown_model_and_option():
    with pytest.raises(SegrewardError, match="known: segformer, unet"):
        build_model("resnet", 3)
    with pytest.raises(SegrewardError, match="unknown option.*depth.*valid: width"):
        build_model("unet", 3, depth=5)


def test_segformer_missing_extra_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(SegrewardError, match=r"segreward\[transformers\]"):
        build_model("segformer", 3)


def test_segformer_adapter(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model("segformer", 6, variant="tiny").eval()
    x = torch.randn(2, 3, 64, 128)
    logits = model(x)
    assert logits.shape == (2, 6, 16, 32) and model.output_stride == 4
    # a few steps on a fixed batch lower the loss
    y = torch.randint(0, 6, (2, 64, 128))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(5):
        loss = F.cross_entropy(F.interpolate(model(x), size=y.shape[-2:], mode="bilinear"), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    model.eval()
    # our weights files, and the library's own key names (no adapter prefix)
    path = save_weights(model, tmp_path / "seg.safetensors")
    torch.testing.assert_close(load_model(path).eval()(x), model(x))
    torch.save(model.model.state_dict(), tmp_path / "hf_keys.pth")
    other = build_model("segformer", 6, variant="tiny").eval()
    load_weights(other, tmp_path / "hf_keys.pth")
    torch.testing.assert_close(other(x), model(x))
    # a local save_pretrained directory, no hub access
    model.model.save_pretrained(tmp_path / "hf")
    local = build_model("segformer", 6, pretrained=str(tmp_path / "hf")).eval()
    torch.testing.assert_close(local(x), model(x))
    with pytest.raises(SegrewardError, match="config.json"):
        build_model("segformer", 6, pretrained=str(tmp_path))
    with pytest.raises(SegrewardError, match="unknown option.*hiden_sizes"):
        build_model("segformer", 6, hiden_sizes=[8, 16, 32, 64])
