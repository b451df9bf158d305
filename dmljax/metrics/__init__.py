"""Evaluation metrics: retrieval (one exact kNN pass), clustering (k-means), embedding geometry."""
from dmljax.metrics.retrieval import metrics_from_relevance, retrieval_metrics

__all__ = ["retrieval_metrics", "metrics_from_relevance"]
