"""On-policy distillation (GKD) of T5 v1.1 on WMT14 English -> German translation.

The paper's setup (spec/gkd.md): the teacher is T5-XL fine-tuned on WMT en->de and each student
starts from its own SFT checkpoint. Make those first with configs/wmt_sft.py, then distill:

  python -m jaxsi.train --config=configs/wmt_sft.py:t5_xl --workdir=gs://bucket/wmt_sft_xl
  python -m jaxsi.train --config=configs/wmt_sft.py:t5_small --workdir=gs://bucket/wmt_sft_s
  python -m jaxsi.train --config=configs/wmt_gkd.py:t5_small --workdir=gs://bucket/wmt_gkd_s \
      --config.teacher.source=gs://bucket/wmt_sft_xl --config.init_from=gs://bucket/wmt_sft_s

  python -m jaxsi.train --config=configs/wmt_gkd.py:tiny --workdir=runs/wmt_gkd_tiny  # CPU

`teacher.source` and `init_from` accept a jaxsi workdir or a Hugging Face checkpoint (directory
or hub id). Their defaults are the *pretrained* hub checkpoints (google/t5-v1_1-xl and the
student's size), which were never trained to translate: they only make the command runnable
and must be replaced by the SFT runs above to reproduce the paper. 
The full-size variants train no stage of their own by default (`pipeline.teacher_steps =
student_sft_steps = 0`); to let the pipeline fine-tune the teacher first, set
`teacher.source=""`, `pipeline.teacher_steps=N` and `pipeline.teacher_init_from=<hub T5-XL>`.

Methods (spec/gkd.md) are overrides of the objective; the default is on-policy GKD (λ = 1) with
JSD(0.1), the divergence the paper found best on WMT:

  --config.objective.divergence=forward_kl                 on-policy GKD, forward KL
  --config.objective.divergence=reverse_kl                 on-policy GKD, reverse KL
  --config.objective.lam=0.5                               mixed data (dataset / student samples)
  --config.objective.lam=0                                 supervised data with the divergence
  --config.objective.preset=supervised_kd                  λ = 0, forward KL
  --config.objective.preset=seqkd                          NLL of teacher samples
  --config.objective.preset=imitkd                         λ = 0.5, forward KL
  --config.objective.preset=fdistill                       λ = 0.5, TVD

Variants: the student's size, t5_small (default), t5_base, t5_large; and tiny.

Paper settings (marked uncertain in the spec): 100K steps, batch 32, Adafactor at LR 3e-4 after
5K linear warmup (then constant), input and output 80 tokens, dropout 0. Eval: BLEU (sacrebleu)
on the 3000 validation sentences, decoded greedily where the paper used beam search
(`--config.eval.temperatures='(0.0, 1.0)'` adds temperature-1 samples); checkpoints are ranked
by BLEU. Everything but the teacher and the objective comes from the student's wmt_sft.py
variant (including its note on preparing the dataset as array_record).

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
_SFT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wmt_sft.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return gkd_config.t5_distillation(
      _SFT_FILE, arg, teacher_id=_TEACHER, student_ids=_STUDENTS,
      divergence="jsd", beta=0.1, steps=100_000, warmup_steps=5_000,
      temperatures=(0.0,), best_metric="eval/bleu")
