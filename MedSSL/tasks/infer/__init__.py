"""Applying fine-tuned bundles: loading, memory-bounded sliding-window inference, post-processing,
detections (connected components with LPS positions), and slice suggestions for annotation."""
