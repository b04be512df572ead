"""A `LanguageModel` that forwards every call to a real model; tests subclass it to observe
or bend one method (count traced `prefill` calls, bias the logits, ...).

Imported by test modules as `from delegating_lm import DelegatingLM` (pytest puts tests/ on
sys.path). `hidden`/`head` are not forwarded: a subclass that changes the logits would
otherwise disagree with them.
"""

from jaxsi.models.lm import LanguageModel


class DelegatingLM(LanguageModel):
  """Forwards init, abstract_params, param_axes, logits, prefill and decode_step to `lm`."""

  def __init__(self, lm):
    self.lm, self.config, self.vocab_size = lm, lm.config, lm.vocab_size

  def init(self, rng):
    return self.lm.init(rng)

  def abstract_params(self):
    return self.lm.abstract_params()

  def param_axes(self):
    return self.lm.param_axes()

  def logits(self, params, batch, *, dropout_rng=None):
    return self.lm.logits(params, batch, dropout_rng=dropout_rng)

  def prefill(self, params, prompt, prompt_mask, max_new_tokens):
    return self.lm.prefill(params, prompt, prompt_mask, max_new_tokens)

  def decode_step(self, params, cache, token, slot, position, visible):
    return self.lm.decode_step(params, cache, token, slot, position, visible)
