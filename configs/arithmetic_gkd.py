"""On-policy distillation (GKD) on the synthetic arithmetic task: the offline main job.

  python -m jaxsi.train --config=configs/arithmetic_gkd.py --workdir=runs/gkd

With no teacher given (`teacher.source` empty) the run first trains the teacher by SFT into
WORKDIR/teacher, then the student's SFT start into WORKDIR/student_sft, then distills the
student in WORKDIR; rerunning reuses finished stages. Give trained models instead with
--config.teacher.source=RUN_OR_HF_DIR and --config.init_from=RUN_OR_HF_DIR.

Methods (spec/gkd.md) are presets or overrides of the objective:
  --config.objective.preset=sft | supervised_kd | seqkd | imitkd | fdistill | on_policy
  --config.objective.lam=0.5 --config.objective.divergence=reverse_kl --config.objective.beta=0.1

Variants: "" (GPT-2-style decoders), "t5" (T5 encoder-decoders), "tiny" (seconds; tests).
"""

import ml_collections

from jaxsi import config as config_lib
from jaxsi.data import tasks
from jaxsi.models import decoder
from jaxsi.models import t5
from jaxsi.objectives import gkd

VARIANTS = ("", "t5", "tiny")


def _decoder(width: int, layers: int, heads: int) -> ml_collections.ConfigDict:
  model = decoder.default_config("gpt2")
  model.update(vocab_size=128, d_model=width, num_layers=layers, num_heads=heads,
               num_kv_heads=heads, head_dim=width // heads, d_ff=4 * width, max_len=64)
  model.fence_residual_grads = True  # a CPU demo: faster backward (jaxsi/models/grad_fence.py)
  return model


def _t5(width: int, layers: int, heads: int) -> ml_collections.ConfigDict:
  model = t5.default_config("v1_1")
  model.update(vocab_size=128, d_model=width, num_layers=layers, num_decoder_layers=layers,
               num_heads=heads, head_dim=width // heads, d_ff=2 * width)
  model.fence_residual_grads = True  # a CPU demo: faster backward (jaxsi/models/grad_fence.py)
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of arithmetic_gkd.py; choose from {VARIANTS[1:]}.")
  data = tasks.default_data_config()
  data.digits = 1
  family = _t5 if variant == "t5" else _decoder
  student = family(64, 2, 4)
  config = config_lib.base_config(model=student, data=data)

  config.teacher = ml_collections.ConfigDict()
  config.teacher.source = ""          # a jaxsi workdir or HF checkpoint; empty: train one
  config.teacher.model = family(128, 4, 4)
  config.pipeline = ml_collections.ConfigDict({
      "teacher_steps": 2000,
      "student_sft_steps": 250,
      "sft_lr": 1e-3,
      "teacher_init_from": "",     # start the teacher's SFT from a checkpoint instead of scratch
      "student_init_from": "",
  })

  config.objective = gkd.default_objective_config()
  config.objective.divergence = "jsd"
  config.objective.beta = 0.5
  config.objective.lam = 1.0          # on-policy

  steps = ml_collections.FieldReference(500)
  config.train.steps = steps
  config.train.batch_size = 64
  config.train.log_every = 50
  config.train.eval_every = 250
  config.train.checkpoint_every = 250
  config.optim.name = "adamw"
  config.optim.lr = 3e-4
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 20
  config.optim.total_steps = steps
  config.optim.end_lr_fraction = 0.1
  config.optim.grad_clip_norm = 1.0
  config.eval.num_examples = 200
  config.eval.batch_size = 200
  config.eval.max_new_tokens = data.max_response_len

  if variant == "tiny":
    config.model = family(32, 1, 2)
    config.teacher.model = family(32, 1, 2)
    config.pipeline.teacher_steps = 3
    config.pipeline.student_sft_steps = 3
    steps.set(4)
    config.train.batch_size = 16
    config.train.log_every = 2
    config.train.eval_every = 0
    config.train.checkpoint_every = 2
    config.optim.warmup_steps = 1
    config.eval.num_examples = 16
    config.eval.batch_size = 16
  return config
