"""CoCa configs: `--config=configs/coca.py:VARIANT` with VARIANT in tiny|small|base|large|giant.

`tiny` is the CPU demo on the embedded synthetic data set; `small` is a CPU benchmark size;
`base`, `large` and `giant` are the paper's Table 1 models with its pretraining recipe
(batch 65,536, 500k steps, Adafactor, lr 8e-4, 2% warmup then linear decay, 288 px / 18 px
patches, 64k vocabulary). Every field can be overridden with `--config.FIELD=VALUE`.
"""

import ml_collections

# name: (image size, patch, width, heads, vision layers, vision mlp, text uni, text multi,
#        text mlp, vocab, captioning queries)
_VARIANTS = {
    'tiny': (64, 8, 128, 4, 4, 512, 2, 1, 512, 259, 16),
    'small': (96, 8, 256, 4, 4, 1024, 2, 2, 1024, 32_000, 64),
    'base': (288, 18, 768, 12, 12, 3072, 12, 12, 3072, 64_000, 256),
    'large': (288, 18, 1024, 16, 24, 4096, 12, 12, 4096, 64_000, 256),
    'giant': (288, 18, 1408, 16, 40, 6144, 18, 18, 5632, 64_000, 256),
}


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  if variant not in _VARIANTS:
    raise ValueError(f'Unknown coca variant {variant!r}; known: {sorted(_VARIANTS)}')
  (image_size, patch, width, heads, vision_layers, vision_mlp, uni, multi, text_mlp, vocab,
   queries) = _VARIANTS[variant]
  demo = variant in ('tiny', 'small')

  c = ml_collections.ConfigDict()
  c.seed = 0
  # tiny: tuned to train, evaluate and meet its quality floor in under 10 minutes on a
  # 2-core CPU (README); batch 64 beat 128 and 32 at equal time.
  c.batch_size = 64 if demo else 65_536
  c.total_steps = 720 if demo else 500_000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 360 if demo else 5_000
  c.keep_checkpoints = 3
  c.eval_every_steps = 720 if demo else 10_000
  c.eval_batch_size = 250

  # Mesh axis sizes (-1 = the rest of the devices): the batch is split over data x fsdp,
  # parameters FSDP-style over fsdp and Megatron-style over tensor (see launch/README.md).
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  # Passes per step for memory (GradCache): the contrastive loss still sees the whole batch.
  c.microbatches = 1
  # A step whose loss or gradients are not finite never updates anything. 'skip': count it
  # (train/nonfinite_skipped) and go on, but stop after nan_max_consecutive in a row;
  # 'halt': stop at the first, naming the step and the metric (README "Reliability").
  c.nan_policy = 'skip'
  c.nan_max_consecutive = 5

  c.model = ml_collections.ConfigDict()
  c.model.vision = ml_collections.ConfigDict({
      'patch_size': patch, 'width': width, 'heads': heads, 'layers': vision_layers,
      'mlp_dim': vision_mlp,
      # Conv stem for the CPU-sized models (they learn shapes much faster); plain patchify
      # for the paper's models.
      'stem_channels': (24, 48, 96) if variant == 'tiny' else ()})
  c.model.text = ml_collections.ConfigDict({
      'vocab_size': vocab, 'width': width, 'heads': heads, 'unimodal_layers': uni,
      'multimodal_layers': multi, 'mlp_dim': text_mlp})
  c.model.embed_dim = width
  c.model.captioning_queries = queries
  c.model.pooler = 'cascade'
  # Recompute each transformer block in the backward pass, trading compute for activation
  # memory: 'none', 'full' (keep only block inputs) or 'minimal' (also keep the dense
  # projections' outputs). On XLA:CPU (default flags) it saves memory only with scan_layers.
  c.model.remat = 'none'
  # One nn.scan per stack over layer-stacked parameters: tracing and compiling no longer
  # grow with depth. Parameter paths change (`unimodal_<i>` -> `unimodal`): a checkpoint
  # only loads into a model with the same setting.
  c.model.scan_layers = False

  c.loss = ml_collections.ConfigDict({
      'contrastive_weight': 1.0, 'caption_weight': 2.0,
      # softmax (CLIP/CoCa) or sigmoid (SigLIP, with a learned bias).
      'contrastive_type': 'softmax',
      # gather: all-gather the embeddings (local x global logits per device);
      # ring: pass them round the devices (local x local), for very large batches.
      'contrastive_impl': 'gather'})

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw' if demo else 'adafactor'
  c.optim.learning_rate = 1e-3 if demo else 8e-4
  c.optim.warmup_steps = 50 if demo else 10_000
  c.optim.decay = 'cosine' if demo else 'linear'
  c.optim.weight_decay = 0.05 if demo else 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98 if demo else 0.999
  c.optim.grad_clip_norm = 1.0

  c.data = ml_collections.ConfigDict()
  c.data.train = 'synthetic'
  c.data.eval = 'synthetic:test'
  c.data.eval_examples = 1_000
  c.data.image_size = image_size
  c.data.max_text_len = 64
  c.data.tokenizer = 'bytes'
  # 'resize' (shorter side to image_size, center crop) or 'random_resized_crop' (50-100%
  # of the area, seeded per example: the same for any process count and after a resume).
  c.data.augment = 'resize'
  # tfds:NAME sources: feature keys ('/' for nested ones) and the data directory ('' = TFDS's
  # default). A feature with several captions gives one at random per example.
  c.data.tfds_image_key = 'image'
  c.data.tfds_caption_key = 'captions/text'
  c.data.tfds_data_dir = ''
  # Threads that draw/decode examples ahead of the step; on a 2-core CPU more of them
  # only compete with the step.
  c.data.worker_threads = 1
  # Worker processes (grain mp_prefetch) that decode batches ahead; 0 = in this process.
  # On a 2-core CPU they were slower than the thread (`vlrep.data.bench`); more cores: use.
  c.data.workers = 0

  c.lock()
  return c
