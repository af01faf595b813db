"""The frozen encoder judged: its features, kNN (frozen) and the L-BFGS logistic regression with
its preprocessing and penalty chosen by cross-validation (linear_probe)."""
