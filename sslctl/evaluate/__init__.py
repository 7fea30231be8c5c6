"""Evaluation of frozen features: weighted kNN (knn.py, docs/spec/protocols.md E1) and linear probes
(linear.py, E2/E3). Both read the features file that `sslctl embed` writes (features.py)."""
