"""Data: sources, deduplication and splits, partitioners, tokenized client datasets."""
