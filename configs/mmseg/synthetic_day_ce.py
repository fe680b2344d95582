# Stage 1 of the CPU example: train a small model with cross-entropy on the synthetic *day*
# domain (the source). Stage 2 (synthetic_dusk_reinforce.py) reward-tunes it on *dusk*.
#
# From the repository root:
#   python -c "from segreward.data.synthetic import write_mmseg_layout as w; \
#              w('data/synthetic/day', 'day', seed=0); w('data/synthetic/dusk', 'dusk', seed=1)"
#   python -m segreward.mmseg.train configs/mmseg/synthetic_day_ce.py
# Expected: 600 iterations of 8 images of 64x128 took 15 minutes on 2 busy CPU cores (load ~8;
# ~0.4 s/iteration when idle); day validation mIoU 51.3. work_dirs/synthetic_day_ce/iter_600.pth
# is the checkpoint stage 2 starts from.
custom_imports = dict(imports=['segreward.mmseg'], allow_failed_imports=False)
default_scope = 'mmseg'

num_classes = 8  # segreward.data.synthetic.CLASSES
crop_size = (64, 128)
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True, size=crop_size, pad_val=0, seg_pad_val=255),
    # A thin ResNet-18 (16..128 channels, output stride 16): ~0.9M parameters, fast on a CPU.
    backbone=dict(
        type='ResNetV1c', depth=18, stem_channels=16, base_channels=16, num_stages=4,
        out_indices=(3, ), strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), norm_cfg=norm_cfg,
        contract_dilation=True),
    decode_head=dict(
        type='FCNHead', in_channels=128, in_index=0, channels=64, num_convs=2, concat_input=True,
        dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

dataset_type = 'SyntheticShiftDataset'  # registered by segreward.mmseg
data_root = 'data/synthetic/day'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=2, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root,
                 data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=5e-4))
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=600, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=600, val_interval=300)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=300, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
