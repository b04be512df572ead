"""Tests for jaxsi.models.vocab.grow_vocab: new token rows in the embedding and the head."""

import jax
import numpy as np
import pytest

from jaxsi.models import build, decoder, from_pretrained, t5, to_pretrained, vocab

VOCAB = 40
B, S, T = 2, 4, 5


def tiny_config(kind):
  if kind == "t5_v1_0":
    cfg = t5.default_config("v1_0")
  elif kind == "t5":
    cfg = t5.preset("t5_tiny")
  else:
    cfg = decoder.default_config(kind)
  if kind.startswith("t5"):
    cfg.update(vocab_size=VOCAB, d_model=32, num_layers=1, num_decoder_layers=1, num_heads=2,
               head_dim=8, d_ff=32, dropout_rate=0.0, relative_attention_num_buckets=8,
               relative_attention_max_distance=16)
  else:
    cfg.update(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
               head_dim=8, d_ff=32, max_len=16)
  return cfg


# (embedding path, head path and its vocab axis) per model; None = tied to the embedding.
LAYOUT = {
    "gpt2": (("embed", "embedding"), None),
    "llama": (("embed", "embedding"), (("lm_head", "kernel"), 1)),
    "t5": (("token_embedder", "embedding"), (("logits_dense",), 1)),
    "t5_v1_0": (("token_embedder", "embedding"), None),
}


def get(params, path):
  for key in path:
    params = params[key]
  return np.asarray(params)


def random_batch(seed, vocab_size):
  rng = np.random.default_rng(seed)
  return dict(prompt=rng.integers(0, vocab_size, (B, S)).astype(np.int32),
              prompt_mask=np.ones((B, S), np.int32),
              response=rng.integers(0, vocab_size, (B, T)).astype(np.int32),
              response_mask=np.ones((B, T), np.int32))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "t5_v1_0"])
def test_grow_adds_a_mean_row_and_keeps_old_logits(kind):
  lm = build(tiny_config(kind))
  params = lm.init(jax.random.key(0))
  new_lm, new_params = vocab.grow_vocab(lm, params)
  assert new_lm.vocab_size == VOCAB + 1 and new_lm.config.vocab_size == VOCAB + 1
  assert new_lm.config.num_real_tokens is None and lm.config.vocab_size == VOCAB
  assert vocab.real_vocab_size(new_lm) == VOCAB + 1
  embed_path, head = LAYOUT[kind]
  old_embed, new_embed = get(params, embed_path), get(new_params, embed_path)
  assert new_embed.shape == (VOCAB + 1, old_embed.shape[1])
  np.testing.assert_array_equal(new_embed[:VOCAB], old_embed)
  np.testing.assert_allclose(new_embed[VOCAB], old_embed.mean(0), rtol=1e-6, atol=1e-7)
  if head is not None:
    path, axis = head
    old_head, new_head = get(params, path), get(new_params, path)
    assert new_head.shape[axis] == VOCAB + 1
    np.testing.assert_array_equal(np.take(new_head, np.arange(VOCAB), axis), old_head)
    np.testing.assert_allclose(np.take(new_head, VOCAB, axis), old_head.mean(axis), rtol=1e-6,
                               atol=1e-7)
  # The new tree has the new model's shapes.
  expected_shapes = jax.tree.map(lambda x: x.shape, new_lm.abstract_params())
  assert jax.tree.map(np.shape, new_params) == expected_shapes
  batch = random_batch(1, VOCAB)
  old_logits = np.asarray(jax.jit(lm.logits)(params, batch))
  new_logits_fn = jax.jit(new_lm.logits)
  new_logits = np.asarray(new_logits_fn(new_params, batch))
  assert new_logits.shape == (B, T, VOCAB + 1)
  np.testing.assert_allclose(new_logits[..., :VOCAB], old_logits, atol=1e-5, rtol=0)
  # The new token is usable as an input.
  batch["response"][:, 1] = VOCAB
  assert np.isfinite(np.asarray(new_logits_fn(new_params, batch))).all()


def test_zeros_init_and_several_rows():
  lm = build(tiny_config("llama"))
  params = lm.init(jax.random.key(0))
  new_lm, new_params = vocab.grow_vocab(lm, params, num_new=3, init="zeros")
  assert new_lm.vocab_size == VOCAB + 3
  np.testing.assert_array_equal(new_params["embed"]["embedding"][VOCAB:], 0.0)
  np.testing.assert_array_equal(new_params["lm_head"]["kernel"][:, VOCAB:], 0.0)


def test_padded_head_from_pretrained(tmp_path):
  # A checkpoint with 38 real tokens, padded to 40 on import: two padding rows.
  cfg = tiny_config("llama")
  cfg.vocab_size = 38
  lm = build(cfg)
  params = lm.init(jax.random.key(3))
  to_pretrained(lm, params, str(tmp_path))
  padded_lm, padded = from_pretrained(str(tmp_path), pad_vocab_multiple=20)
  assert padded_lm.vocab_size == 40 and padded_lm.config.num_real_tokens == 38
  assert isinstance(padded["embed"]["embedding"], np.ndarray)

  # Room in the padding: the new token takes id 38, the width stays 40, id 39 stays padding.
  grown_lm, grown = vocab.grow_vocab(padded_lm, padded)
  assert grown_lm.vocab_size == 40 and grown_lm.config.num_real_tokens == 39
  assert isinstance(grown["embed"]["embedding"], np.ndarray)  # host params stay on the host
  embed = grown["embed"]["embedding"]
  np.testing.assert_allclose(embed[38], padded["embed"]["embedding"][:38].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(embed[39], 0.0)
  np.testing.assert_allclose(grown["lm_head"]["kernel"][:, 38],
                             padded["lm_head"]["kernel"][:, :38].mean(1), rtol=1e-6)
  batch = random_batch(2, 38)
  before = np.asarray(jax.jit(padded_lm.logits)(padded, batch))
  after = np.asarray(jax.jit(grown_lm.logits)(grown, batch))
  np.testing.assert_allclose(after[..., :38], before[..., :38], atol=1e-5, rtol=0)

  # No room left: padding dropped, every row real.
  full_lm, full = vocab.grow_vocab(grown_lm, grown, num_new=2)
  assert full_lm.vocab_size == 41 and full_lm.config.num_real_tokens is None
  np.testing.assert_array_equal(full["embed"]["embedding"][:39], embed[:39])
  np.testing.assert_allclose(full["embed"]["embedding"][39:], np.stack([embed[:39].mean(0)] * 2),
                             rtol=1e-6)
  after = np.asarray(jax.jit(full_lm.logits)(full, batch))
  np.testing.assert_allclose(after[..., :38], before[..., :38], atol=1e-5, rtol=0)

  # Exactly filling the padding makes every row real without changing the width.
  exact_lm, _ = vocab.grow_vocab(padded_lm, padded, num_new=2)
  assert exact_lm.vocab_size == 40 and exact_lm.config.num_real_tokens is None


def test_bad_arguments():
  lm = build(tiny_config("gpt2"))
  params = lm.init(jax.random.key(0))
  with pytest.raises(ValueError, match="num_new=0"):
    vocab.grow_vocab(lm, params, num_new=0)
  with pytest.raises(ValueError, match="init='normal'"):
    vocab.grow_vocab(lm, params, init="normal")
