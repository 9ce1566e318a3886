"""VideoCrafter2's parameter-perturbation study (its Table 3) as a runnable experiment: `latentcrafter perturb`.

Two base models, F (a joint image+video phase, `trainable: all`) and P (a `trainable: temporal` phase), are
fine-tuned on one image set with the same seeds and data order, per variant
{F, P} x {Spa, Temp} x {LoRA, DIR} plus F-Spa&Temp-DIR (9 variants; the study config's `variants:` picks a
subset), and evaluated at fixed steps on fixed prompts and seeds: visual quality (CLIPSIM, aesthetic when
configured) and motion quality (motion, static ratio, CLIP-Temp, warp error = flicker). See
trainer/perturb/run.py for how a variant is trained and evaluated, trainer/perturb/report.py for the outputs.
"""

from trainer.perturb.config import VARIANTS, StudyConfig, load_study_config

__all__ = ["VARIANTS", "StudyConfig", "load_study_config"]
