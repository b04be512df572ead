"""`LanguageModel.hidden` + `head` reproduce `logits` for every family (the chunked losses rely on it).

The reference is the model's own fused logits path (`logits`), which the HF-parity tests in
test_hf_decoder.py / test_hf_t5.py tie to PyTorch transformers.
"""

import jax
import numpy as np
import pytest

from jaxsi.models import build, decoder, t5

VOCAB = 64


def _model(family, variant):
  if family == "decoder":
    config = decoder.default_config(variant)
    config.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, head_dim=8,
                  num_kv_heads=4 if variant == "gpt2" else 2, d_ff=64, max_len=32)
  else:
    config = t5.default_config(variant)
    config.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                  head_dim=8, d_ff=64, dropout_rate=0.0)
  lm = build(config)
  params = lm.init(jax.random.key(0))
  rng = np.random.default_rng(0)  # perturb every leaf so biases and norm scales matter
  params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), params)
  return lm, params


@pytest.mark.parametrize("family,variant", [("decoder", "gpt2"), ("decoder", "llama"),
                                            ("t5", "v1_0"), ("t5", "v1_1")])
def test_head_of_hidden_equals_logits(family, variant):
  lm, params = _model(family, variant)
  width = lm.config.d_model
  rng = np.random.default_rng(1)
  prompt_mask = np.arange(6)[None, :] >= np.array([[0], [2], [5]])
  batch = dict(prompt=rng.integers(1, VOCAB, (3, 6)).astype(np.int32), prompt_mask=prompt_mask,
               response=rng.integers(1, VOCAB, (3, 7)).astype(np.int32))
  logits_BxTxV = np.asarray(jax.jit(lm.logits)(params, batch))
  hidden_BxTxE = jax.jit(lm.hidden)(params, batch)
  b, t = batch["response"].shape
  assert hidden_BxTxE.shape == (b, t, width)
  np.testing.assert_array_equal(np.asarray(jax.jit(lm.head)(params, hidden_BxTxE)), logits_BxTxV)
  # The head works on any leading shape, e.g. one slice of positions as a chunked loss uses it.
  part = np.asarray(jax.jit(lm.head)(params, hidden_BxTxE[:, 2:5]))
  np.testing.assert_allclose(part, logits_BxTxV[:, 2:5], rtol=1e-6, atol=1e-6)
  assert np.std(logits_BxTxV) > 0.01  # real logits, not a degenerate model
