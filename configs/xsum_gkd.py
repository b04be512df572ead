"""On-policy distillation (GKD) of T5 v1.1 on XSum: a T5-XL teacher, T5-small/base/large students.

The paper's setup (spec/gkd.md): the teacher is T5-XL fine-tuned on XSum and each student starts
from its own XSum SFT checkpoint. Make those first with configs/xsum_sft.py, then distill:

  python -m jaxsi.train --config=configs/xsum_sft.py:t5_xl --workdir=gs://bucket/xsum_sft_xl
  python -m jaxsi.train --config=configs/xsum_sft.py:t5_small --workdir=gs://bucket/xsum_sft_s
  python -m jaxsi.train --config=configs/xsum_gkd.py:t5_small --workdir=gs://bucket/xsum_gkd_s \
      --config.teacher.source=gs://bucket/xsum_sft_xl --config.init_from=gs://bucket/xsum_sft_s

  python -m jaxsi.train --config=configs/xsum_gkd.py:tiny --workdir=runs/xsum_gkd_tiny  # CPU

`teacher.source` and `init_from` accept a jaxsi workdir or a Hugging Face checkpoint (directory
or hub id). Their defaults are the *pretrained* hub checkpoints (google/t5-v1_1-xl and the
student's size), which have never seen XSum: they only make the command runnable and must be
replaced by the SFT runs above to reproduce the paper. The full-size variants train no stage of their own by default (`pipeline.teacher_steps =
student_sft_steps = 0`); to let the pipeline fine-tune the teacher first, set
`teacher.source=""`, `pipeline.teacher_steps=N` and `pipeline.teacher_init_from=<hub T5-XL>`.

Methods (spec/gkd.md) are overrides of the objective; the default is on-policy GKD (λ = 1) with
JSD(0.9), the paper's best divergence for XSum under temperature-1 sampling:

  --config.objective.divergence=reverse_kl                 on-policy GKD, reverse KL
  --config.objective.beta=0.1                              on-policy GKD, JSD(0.1)
  --config.objective.lam=0.5                               mixed data (dataset / student samples)
  --config.objective.lam=0                                 supervised data with the divergence
  --config.objective.preset=supervised_kd                  λ = 0, forward KL
  --config.objective.preset=seqkd                          NLL of teacher samples
  --config.objective.preset=imitkd                         λ = 0.5, forward KL
  --config.objective.preset=fdistill                       λ = 0.5, TVD
  --config.objective.reward=rouge2 --config.objective.rl_alpha=0.5   GKD + RL (ROUGE-2 reward)

Variants: the student's size, t5_small (default), t5_base, t5_large; and tiny.

Paper settings: 40K steps, batch 32, Adafactor at LR 3e-4 after 2K linear warmup (then
constant), input 1024 tokens, output 64 (also the student's sample length), dropout 0. Eval:
ROUGE on the first 1000 validation articles, greedy and sampled at temperature 1
(`eval/rouge2` and `eval/rouge2_t1`); checkpoints are ranked by greedy ROUGE-2. Everything but
the teacher, the objective and the eval temperatures comes from the student's xsum_sft.py
variant, so the student distills on the data and tokenizer it was fine-tuned on.

The `tiny` variant runs offline on CPU in about a minute: on `tfds.testing.mock_data` with the
char tokenizer, the pipeline trains a tiny T5 teacher (WORKDIR/teacher) and a tinier student's
SFT start (WORKDIR/student_sft) for a few steps each, then distills for a few steps.
"""

import os

import ml_collections

from jaxsi import gkd_config

VARIANTS = gkd_config.T5_VARIANTS
_TEACHER = "google/t5-v1_1-xl"
_STUDENTS = {"t5_small": "google/t5-v1_1-small", "t5_base": "google/t5-v1_1-base",
             "t5_large": "google/t5-v1_1-large"}
_SFT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xsum_sft.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return gkd_config.t5_distillation(
      _SFT_FILE, arg, teacher_id=_TEACHER, student_ids=_STUDENTS,
      divergence="jsd", beta=0.9, steps=40_000, warmup_steps=2_000,
      temperatures=(0.0, 1.0), best_metric="eval/rouge2")
