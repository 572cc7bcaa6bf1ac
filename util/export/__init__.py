"""The backbone of any checkpoint: read it (export.py, eval_knn.py), write it for other tools, score it frozen."""
