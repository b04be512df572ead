"""jaxsi: post-training language models (GKD, SequenceMatch, Sharpening) in JAX/Flax."""
