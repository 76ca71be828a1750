"""CoCa configs: `--config=configs/coca.py:VARIANT` with VARIANT in tiny|small|base|large|giant.

`tiny` is the CPU demo on the embedded synthetic data set; `small` is a CPU benchmark size;
`base`, `large` and `giant` are the paper's Table 1 models with its pretraining recipe
(batch 65,536, 500k steps, Adafactor, lr 8e-4, 2% warmup then linear decay, 288 px / 18 px
patches, 64k vocabulary). Every field can be overridden with `--config.FIELD=VALUE`.

`RECIPE@SIZE` (e.g. `base@tiny`) is SIZE's model, data, batch and length trained with
RECIPE's recipe: its optimizer and schedule shape (warmup as the same fraction of the
steps), weight decay, loss weights and dtypes. It checks on a CPU that a paper recipe
learns, before it costs accelerator time.
"""

import ml_collections

from vlrep.evals import entries
from vlrep.parallel import sharding

# name: (image size, patch, width, heads, vision layers, vision mlp, text uni, text multi,
#        text mlp, vocab, captioning queries, text length)
# `small` is the CPU benchmark (`python -m vlrep.bench`): CoCa's proportions at CPU scale, the
# image encoder holding most of the FLOPs and a realistic 32k vocabulary, so that its LM head
# (~11% of the step's FLOPs, `vlrep.tools.flops`) is not what is measured.
_VARIANTS = {
    'tiny': (64, 8, 128, 4, 4, 512, 2, 1, 512, 259, 16, 64),
    'small': (128, 8, 256, 4, 8, 1024, 3, 3, 1024, 32_000, 64, 32),
    'base': (288, 18, 768, 12, 12, 3072, 12, 12, 3072, 64_000, 256, 64),
    'large': (288, 18, 1024, 16, 24, 4096, 12, 12, 4096, 64_000, 256, 64),
    'giant': (288, 18, 1408, 16, 40, 6144, 18, 18, 5632, 64_000, 256, 64),
}


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  recipe, _, size = variant.partition('@')
  if size:
    return _with_recipe(_variant(size), _variant(recipe))
  return _variant(variant)


def _with_recipe(c: ml_collections.ConfigDict,
                 recipe: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  warmup_fraction = recipe.optim.warmup_steps / recipe.total_steps
  c.optim = recipe.optim
  c.optim.warmup_steps = round(warmup_fraction * c.total_steps)
  c.loss.update(contrastive_weight=recipe.loss.contrastive_weight,
                caption_weight=recipe.loss.caption_weight)
  c.model.update(dtype=recipe.model.dtype, param_dtype=recipe.model.param_dtype)
  return c


def _variant(variant: str) -> ml_collections.ConfigDict:
  if variant not in _VARIANTS:
    raise ValueError(f'Unknown coca variant {variant!r}; known: {sorted(_VARIANTS)} '
                     'or RECIPE@SIZE (e.g. base@tiny)')
  (image_size, patch, width, heads, vision_layers, vision_mlp, uni, multi, text_mlp, vocab,
   queries, text_len) = _VARIANTS[variant]
  demo = variant in ('tiny', 'small')

  c = ml_collections.ConfigDict()
  c.seed = 0
  # tiny: tuned to train, evaluate and meet its quality floor in under 10 minutes on a
  # 2-core CPU (README); batch 64 beat 128 and 32 at equal time.
  c.batch_size = 64 if demo else 65_536
  c.total_steps = 720 if demo else 500_000
  c.log_every_steps = 100
  # 'START:COUNT': a jax.profiler trace of those steps in DIR/profile (TensorBoard's profile
  # plugin); '' = none.
  c.profile_steps = ''
  c.checkpoint_every_steps = 360 if demo else 5_000
  c.keep_checkpoints = 3
  c.eval_every_steps = 720 if demo else 10_000
  c.eval_batch_size = 250
  # One named entry per evaluation (types and fields: vlrep/evals/entries.py), each run every
  # eval_every_steps and at the end, or by `python -m vlrep.evaluate`. The demo sizes
  # evaluate on the held-out synthetic split (data.eval); the paper sizes on the TFDS
  # benchmarks (imagenet2012, cifar10/100 zero-shot and probe, coco_captions).
  c.evals = entries.synthetic_evals() if demo else entries.benchmark_evals()
  # Start a new run from these weights (params only): a vlrep run directory, a directory
  # written by Pretrained.save / vlrep.convert, or open_clip:STATE_DICT:MODEL_CFG_JSON
  # (vlrep/weights/init_from.py). '' = random initialisation. A resumed run ignores it.
  c.init_from = ''

  # Mesh axis sizes (-1 = the rest of the devices): the batch is split over data x fsdp,
  # parameters FSDP-style over fsdp and Megatron-style over tensor (see launch/README.md).
  # dcn_data / dcn_fsdp: the ways of those axes across TPU slices or GPU hosts;
  # replicate_max_bytes: the largest array replicated when a dimension does not divide
  # (vlrep/parallel/sharding.py MESH_DEFAULTS, where their defaults live).
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1,
                                      **sharding.MESH_DEFAULTS})
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
      'stem_channels': (24, 48, 96) if variant == 'tiny' else (),
      # Layout options for imported checkpoints (open_clip: `vlrep/weights`), off for ours:
      # CLIP's class token (prepended) and LayerNorm before the blocks, the patch
      # projection's bias, the LayerNorm on the output tokens, LayerNorm epsilon, and
      # LayerScale's initial value (0 = none); uint8 images' RGB mean and std (CLIP's).
      'class_token': False, 'ln_pre': False, 'patch_bias': True, 'final_norm': True,
      'ln_eps': 1e-6, 'layer_scale': 0.0,
      'image_mean': (0.48145466, 0.4578275, 0.40821073),
      'image_std': (0.26862954, 0.26130258, 0.27577711)})
  c.model.text = ml_collections.ConfigDict({
      'vocab_size': vocab, 'width': width, 'heads': heads, 'unimodal_layers': uni,
      'multimodal_layers': multi, 'mlp_dim': text_mlp,
      # Layout options (see vlrep/models/text.py): [CLS] appended or not; the text vector's
      # pooling ('cls' | 'argmax' | 'eos' | 'first' | 'last'); the unimodal padding mask
      # ('pad' | 'shifted' | 'none') and its pad id; the eos id ('eos' pooling); causal or
      # bidirectional unimodal half; the [CLS] position embedding ('last' | 'after_tokens');
      # LayerNorm epsilon and LayerScale of the unimodal half; the multimodal half's heads
      # and MLP width (0 = as the unimodal half), block layout ('fused' | 'split': open_clip's
      # self-attention block then cross-attention block) and LayerScale; output head bias.
      'embed_cls': True, 'pool': 'cls', 'pad_mask': 'pad', 'pad_id': 0, 'eos_id': 2,
      'causal': True, 'cls_position': 'last', 'ln_eps': 1e-6, 'layer_scale': 0.0,
      'multimodal_heads': 0, 'multimodal_mlp_dim': 0, 'multimodal_layout': 'fused',
      'multimodal_layer_scale': 0.0, 'head_bias': True})
  c.model.embed_dim = width
  c.model.captioning_queries = queries
  c.model.pooler = 'cascade'
  # How the contrastive image vector is pooled (see vlrep/models/coca.py): 'attn' (the
  # contrastive pooler; pooler 'cascade' | 'parallel'), or 'tok' / 'avg' (first token /
  # mean of the others; pooler 'single': one pooler whose first query is the contrastive
  # one, as open_clip's CoCa, or 'none': CLIP's class token / mean patch token).
  c.model.image_pool = 'attn'
  # Attentional poolers: heads and query width (0 = the image encoder's), LayerNorm on the
  # queries (open_clip) and on the output (ours); LayerNorm on the pooled vector.
  c.model.pooler_heads = 0
  c.model.pooler_width = 0
  c.model.pooler_query_norm = False
  c.model.pooler_output_norm = True
  c.model.pooled_norm = False
  c.model.text_projection_bias = False
  # SigLIP's attention-pooling head: no LayerNorm on the pooler's context, a residual MLP
  # of this width after it (0 = none), and no image projection.
  c.model.pooler_context_norm = True
  c.model.pooler_mlp_dim = 0
  c.model.image_projection = True
  # MLP activation everywhere: 'gelu_tanh' | 'gelu' (exact) | 'quick_gelu' (OpenAI CLIP).
  c.model.activation = 'gelu_tanh'
  # LayerNorm epsilon of the poolers and the multimodal half (the towers have their own).
  c.model.ln_eps = 1e-6
  # Recompute each transformer block in the backward pass, trading compute for activation
  # memory: 'none', 'full' (keep only block inputs) or 'minimal' (also keep the dense
  # projections' outputs). On XLA:CPU (default flags) it saves memory only with scan_layers.
  c.model.remat = 'none'
  # One nn.scan per stack over layer-stacked parameters: tracing and compiling no longer
  # grow with depth. Parameter paths change (`unimodal_<i>` -> `unimodal`): a checkpoint
  # only loads into a model with the same setting.
  c.model.scan_layers = False
  # Compute dtype of the layers ('float32', 'bfloat16', 'float16'; losses, softmax and the
  # embeddings stay float32) and the stored parameters' dtype (float32 master weights).
  # bfloat16 for the accelerator-sized models, float32 for the CPU-sized ones.
  c.model.dtype = 'float32' if demo else 'bfloat16'
  c.model.param_dtype = 'float32'

  c.loss = ml_collections.ConfigDict({
      'contrastive_weight': 1.0, 'caption_weight': 2.0,
      # softmax (CLIP/CoCa) or sigmoid (SigLIP, with a learned bias).
      'contrastive_type': 'softmax',
      # gather: all-gather the embeddings (local x global logits per device);
      # ring: pass them round the devices (local x local), for very large batches.
      'contrastive_impl': 'gather',
      # Positions per slice of the caption loss: the output head, log-softmax and target
      # gather run a slice at a time, each slice taking its gradients at once (fused), so
      # the float32 [batch, length, vocab] logits never exist; 0 = all positions in one go.
      'caption_chunk': 8})

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw' if demo else 'adafactor'
  c.optim.learning_rate = 1e-3 if demo else 8e-4
  c.optim.warmup_steps = 50 if demo else 10_000
  c.optim.decay = 'cosine' if demo else 'linear'
  c.optim.weight_decay = 0.05 if demo else 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98 if demo else 0.999
  c.optim.grad_clip_norm = 1.0
  # Adafactor factors a parameter's second moments over its two largest dimensions when the
  # smaller of the two is at least this (optax's and Lingvo's 128). Attention kernels
  # [width, heads, 64] then keep full second moments; 64 factors them too, which takes the
  # optimizer state of base/large/giant from 0.65-0.67x AdamW's to 0.50x
  # (benchmarks/optimizer_memory.py).
  c.optim.factor_min_dim = 128

  c.data = ml_collections.ConfigDict()
  c.data.train = 'synthetic'
  c.data.eval = 'synthetic:test'
  c.data.eval_examples = 1_000
  c.data.image_size = image_size
  c.data.max_text_len = text_len
  c.data.tokenizer = 'bytes'
  # 'resize' (shorter side to image_size, center crop) or 'random_resized_crop' (50-100%
  # of the area, seeded per example: the same for any process count and after a resume).
  c.data.augment = 'resize'
  # tfds:NAME sources: feature keys ('/' for nested ones) and the data directory ('' = TFDS's
  # default). A feature with several captions gives one at random per example.
  c.data.tfds_image_key = 'image'
  c.data.tfds_caption_key = 'captions/text'
  c.data.tfds_data_dir = ''
  # Threads that draw/decode examples ahead of the step, and worker processes (grain
  # mp_prefetch) that decode batches ahead (-1 = none, in this process). 0 = chosen from the
  # host's cores (vlrep.data.pipeline.input_workers; `vlrep.data.bench` prints the choice):
  # one thread and no processes on 2 cores, where more only compete with the step.
  c.data.worker_threads = 0
  c.data.workers = 0

  c.lock()
  return c
