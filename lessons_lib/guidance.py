"""Conditioning at sampling time: classifier-free guidance with the null class or a negative class.

Classifier-free guidance (Ho & Salimans 2022, eq. 6) mixes a conditional and an unconditional
prediction, ``uncond + w (cond - uncond)``. The "unconditional" branch is the learned null class
(label ``num_classes``); a negative class puts another label there, so the sample is pushed toward
the wanted class *and away from* the negative one.
"""

from __future__ import annotations

import torch


def uncond_labels(class_labels: torch.Tensor, null_label: int | torch.Tensor) -> torch.Tensor:
    """Labels of the unconditional branch: one int for all samples (the null class) or one per sample."""
    if isinstance(null_label, torch.Tensor):
        if null_label.shape != class_labels.shape:
            raise ValueError(f"negative/null labels must have shape {tuple(class_labels.shape)}, got {tuple(null_label.shape)}")
        return null_label.to(class_labels.device)
    return torch.full_like(class_labels, int(null_label))


def guided_output(model, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
                  guidance_scale: float = 1.0, null_label: int | torch.Tensor | None = None) -> torch.Tensor:
    """The model output at (x, t), guided with scale w when ``class_labels`` are given and w != 1.

    Both branches run as one batch of 2B. ``null_label`` defaults to the model's null class
    (``model.config.num_classes``); pass a class (or one per sample) for negative guidance.
    """
    if class_labels is None or guidance_scale == 1.0:
        return model(x, t, class_labels)
    if null_label is None:
        null_label = model.config.num_classes  # the learned null class of lessons_lib.unet.UNet
    labels = torch.cat([class_labels, uncond_labels(class_labels, null_label)])
    cond, uncond = model(torch.cat([x, x]), t.repeat(2), labels).chunk(2)
    return uncond + guidance_scale * (cond - uncond)  # eq. 6
