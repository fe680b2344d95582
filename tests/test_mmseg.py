"""The MMSegmentation plug-in: a tiny EncoderDecoder trained, logged and resumed by mmengine.

Skipped without the ``mmseg`` extra (``pip install 'segreward[mmseg]'``). The model is built from
a config *file* that is ``configs/mmseg/segreward_reinforce.py`` -- the snippet the README and
docs/mmseg.md show -- on top of a tiny base config written here; the data are generated here in
mmseg's folder layout.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mmseg")
pytest.importorskip("mmengine")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "configs" / "mmseg" / "segreward_reinforce.py"
NUM_CLASSES = 4
SIZE = 32
TRAIN_ITERS = 3


def _write_data(root: Path) -> None:
    """Blocky 4-class scenes (class = quadrant, colour-coded, noisy) in mmseg's layout."""
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])
    for split, n in (("train", 6), ("val", 2)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(n):
            label = np.zeros((SIZE, SIZE), np.uint8)
            cut_r, cut_c = rng.integers(8, SIZE - 8, 2)
            label[:cut_r, cut_c:] = 1
            label[cut_r:, :cut_c] = 2
            label[cut_r:, cut_c:] = 3
            image = np.clip(colours[label] + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            label[:2] = 255  # an ignored strip
            Image.fromarray(image).save(root / "img_dir" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "ann_dir" / split / f"{i:03d}.png")


def _base_config(data_root: Path) -> dict:
    """A tiny CE-trained model config, standing in for the user's own config."""
    norm_cfg = dict(type="BN", requires_grad=True)
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    dataset = dict(type="BaseSegDataset", data_root=str(data_root), img_suffix=".png", seg_map_suffix=".png",
                   metainfo=dict(classes=("a", "b", "c", "d")), pipeline=pipeline)

    def split(name):
        return dict(dataset, data_prefix=dict(img_path=f"img_dir/{name}", seg_map_path=f"ann_dir/{name}"))

    return dict(
        default_scope="mmseg",
        model=dict(
            type="EncoderDecoder",
            data_preprocessor=dict(type="SegDataPreProcessor", mean=[127.5] * 3, std=[64.0] * 3, bgr_to_rgb=True,
                                   size=(SIZE, SIZE), pad_val=0, seg_pad_val=255),
            backbone=dict(type="ResNetV1c", depth=18, stem_channels=8, base_channels=8, out_indices=(3,),
                          strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), norm_cfg=norm_cfg),
            decode_head=dict(type="FCNHead", in_channels=64, in_index=0, channels=16, num_convs=1,
                             concat_input=False, num_classes=NUM_CLASSES, norm_cfg=norm_cfg, align_corners=False,
                             loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
            train_cfg=dict(), test_cfg=dict(mode="whole")),
        train_dataloader=dict(batch_size=2, num_workers=0, sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=split("train")),
        val_dataloader=dict(batch_size=1, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
                            dataset=split("val")),
        val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        param_scheduler=[dict(type="PolyLR", power=0.9, eta_min=1e-4, by_epoch=False, begin=0, end=1000)],
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=1000, val_interval=1000),
        val_cfg=dict(type="ValLoop"),
        default_hooks=dict(timer=dict(type="IterTimerHook"),
                           logger=dict(type="LoggerHook", interval=1, log_metric_by_epoch=False),
                           param_scheduler=dict(type="ParamSchedulerHook"),
                           checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=1000)),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork"), dist_cfg=dict(backend="gloo")),
        visualizer=dict(type="SegLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
        log_processor=dict(by_epoch=False),
        log_level="WARNING",
        load_from=None,
        resume=False,
        randomness=dict(seed=0),
    )


def _build_model(cfg):
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(cfg)


def _snippet_config(folder: Path, data_root: Path):
    """The README snippet, loaded as a config file on top of a tiny ``my_model_config.py``."""
    from mmengine.config import Config

    Config(_base_config(data_root)).dump(str(folder / "my_model_config.py"))
    shutil.copy(SNIPPET, folder / SNIPPET.name)
    return Config.fromfile(str(folder / SNIPPET.name))


def _short_run(cfg, work_dir: Path, max_iters: int):
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.visualizer.name = f"visualizer_{uuid.uuid4().hex}"  # one Visualizer instance per run
    return cfg


def _scalars(work_dir: Path) -> list[dict]:
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    assert files, f"no vis_data/scalars.json under {work_dir}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Tune the tiny model for a few iterations from a saved initial checkpoint."""
    from mmengine.runner import Runner

    tmp = tmp_path_factory.mktemp("mmseg")
    data_root = tmp / "data"
    _write_data(data_root)
    cfg = _snippet_config(tmp, data_root)
    assert "segreward.mmseg" in cfg.custom_imports["imports"]
    # The snippet's `load_from` points at the user's CE checkpoint: here, a saved initial model.
    torch.manual_seed(0)
    model = _build_model(cfg.model)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": init, "meta": {}}, tmp / "init.pth")
    cfg.load_from = str(tmp / "init.pth")
    # An untrained policy is near-uniform, so REINFORCE gradients are tiny: a large step keeps
    # the update above float32 rounding in a 3-iteration run.
    cfg.optim_wrapper.optimizer.lr = 1.0
    work_dir = tmp / "work"
    runner = Runner.from_cfg(_short_run(cfg, work_dir, TRAIN_ITERS))
    runner.train()
    trained = {k: v.detach().cpu().clone() for k, v in runner.model.state_dict().items()}
    return dict(tmp=tmp, data_root=data_root, work_dir=work_dir, init=init, trained=trained, runner=runner)


def test_snippet_builds_reinforce_loss(first_run):
    from segreward.mmseg import ReinforceLoss

    loss = first_run["runner"].model.decode_head.loss_decode
    assert isinstance(loss, ReinforceLoss)
    assert loss.num_classes == NUM_CLASSES and loss.loss_name == "loss_reinforce"


def test_training_changes_parameters_and_logs(first_run):
    init, trained = first_run["init"], first_run["trained"]
    changed = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert "decode_head.conv_seg.weight" in changed
    assert any(k.startswith("backbone.") and k.endswith("conv1.weight") for k in changed)

    lines = _scalars(first_run["work_dir"])
    train = [r for r in lines if "decode.loss_reinforce" in r]
    assert [r["step"] for r in train] == list(range(1, TRAIN_ITERS + 1))
    for r in train:
        assert math.isfinite(r["decode.loss_reinforce"]) and math.isfinite(r["loss"])
        # Diagnostics are logged under names without "loss" ...
        assert 0.0 <= r["reinforce.reward_mean"] <= 1.0
        assert r["reinforce.reward_std"] >= 0.0 and r["reinforce.entropy"] >= 0.0
        # ... so mmengine's total is the REINFORCE loss alone.
        assert r["loss"] == pytest.approx(r["decode.loss_reinforce"], rel=1e-6, abs=1e-9)
    val = [r for r in lines if "mIoU" in r]
    assert len(val) == 1 and val[0]["step"] == TRAIN_ITERS
    assert (first_run["work_dir"] / f"iter_{TRAIN_ITERS}.pth").is_file()


def test_segreward_logs_reads_the_run(first_run):
    from segreward.runlog import load_run

    run = load_run(first_run["work_dir"])
    assert {"decode.loss_reinforce", "reinforce.reward_mean"} <= set(run.loss.columns)
    assert list(run.loss["step"]) == list(range(1, TRAIN_ITERS + 1))
    assert "mIoU" in run.metric_names and list(run.metrics["step"]) == [TRAIN_ITERS]


def test_resume_from_saved_checkpoint(first_run, tmp_path):
    from mmengine.runner import Runner

    cfg = _snippet_config(tmp_path, first_run["data_root"])
    cfg.load_from = str(first_run["work_dir"] / f"iter_{TRAIN_ITERS}.pth")
    cfg.resume = True
    runner = Runner.from_cfg(_short_run(cfg, tmp_path / "work", TRAIN_ITERS + 2))
    runner.train()
    assert runner.iter == TRAIN_ITERS + 2
    steps = [r["step"] for r in _scalars(tmp_path / "work") if "decode.loss_reinforce" in r]
    assert steps == [TRAIN_ITERS + 1, TRAIN_ITERS + 2]  # continued, not restarted


def _tiny_model(num_classes_in_loss: int, **loss_kw):
    import segreward.mmseg  # noqa: F401

    cfg = _base_config(Path("unused"))["model"]
    cfg["decode_head"]["loss_decode"] = dict(type="ReinforceLoss", num_classes=num_classes_in_loss, **loss_kw)
    return _build_model(cfg)


def _batch(n: int = 2):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, NUM_CLASSES, (1, SIZE, SIZE)))
        samples.append(s)
    return torch.randn(n, 3, SIZE, SIZE), samples


def test_mismatched_num_classes_is_a_clear_error():
    from segreward.errors import SegrewardError

    model = _tiny_model(NUM_CLASSES + 3)
    inputs, samples = _batch()
    with pytest.raises(SegrewardError, match=rf"num_classes={NUM_CLASSES + 3}.*set num_classes={NUM_CLASSES}"):
        model(inputs, samples, mode="loss")


def test_mismatched_ignore_index_is_a_clear_error():
    from segreward.errors import SegrewardError

    model = _tiny_model(NUM_CLASSES, ignore_index=0)
    inputs, samples = _batch()
    with pytest.raises(SegrewardError, match=r"set ignore_index=255"):
        model(inputs, samples, mode="loss")


def test_loss_name_rules():
    from mmseg.registry import MODELS

    from segreward.errors import SegrewardError

    with pytest.raises(SegrewardError, match="must start with 'loss_'"):
        MODELS.build(dict(type="ReinforceLoss", num_classes=3, loss_name="reinforce"))
    with pytest.raises(SegrewardError, match="must not contain 'loss'"):
        MODELS.build(dict(type="ReinforceLoss", num_classes=3, loss_name="loss_myloss"))
    rwce = MODELS.build(dict(type="RewardWeightedCELoss", num_classes=3, loss_name="loss_rwce_aux"))
    assert rwce.loss_name == "loss_rwce_aux" and rwce.log_prefix == "rwce_aux"


def test_rwce_loss_in_a_decode_head_backpropagates():
    from mmengine.logging import MessageHub

    model = _tiny_model(NUM_CLASSES)
    model.decode_head.loss_decode = torch.nn.ModuleList([
        model.decode_head.loss_decode,
        _build_model(dict(type="RewardWeightedCELoss", num_classes=NUM_CLASSES, loss_weight=0.5))])
    model.train()
    inputs, samples = _batch()
    losses = model(inputs, samples, mode="loss")
    assert {"decode.loss_reinforce", "decode.loss_rwce"} <= set(losses)
    total, _ = model.parse_losses(losses)
    total.backward()
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0
    assert "train/rwce.weight_std" in MessageHub.get_current_instance().log_scalars


def test_local_estimator_batch_scope_in_a_decode_head():
    from mmengine.logging import MessageHub

    model = _tiny_model(NUM_CLASSES)
    model.decode_head.loss_decode = _build_model(dict(
        type="ReinforceLoss", num_classes=NUM_CLASSES, estimator="local", scope="running", momentum=0.9,
        ce_weight=0.5, loss_name="loss_local"))
    model.train()
    inputs, samples = _batch()
    losses = model(inputs, samples, mode="loss")
    total, _ = model.parse_losses(losses)
    total.backward()
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0
    scalars = MessageHub.get_current_instance().log_scalars
    assert {"train/local.credit_abs", "train/local.credit_label_pos", "train/local.reward_mean"} <= set(scalars)
    # the running counts are a buffer of the model, so mmengine's checkpoints carry them
    state = model.state_dict()
    assert float(state["decode_head.loss_decode.running_counts"].sum()) > 0


def test_missing_extra_is_a_clear_error(monkeypatch):
    from segreward.errors import SegrewardError

    for name in [m for m in sys.modules if m == "segreward.mmseg" or m.startswith("segreward.mmseg.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mmseg", None)  # what `import mmseg` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'segreward\[mmseg\]'") as info:
        import segreward.mmseg  # noqa: F401
    assert isinstance(info.value, SegrewardError)


def test_camvid_void_becomes_ignore(tmp_path):
    from mmseg.registry import DATASETS

    import segreward.mmseg  # noqa: F401
    from segreward.data.meta import get_meta

    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    raw = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE) % 12  # ids 0..11, 11 = void
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "train" / "0001TP_006690.png")
    Image.fromarray(raw).save(tmp_path / "trainannot" / "0001TP_006690.png")
    ds = DATASETS.build(dict(type="CamVidDataset", data_root=str(tmp_path),
                             data_prefix=dict(img_path="train", seg_map_path="trainannot"),
                             pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]))
    meta = get_meta("camvid")
    assert list(ds.metainfo["classes"]) == list(meta.classes)
    assert [tuple(c) for c in ds.metainfo["palette"]] == [tuple(c) for c in meta.palette]
    seg = ds[0]["gt_seg_map"]
    np.testing.assert_array_equal(seg, np.where(raw == 11, 255, raw))
    # A class subset remaps the kept ids and still ignores void.
    sub = DATASETS.build(dict(type="CamVidDataset", data_root=str(tmp_path), metainfo=dict(classes=("Road", "Car")),
                              data_prefix=dict(img_path="train", seg_map_path="trainannot"),
                              pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")]))
    expected = np.full_like(raw, 255)
    expected[raw == 3], expected[raw == 8] = 0, 1
    np.testing.assert_array_equal(sub[0]["gt_seg_map"], expected)


def test_synthetic_dataset_registered():
    synthetic = pytest.importorskip("segreward.data.synthetic")
    from mmseg.registry import DATASETS

    import segreward.mmseg  # noqa: F401

    cls = DATASETS.get("SyntheticShiftDataset")
    assert cls is not None and tuple(cls.METAINFO["classes"]) == tuple(synthetic.CLASSES)


@pytest.mark.parametrize("doc", ["README.md", "docs/mmseg.md"])
def test_docs_show_the_tested_snippet(doc):
    text = (ROOT / doc).read_text()
    assert "Use with MMSegmentation" in text
    assert SNIPPET.read_text() in text, (
        f"{doc} must show {SNIPPET.relative_to(ROOT)} verbatim (inside a ```python block), "
        "so the snippet users copy is the one this file trains with")


def test_cpu_example_follows_the_readme_recipe():
    """configs/mmseg/synthetic_dusk_reinforce.py: the local estimator of the batch's mIoU with a CE
    anchor (as the README's snippet), built by mmseg's registry; its loss is not zero."""
    from mmengine.config import Config

    import segreward.mmseg  # noqa: F401
    cfg = Config.fromfile(str(ROOT / "configs" / "mmseg" / "synthetic_dusk_reinforce.py"))
    spec = cfg.model.decode_head.loss_decode
    assert (spec.type, spec.estimator, spec.scope, spec.reward) == ("ReinforceLoss", "local", "batch", "miou")
    assert spec.ce_weight > 0 and "k" not in spec
    cfg.model.decode_head.num_classes = spec.num_classes = NUM_CLASSES
    cfg.model.data_preprocessor.size = (SIZE, SIZE)
    model = _build_model(cfg.model)
    model.train()
    inputs, samples = _batch()
    total, _ = model.parse_losses(model(inputs, samples, mode="loss"))
    assert torch.isfinite(total) and abs(float(total.detach())) > 1e-3
    total.backward()
    assert model.decode_head.conv_seg.weight.grad.abs().sum() > 0
