"""Adapters to model libraries, imported only when asked for.

``segformer`` -- Hugging Face ``transformers`` SegFormer (Xie et al., 2021), built from a
``SegformerConfig`` (random init: variants ``b0``..``b2`` or ``tiny``, plus any config field
as a keyword) or from a local checkpoint directory written by ``save_pretrained``
(``pretrained=DIR``; never downloads). ``forward`` returns logits ``[B, C, H/4, W/4]``.
Install with ``pip install "segreward[transformers]"``; it does not replace your torch.

segmentation-models-pytorch and timm are not wrapped: they hard-require torchvision, whose
PyPI build does not import beside a CPU-only torch and an unpinned install swaps torch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from segreward.errors import SegrewardError

EXTRA_HINT = 'pip install "segreward[transformers]"  (or: pip install "torch==$(python -c \'import torch;print(torch.__version__.split(\"+\")[0])\')" transformers)'

# Encoder sizes of the SegFormer paper (MiT-B0/B1/B2) and a tiny one for tests and CPUs.
SEGFORMER_VARIANTS = {
    "tiny": dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 1, 2, 4],
                 decoder_hidden_size=64),
    "b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=256),
    "b1": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=256),
    "b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
               decoder_hidden_size=768),
}


def _import_transformers():
    try:
        import transformers  # noqa: F401
        from transformers import SegformerConfig, SegformerForSemanticSegmentation
    except ImportError as e:
        raise SegrewardError(f"model 'segformer' needs the optional extra 'transformers' ({e}); install it with: "
                             f"{EXTRA_HINT}") from None
    return SegformerConfig, SegformerForSemanticSegmentation


class SegFormer(nn.Module):
    """``transformers.SegformerForSemanticSegmentation`` returning plain logits ``[B, C, H/4, W/4]``."""

    output_stride = 4
    classifier_name = "model.decode_head.classifier"

    def __init__(self, num_classes: int, variant: str = "b0", pretrained: str | None = None, **config):
        super().__init__()
        SegformerConfig, SegformerForSemanticSegmentation = _import_transformers()
        self.num_classes = num_classes
        if pretrained is not None:
            path = Path(pretrained)
            if not (path / "config.json").is_file():
                raise SegrewardError(f"{path}: not a local transformers checkpoint directory (no config.json); "
                                     "give a folder written by save_pretrained (hub names are not downloaded)")
            try:
                self.model = SegformerForSemanticSegmentation.from_pretrained(
                    str(path), num_labels=num_classes, ignore_mismatched_sizes=True, local_files_only=True, **config)
            except (OSError, ValueError, TypeError) as e:
                raise SegrewardError(f"{path}: cannot load the SegFormer checkpoint ({e})") from None
            return
        if variant not in SEGFORMER_VARIANTS:
            raise SegrewardError(f"segformer: unknown variant {variant!r}; known: {', '.join(SEGFORMER_VARIANTS)}")
        fields = set(SegformerConfig().to_dict())
        bad = sorted(set(config) - fields)
        if bad:
            raise SegrewardError(f"segformer: unknown option(s) {', '.join(bad)}; valid: variant, pretrained, or "
                                 f"SegformerConfig fields such as {', '.join(sorted(SEGFORMER_VARIANTS['b0']))}")
        kw = {**SEGFORMER_VARIANTS[variant], **config}
        try:
            cfg = SegformerConfig(num_labels=num_classes, **kw)
        except (TypeError, ValueError) as e:
            raise SegrewardError(f"segformer: bad config {config} ({e})") from None
        self.model = SegformerForSemanticSegmentation(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits
