"""Model families behind one `LanguageModel` interface, and Hugging Face import/export.

  lm = jaxsi.models.build(config.model)                   # from a ConfigDict
  lm, params = jaxsi.models.from_pretrained("gpt2")         # from a Hugging Face checkpoint
  jaxsi.models.to_pretrained(lm, params, "out_dir")         # back to Hugging Face files
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxsi.models.lm import LanguageModel

FAMILIES = ("decoder", "t5")


def build(model_config: ml_collections.ConfigDict) -> LanguageModel:
  """Builds the `LanguageModel` named by `model_config.family` ("decoder" or "t5")."""
  family = model_config.get("family") if hasattr(model_config, "get") else None
  if family == "decoder":
    from jaxsi.models.decoder import DecoderLM  # pylint: disable=g-import-not-at-top
    return DecoderLM(model_config)
  if family == "t5":
    from jaxsi.models.t5 import T5LM  # pylint: disable=g-import-not-at-top
    return T5LM(model_config)
  raise ValueError(f"Unknown model family {family!r}; accepted: {list(FAMILIES)}.")


def from_pretrained(name_or_path: str, **overrides: Any) -> tuple[LanguageModel, Any]:
  """Loads a Hugging Face checkpoint; see `jaxsi.models.hf.from_pretrained`."""
  from jaxsi.models import hf  # pylint: disable=g-import-not-at-top
  return hf.from_pretrained(name_or_path, **overrides)


def to_pretrained(lm: LanguageModel, params: Any, out_dir: str) -> None:
  """Writes a Hugging Face checkpoint; see `jaxsi.models.hf.to_pretrained`."""
  from jaxsi.models import hf  # pylint: disable=g-import-not-at-top
  return hf.to_pretrained(lm, params, out_dir)
