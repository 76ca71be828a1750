"""The named variants of the one schema (`vlrep.config`): sizes, recipes and model families.

`SIZES` (named model and data sizes) and `RECIPES` (the demo and paper training recipes) are
tables; `coca(variant)` applies a size and its recipe to `config.defaults()`, and
`RECIPE@SIZE` (e.g. `base@tiny`) trains SIZE with RECIPE's recipe. The other families are
CoCa with parts switched: `clip`, `siglip`, `lit` (CLIP with a locked image side), `filip`
(CLIP with token-wise similarity), `cap` and `cappa` (captioning only); `finetune` starts a
run from another's weights to classify or to caption. The files in `configs/` call these.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from vlrep.config import defaults, set_fields
from vlrep.data import synthetic
from vlrep.evals import entries


@dataclasses.dataclass(frozen=True)
class Size:
  """A variant's model and data sizes; width and heads are shared by both towers."""
  image_size: int
  patch_size: int
  width: int
  heads: int
  vision_layers: int
  vision_mlp: int
  unimodal_layers: int
  multimodal_layers: int
  text_mlp: int
  vocab_size: int
  captioning_queries: int
  max_text_len: int
  stem_channels: tuple[int, ...]
  recipe: str  # its training recipe, a key of RECIPES

  def fields(self) -> dict[str, Any]:
    return {'data.image_size': self.image_size, 'data.max_text_len': self.max_text_len,
            'model.vision.patch_size': self.patch_size, 'model.vision.width': self.width,
            'model.vision.heads': self.heads, 'model.vision.layers': self.vision_layers,
            'model.vision.mlp_dim': self.vision_mlp,
            'model.vision.stem_channels': self.stem_channels,
            'model.text.vocab_size': self.vocab_size, 'model.text.width': self.width,
            'model.text.heads': self.heads, 'model.text.unimodal_layers': self.unimodal_layers,
            'model.text.multimodal_layers': self.multimodal_layers,
            'model.text.mlp_dim': self.text_mlp, 'model.embed_dim': self.width,
            'model.captioning_queries': self.captioning_queries}


# `tiny` is the CPU demo on the embedded synthetic data set. `small` is the CPU benchmark
# (`python -m vlrep.bench`): CoCa's proportions at CPU scale, the image encoder holding most
# of the FLOPs and a realistic 32k vocabulary, so that its LM head (~11% of the step's FLOPs,
# `vlrep.tools.flops`) is not what is measured. `base`, `large`, `giant`: the paper's Table 1.
SIZES = {
    'tiny': Size(image_size=64, patch_size=8, width=128, heads=4, vision_layers=4,
                 vision_mlp=512, unimodal_layers=2, multimodal_layers=1, text_mlp=512,
                 vocab_size=259, captioning_queries=16, max_text_len=64,
                 stem_channels=(24, 48, 96), recipe='demo'),
    'small': Size(image_size=128, patch_size=8, width=256, heads=4, vision_layers=8,
                  vision_mlp=1024, unimodal_layers=3, multimodal_layers=3, text_mlp=1024,
                  vocab_size=32_000, captioning_queries=64, max_text_len=32,
                  stem_channels=(), recipe='demo'),
    'base': Size(image_size=288, patch_size=18, width=768, heads=12, vision_layers=12,
                 vision_mlp=3072, unimodal_layers=12, multimodal_layers=12, text_mlp=3072,
                 vocab_size=64_000, captioning_queries=256, max_text_len=64,
                 stem_channels=(), recipe='paper'),
    'large': Size(image_size=288, patch_size=18, width=1024, heads=16, vision_layers=24,
                  vision_mlp=4096, unimodal_layers=12, multimodal_layers=12, text_mlp=4096,
                  vocab_size=64_000, captioning_queries=256, max_text_len=64,
                  stem_channels=(), recipe='paper'),
    'giant': Size(image_size=288, patch_size=18, width=1408, heads=16, vision_layers=40,
                  vision_mlp=6144, unimodal_layers=18, multimodal_layers=18, text_mlp=5632,
                  vocab_size=64_000, captioning_queries=256, max_text_len=64,
                  stem_channels=(), recipe='paper'),
}

# Training recipes by field path: 'demo' is `defaults()` itself; 'paper' is CoCa's
# pretraining recipe (batch 65,536, 500k steps, Adafactor, lr 8e-4, 2% warmup then linear
# decay, bfloat16 compute) evaluated on the TFDS benchmarks, laid out for a pod: parameters
# sharded 128 ways (`mesh.fsdp`; 128 divides the three widths, 768 / 1024 / 1408, where 256
# would not divide giant's), the rest of the devices on `data` (so at least 128 devices:
# smaller runs set mesh.fsdp), layers scanned and rematerialised 'minimal'. Compiled for
# the paper's 2,048 TPU v4 chips and other pods by `vlrep.plan` (README "Pod planning").
RECIPES: dict[str, dict[str, Any]] = {
    'demo': {},
    'paper': {'batch_size': 65_536, 'total_steps': 500_000, 'checkpoint_every_steps': 5_000,
              'eval_every_steps': 10_000, 'evals': entries.benchmark_evals,
              'model.dtype': 'bfloat16', 'optim.name': 'adafactor',
              'optim.learning_rate': 8e-4, 'optim.warmup_steps': 10_000,
              'optim.decay': 'linear', 'optim.weight_decay': 0.01, 'optim.b2': 0.999,
              'mesh.data': -1, 'mesh.fsdp': 128, 'model.remat': 'minimal',
              'model.scan_layers': True},
}


def _size(name: str) -> ml_collections.ConfigDict:
  if name not in SIZES:
    raise ValueError(f'Unknown coca variant {name!r}; known: {sorted(SIZES)} '
                     'or RECIPE@SIZE (e.g. base@tiny)')
  c = defaults()
  set_fields(c, SIZES[name].fields())
  set_fields(c, RECIPES[SIZES[name].recipe])
  c.unlock()
  c.lock()  # again, for the entries set above (evals): lock() skips a locked config
  return c


def coca(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """`configs/coca.py:VARIANT`: a size of SIZES, or RECIPE@SIZE (SIZE's model, data, batch and
  length trained with RECIPE's optimizer and schedule shape, warmup as the same fraction of
  the steps, weight decay, loss weights and dtypes)."""
  recipe_name, _, size = variant.partition('@')
  if not size:
    return _size(variant)
  c, recipe = _size(size), _size(recipe_name)
  warmup_fraction = recipe.optim.warmup_steps / recipe.total_steps
  c.optim = recipe.optim
  c.optim.warmup_steps = round(warmup_fraction * c.total_steps)
  c.loss.update(contrastive_weight=recipe.loss.contrastive_weight,
                caption_weight=recipe.loss.caption_weight)
  c.model.update(dtype=recipe.model.dtype, param_dtype=recipe.model.param_dtype)
  return c


def clip(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """CoCa's VARIANT with no multimodal layers and caption weight 0; the contrastive pooler
  reads the image tokens directly, as there is no captioning pooler."""
  c = coca(variant)
  set_fields(c, {'model.text.multimodal_layers': 0, 'model.pooler': 'parallel',
           'loss.caption_weight': 0.0})
  return c


# LiT's locked image side (Zhai et al. 2022): the tower with its pooler and projection, as
# big_vision locks 'img/.*', head included.
LIT_IMAGE_SIDE = ('image_encoder/.*', 'contrastive_pooler/.*', 'image_projection/.*')


def lit(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """CLIP's VARIANT whose image side (LIT_IMAGE_SIDE) is taken from `init_from` (a CLIP run or
  export of the same variant, which the run must be given) and frozen; the text side and the
  temperature train from scratch."""
  c = clip(variant)
  c.optim.freeze = LIT_IMAGE_SIDE
  c.init_from_include = LIT_IMAGE_SIDE
  return c


# The evaluation types a captioning-only model can run: zero-shot and retrieval need a text
# embedding, which it has none of.
CAPTIONER_EVALS = ('captioning', 'linear_probe')


def cap(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """Cap (Tschannen et al. 2023): CoCa's VARIANT trained on captioning alone, with no contrastive
  parts; its decoder is as deep as CoCa's whole text decoder, every layer cross-attending to
  the image (the paper's decoder). Evaluated by captioning and linear probes."""
  c = coca(variant)
  text = c.model.text
  set_fields(c, {'model.contrastive': False, 'loss.contrastive_weight': 0.0,
                 'loss.caption_weight': 1.0, 'model.text.unimodal_layers': 0,
                 'model.text.multimodal_layers': text.unimodal_layers + text.multimodal_layers})
  c.evals = ml_collections.ConfigDict({name: entry for name, entry in c.evals.items()
                                       if entry.type in CAPTIONER_EVALS})
  c.unlock()
  c.lock()
  return c


def cappa(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """CapPa: Cap with parallel prediction for 75% of each batch's rows (the paper's fraction)."""
  c = cap(variant)
  c.loss.parallel_fraction = 0.75
  return c


def siglip(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """CLIP's VARIANT with the sigmoid contrastive loss (and its learned bias)."""
  c = clip(variant)
  c.loss.contrastive_type = 'sigmoid'
  return c


def filip(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """FILIP (Yao et al. 2021): CLIP's VARIANT compared token by token (late interaction over
  patch and text-token embeddings, `vlrep.late_interaction`). No pooler: the patches are
  the image side, and the mean patch embedding its vector (`encode_image`, probes)."""
  c = clip(variant)
  set_fields(c, {'model.pooler': 'none', 'model.image_pool': 'avg',
                 'loss.contrastive_similarity': 'token'})
  return c


# The text side of a CoCa, which classifying images never reads; and the parameters that
# serve the contrastive loss alone, which a captioning fine-tune (contrastive weight 0) never
# reads. Frozen, so that weight decay does not wear them away while they get no gradient.
TEXT_SIDE = ('text_decoder/.*', 'text_projection/.*', 'logit_scale')
CONTRASTIVE_ONLY = ('contrastive_pooler/.*', 'image_projection/.*', 'text_projection/.*',
                    'logit_scale', 'text_decoder/cls_embed', 'text_decoder/ln_cls/.*')
FINETUNE_KINDS = ('classification', 'caption')


def finetune(arg: str = 'classification') -> ml_collections.ConfigDict:
  """`configs/finetune.py:KIND[@VARIANT]`: CoCa's VARIANT (default tiny) fine-tuned from
  `init_from` through the one train loop.

  KIND 'classification': a classification head (`model.classifier_pool`, here on the image
  embedding) trained with cross-entropy on `data.label_key` (the synthetic set's shapes,
  multi-hot) at 10x the rate, with layer-wise rate decay over the image tower, the text side
  frozen; evaluated by the head's top-1 on held-out examples. KIND 'caption': the captioner alone
  (contrastive weight 0, the contrastive-only parameters frozen), evaluated by CIDEr and
  the fraction of distinct captions on held-out images; `data.train` / `data.eval` name
  the data (COCO-format captions ingested with `vlrep.data.ingest`, or the synthetic set).
  """
  kind, _, variant = arg.partition('@')
  if kind not in FINETUNE_KINDS:
    raise ValueError(f'Unknown fine-tuning {kind!r}; known: {FINETUNE_KINDS} (KIND[@VARIANT])')
  c = coca(variant or 'tiny')
  set_fields(c, {'total_steps': 300, 'checkpoint_every_steps': 300, 'eval_every_steps': 300,
                 'log_every_steps': 50, 'optim.warmup_steps': 30})
  evals = ml_collections.ConfigDict()
  if kind == 'classification':
    set_fields(c, {'loss.kind': 'classification',
                   'model.num_classes': len(synthetic.SHAPES),
                   'data.label_key': 'labels/shape', 'init_from_exclude': ('classifier/.*',),
                   'optim.freeze': TEXT_SIDE, 'optim.layer_decay': 0.75,
                   # The head reads a unit vector: at 10x the rate its logits can grow to a
                   # confident scale within a short run.
                   'optim.lr_multipliers': ('classifier/.*=10',)})
    evals.classification_shape = entries.entry('classification', label_key='labels/shape')
  else:
    set_fields(c, {'loss.contrastive_weight': 0.0, 'loss.caption_weight': 1.0,
                   'optim.freeze': CONTRASTIVE_ONLY, 'optim.learning_rate': 5e-4})
    evals.captioning = entries.entry('captioning', num_examples=250, methods=('greedy',))
  c.evals = evals
  c.unlock()
  c.lock()
  return c
