"""Evaluation metrics: retrieval (one exact kNN pass), clustering (k-means), embedding geometry.

* :func:`retrieval_metrics`: P@1, R-precision, MAP@R, Recall@k, Precision@k, nDCG@k, MAP@k
  (the MPA paper's, divided by k) and MAP@k divided by min(k, R) (``retrieval.py``).
* :func:`clustering_metrics`: NMI and pairwise F1 of k-means clusters (``clustering.py``).
* :mod:`dmljax.metrics.geometry`: class and proxy covering radii (``geometry.py``).
"""
from dmljax.metrics import geometry
from dmljax.metrics.clustering import clustering_metrics, nmi, pairwise_f1
from dmljax.metrics.geometry import class_covering_radius, proxy_covering_radius
from dmljax.metrics.retrieval import metrics_from_relevance, retrieval_metrics

__all__ = ["retrieval_metrics", "metrics_from_relevance", "clustering_metrics", "nmi",
           "pairwise_f1", "class_covering_radius", "proxy_covering_radius", "geometry"]
