"""jaxsi T5 against transformers' PyTorch T5ForConditionalGeneration: import, export, logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from transformers.models.t5 import modeling_t5

from jaxsi import models
from jaxsi.models import hf_t5
from jaxsi.models import t5

VOCAB = 64


def hf_model(variant, seed=0):
  """A tiny random HF T5; v1.0 ties the head to the embedding, v1.1 has its own head."""
  torch.manual_seed(seed)
  hf_config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
      dropout_rate=0.0, feed_forward_proj="relu" if variant == "v1_0" else "gated-gelu",
      tie_word_embeddings=variant == "v1_0", decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" in name:  # initialized to ones; make them matter
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
    if variant == "v1_1":
      model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(VOCAB, 32))
  return model


def random_inputs(seed):
  """Left-padded prompts and right-padded responses, long enough to reach the log buckets."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(2, VOCAB, (3, 12)).astype(np.int64)
  prompt_mask = np.ones_like(prompt)
  prompt_mask[1, :4] = 0
  prompt_mask[2, :9] = 0
  prompt[prompt_mask == 0] = 0
  response = rng.integers(2, VOCAB, (3, 10)).astype(np.int64)
  response[1, 6:] = 0
  return prompt, prompt_mask, response


def hf_logits(model, prompt, prompt_mask, response):
  decoder_input_ids = np.concatenate([np.zeros((len(response), 1), np.int64), response[:, :-1]], 1)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(prompt), attention_mask=torch.from_numpy(prompt_mask),
                decoder_input_ids=torch.from_numpy(decoder_input_ids))
  return out.logits.numpy()


def jaxsi_logits(lm, params, prompt, prompt_mask, response):
  batch = dict(prompt=jnp.asarray(prompt, jnp.int32), prompt_mask=jnp.asarray(prompt_mask),
               response=jnp.asarray(response, jnp.int32),
               response_mask=jnp.asarray(response > 0, jnp.int32))
  return np.asarray(jax.jit(lm.logits)(params, batch))


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_imported_checkpoint_matches_pytorch(variant, tmp_path):
  model = hf_model(variant)
  model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors").exists()
  lm, params = models.from_pretrained(str(tmp_path))
  assert isinstance(lm, t5.T5LM)
  assert lm.config.variant == variant
  assert lm.config.tie_embeddings == (variant == "v1_0")
  assert (lm.config.num_layers, lm.config.num_decoder_layers) == (2, 3)
  inputs = random_inputs(1)
  expected = hf_logits(model, *inputs)
  got = jaxsi_logits(lm, params, *inputs)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 0.5  # not trivially small


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_exported_jaxsi_params_load_in_transformers(variant, tmp_path):
  config = t5.default_config(variant)
  config.update(dict(vocab_size=VOCAB, d_model=32, num_layers=3, num_decoder_layers=2,
                     num_heads=4, head_dim=8, d_ff=48, relative_attention_num_buckets=8,
                     relative_attention_max_distance=16, dropout_rate=0.0))
  lm = t5.T5LM(config)
  params = jax.tree.map(np.asarray, lm.init(jax.random.key(1)))
  tensors = hf_t5.params_to_hf(params, config)
  assert {"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} <= set(
      tensors)
  assert ("lm_head.weight" in tensors) == (variant == "v1_1")
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(hf_t5.hf_config_from(config)))

  model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  reference = {name: value.numpy() for name, value in model.state_dict().items()}
  for name, value in tensors.items():
    np.testing.assert_array_equal(reference[name], value, err_msg=name)
  inputs = random_inputs(2)
  np.testing.assert_allclose(jaxsi_logits(lm, params, *inputs), hf_logits(model.eval(), *inputs),
                             atol=1e-4, rtol=0)

  # And back: the import inverts the export exactly.
  again = hf_t5.params_from_hf(tensors, hf_t5.config_from_hf(hf_t5.hf_config_from(config)))
  jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize("num_buckets,max_distance", [(8, 16), (32, 128), (32, 64), (64, 256),
                                                      (16, 20), (128, 512)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, bidirectional):
  relative = np.arange(-1100, 1100)
  expected = modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  got = t5.relative_position_buckets(jnp.asarray(relative), bidirectional=bidirectional,
                                     num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_config_from_hf_reads_ties_old_and_new():
  base = dict(model_type="t5", vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
              num_heads=4, feed_forward_proj="gated-gelu")
  # Before transformers 5: tie_word_embeddings alone; num_decoder_layers defaults to num_layers.
  old = hf_t5.config_from_hf(dict(base, tie_word_embeddings=False))
  assert not old.tie_embeddings and old.num_decoder_layers == 2 and old.variant == "v1_1"
  assert hf_t5.config_from_hf(dict(base, feed_forward_proj="relu")).tie_embeddings
  # transformers 5 writes tie_word_embeddings=true for untied models and keeps the truth in
  # scale_decoder_outputs.
  new = hf_t5.config_from_hf(dict(base, tie_word_embeddings=True, scale_decoder_outputs=False))
  assert not new.tie_embeddings
  with pytest.raises(ValueError, match="gated-silu"):
    hf_t5.config_from_hf(dict(base, feed_forward_proj="gated-silu"))
  with pytest.raises(ValueError, match="mt5"):
    hf_t5.config_from_hf(dict(base, model_type="mt5"))


def test_params_from_hf_names_what_is_wrong():
  config = hf_t5.config_from_hf(dict(model_type="t5", vocab_size=VOCAB, d_model=16, d_kv=4,
                                     d_ff=32, num_layers=1, num_heads=4,
                                     feed_forward_proj="relu"))
  tensors = hf_t5.params_to_hf(jax.tree.map(np.asarray, t5.T5LM(config).init(jax.random.key(0))),
                               config)
  missing = dict(tensors)
  del missing["decoder.final_layer_norm.weight"]
  with pytest.raises(KeyError, match="decoder.final_layer_norm.weight"):
    hf_t5.params_from_hf(missing, config)
  extra = dict(tensors, **{"encoder.block.1.layer.0.layer_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(ValueError, match="encoder.block.1"):
    hf_t5.params_from_hf(extra, config)
  wrong = dict(tensors, **{"encoder.final_layer_norm.weight": np.ones(17, np.float32)})
  with pytest.raises(ValueError, match="final_norm"):
    hf_t5.params_from_hf(wrong, config)
