"""Data: dataset files (IDX, CIFAR batches) found, checked and decoded once (datasets), per-task input
transforms on the device (transforms), and export to plain torch and Avalanche (export)."""
