"""Test setup: 8 fake CPU devices, float32 matmuls, quiet TensorFlow.

Must run before jax initializes its backends, which is why it sets the flags at import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (after the flags)

jax.config.update("jax_default_matmul_precision", "highest")
