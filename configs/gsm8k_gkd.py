"""On-policy distillation (GKD) of FLAN-T5 on GSM8K (question -> worked solution "... #### 72").

The paper's setup (spec/gkd.md): a FLAN-T5-XL teacher fine-tuned on GSM8K and students that each
start from their own SFT checkpoint. Make those first with configs/gsm8k_sft.py, then distill:

  python -m jaxsi.train --config=configs/gsm8k_sft.py:t5_xl --workdir=gs://bucket/gsm8k_sft_xl
  python -m jaxsi.train --config=configs/gsm8k_sft.py:t5_small --workdir=gs://bucket/gsm8k_sft_s
  python -m jaxsi.train --config=configs/gsm8k_gkd.py:t5_small --workdir=gs://bucket/gsm8k_gkd_s \
      --config.teacher.source=gs://bucket/gsm8k_sft_xl --config.init_from=gs://bucket/gsm8k_sft_s

  python -m jaxsi.train --config=configs/gsm8k_gkd.py:tiny --workdir=runs/gsm8k_gkd_tiny  # CPU

`teacher.source` and `init_from` accept a jaxsi workdir or a Hugging Face checkpoint (directory
or hub id). Their defaults are the hub's FLAN-T5 checkpoints (google/flan-t5-xl and the
student's size), not fine-tuned on GSM8K: they only make the command runnable and must be
replaced by the SFT runs above to reproduce the paper. 
The full-size variants train no stage of their own by default (`pipeline.teacher_steps =
student_sft_steps = 0`); to let the pipeline fine-tune the teacher first, set
`teacher.source=""`, `pipeline.teacher_steps=N` and `pipeline.teacher_init_from=<hub FLAN-T5-XL>`.

Methods (spec/gkd.md) are overrides of the objective; the default is on-policy GKD (λ = 1) with
forward KL, the divergence the paper found best on GSM8K:

  --config.objective.divergence=jsd --config.objective.beta=0.5   on-policy GKD, JSD(0.5)
  --config.objective.divergence=reverse_kl                 on-policy GKD, reverse KL
  --config.objective.lam=0.5                               mixed data (dataset / student samples)
  --config.objective.preset=supervised_kd                  λ = 0, forward KL
  --config.objective.preset=seqkd                          NLL of teacher samples
  --config.objective.preset=imitkd                         λ = 0.5, forward KL
  --config.objective.preset=fdistill                       λ = 0.5, TVD
  --config.objective.reward=exact_match --config.objective.rl_alpha=0.5   GKD + RL

Variants: the student's size, t5_small (default), t5_base, t5_large; and tiny.

Settings: 40K steps, batch 32, Adafactor at LR 3e-4, input 512 tokens (cut on the left, keeping
the question), output 320 (also the student's sample length), dropout 0, as the spec lists for
GSM8K (marked uncertain there); the spec gives no warmup for GSM8K, so it is XSum's 2K. The
prompts are gsm8k_sft.py's (question only, `data.num_shots = 0`), so teacher and students
distill on the prompts they were fine-tuned on; the paper's 4-shot chain-of-thought prompts are
`--config.data.num_shots=4` (use the same value for the SFT runs). Eval: final-answer accuracy
on the 1319 test problems, greedy; checkpoints are ranked by it.

The `tiny` variant runs offline on CPU in about a minute: on `tfds.testing.mock_data` with the
char tokenizer, the pipeline trains a tiny T5 teacher (WORKDIR/teacher) and a tinier student's
SFT start (WORKDIR/student_sft) for a few steps each, then distills for a few steps.
"""

import os

import ml_collections

from jaxsi import gkd_config

VARIANTS = gkd_config.T5_VARIANTS
_TEACHER = "google/flan-t5-xl"
_STUDENTS = {"t5_small": "google/flan-t5-small", "t5_base": "google/flan-t5-base",
             "t5_large": "google/flan-t5-large"}
_SFT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gsm8k_sft.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return gkd_config.t5_distillation(
      _SFT_FILE, arg, teacher_id=_TEACHER, student_ids=_STUDENTS,
      divergence="forward_kl", steps=40_000, warmup_steps=2_000,
      temperatures=(0.0,), best_metric="eval/accuracy",
      train_overrides={"eval_every": 5_000, "checkpoint_every": 2_000})
