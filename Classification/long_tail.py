"""Long-tail baselines in the classifier's harness, picked by --sampler and --loss.

- sampler "class-balanced" (re-sampling): an image is drawn with probability proportional
  to 1 / (training count of its class), so every class is equally likely in a batch.
- loss "balanced-softmax" (Ren et al., NeurIPS 2020, a logit adjustment): cross-entropy on
  logits + log(class prior of the training set); the plain logits used at test time then
  estimate a class-balanced posterior.
Both use the counts of the set actually trained on (generated images included).
"""
import numpy as np
import torch
import torch.nn.functional as F

from tgn.engine import cross_entropy_loss, logits_of


def class_counts(labels, num_classes):
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def class_balanced_weights(labels, num_classes):
    """Per-sample weights for tgn.sampling.EpochSampler: 1 / count of the sample's class."""
    counts = class_counts(labels, num_classes)
    return torch.as_tensor(1.0 / counts[np.asarray(labels, dtype=np.int64)], dtype=torch.double)


def balanced_softmax_loss(counts):
    """A loss_fn(model, images, labels) -> (loss, logits) adding log priors to the logits."""
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float32).clamp(min=1)  # no log(0) for an empty class
    log_prior = torch.log(counts / counts.sum())

    def loss_fn(model, images, labels):
        logits = logits_of(model(images))
        adjusted = logits.float() + log_prior.to(logits.device)
        return F.cross_entropy(adjusted, labels), logits

    return loss_fn


def make_loss(name, labels, num_classes):
    if name == "balanced-softmax":
        return balanced_softmax_loss(class_counts(labels, num_classes))
    return cross_entropy_loss


def make_sampler_weights(name, labels, num_classes):
    """None means the engine's plain shuffling."""
    return class_balanced_weights(labels, num_classes) if name == "class-balanced" else None
