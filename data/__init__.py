"""The one, framework-neutral input pipeline: discovery, decoding, augmentation, batches."""
