"""Data: readers, the synthetic task, CODI tokenization into fixed shapes, the grain pipeline."""
