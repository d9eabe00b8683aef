"""Direct preference optimisation: losses, reward metrics, and the reference-model log-probs."""
