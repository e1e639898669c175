"""Evaluation: FID (torchmetrics) in the feature space of a per-dataset classifier.

Importing this package registers the "classifier" feature net in
``vargen.registry.FEATURE_NETS``.
"""

from vargen.eval.feature_net import (
    FORMAT_VERSION,
    FeatureNet,
    FeatureNetConfig,
    build_feature_net,
    classify_accuracy,
    feature_net_path,
    get_feature_net,
    load_feature_net,
    train_feature_net,
)
from vargen.eval.fid import FIDEvaluator, compute_fid

__all__ = [
    "FORMAT_VERSION",
    "FIDEvaluator",
    "FeatureNet",
    "FeatureNetConfig",
    "build_feature_net",
    "classify_accuracy",
    "compute_fid",
    "feature_net_path",
    "get_feature_net",
    "load_feature_net",
    "train_feature_net",
]
