"""The one config schema: every field, its type (that of its default), its default and why.

`defaults()` is the complete config (the `tiny` CPU demo's values where a value depends on the
variant); `vlrep.variants` holds the named sizes, recipes and model families built from it,
which the files in `configs/` call. `migrate(saved)` turns a saved `config.json` of any
earlier layout into a current, locked config: a field the saved config lacks takes the value
that reproduces how vlrep ran it before the field existed (`ABSENT`, where that differs from
today's default), and an unknown field is an error naming it. Everything else in vlrep reads
fields without defaults.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from vlrep import optim
from vlrep.evals import entries
from vlrep.models.layers import DEFAULT_LN_EPS
from vlrep.parallel import sharding


def defaults() -> ml_collections.ConfigDict:
  """Every field at its default (the `tiny` variant's values), locked."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # tiny: tuned to train, evaluate and meet its quality floor on a 2-core CPU in the
  # Quickstart's time; batch 64 learned most at equal time (benchmarks/RESULTS.md).
  c.batch_size = 64
  c.total_steps = 720
  c.log_every_steps = 100
  # 'START:COUNT': a jax.profiler trace of those steps in DIR/profile (TensorBoard's profile
  # plugin); '' = none.
  c.profile_steps = ''
  c.checkpoint_every_steps = 360
  c.keep_checkpoints = 3
  c.eval_every_steps = 720
  c.eval_batch_size = 250
  # One named entry per evaluation (types and fields: vlrep/evals/entries.py), each run every
  # eval_every_steps and at the end, or by `python -m vlrep.evaluate`. The demo sizes
  # evaluate on the held-out synthetic split (data.eval); the paper sizes on the TFDS
  # benchmarks (imagenet2012, cifar10/100 zero-shot and probe, coco_captions).
  c.evals = entries.synthetic_evals()
  # Start a new run from these weights (params only): a vlrep run directory, a directory
  # written by Pretrained.save / vlrep.convert, or open_clip:STATE_DICT:MODEL_CFG_JSON
  # (vlrep/weights/init_from.py). '' = random initialisation. A resumed run ignores it.
  c.init_from = ''
  # The part of init_from taken: parameters whose '/'-joined path (e.g.
  # 'text_decoder/multimodal_0/mlp/fc1/kernel') re.fullmatch-es an include pattern (none =
  # all) and no exclude pattern; the rest keep their fresh initialisation, so a CoCa can
  # start from a CLIP run (decoder fresh) or take one tower alone. Full matches, so that
  # 'pos_embed' cannot silently take both towers' tables. Empty = all of it, exactly.
  c.init_from_include = ()
  c.init_from_exclude = ()

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
      'patch_size': 8, 'width': 128, 'heads': 4, 'layers': 4, 'mlp_dim': 512,
      # Conv stem for the CPU-sized models (they learn shapes much faster); plain patchify
      # for the paper's models.
      'stem_channels': (24, 48, 96),
      # Layout options for imported checkpoints (open_clip: `vlrep/weights`), off for ours:
      # CLIP's class token (prepended) and LayerNorm before the blocks, the patch
      # projection's bias, the LayerNorm on the output tokens, LayerNorm epsilon, and
      # LayerScale's initial value (0 = none); uint8 images' RGB mean and std (CLIP's).
      'class_token': False, 'ln_pre': False, 'patch_bias': True, 'final_norm': True,
      'ln_eps': DEFAULT_LN_EPS, 'layer_scale': 0.0,
      'image_mean': (0.48145466, 0.4578275, 0.40821073),
      'image_std': (0.26862954, 0.26130258, 0.27577711)})
  c.model.text = ml_collections.ConfigDict({
      'vocab_size': 259, 'width': 128, 'heads': 4, 'unimodal_layers': 2,
      'multimodal_layers': 1, 'mlp_dim': 512,
      # Layout options (see vlrep/models/text.py): [CLS] appended or not; the text vector's
      # pooling ('cls' | 'argmax' | 'eos' | 'first' | 'last'); the unimodal padding mask
      # ('pad' | 'shifted' | 'none') and its pad id; the eos id ('eos' pooling); causal or
      # bidirectional unimodal half; the [CLS] position embedding ('last' | 'after_tokens');
      # LayerNorm epsilon and LayerScale of the unimodal half; the multimodal half's heads
      # and MLP width (0 = as the unimodal half), block layout ('fused' | 'split': open_clip's
      # self-attention block then cross-attention block) and LayerScale; output head bias.
      'embed_cls': True, 'pool': 'cls', 'pad_mask': 'pad', 'pad_id': 0, 'eos_id': 2,
      'causal': True, 'cls_position': 'last', 'ln_eps': DEFAULT_LN_EPS, 'layer_scale': 0.0,
      'multimodal_heads': 0, 'multimodal_mlp_dim': 0, 'multimodal_layout': 'fused',
      'multimodal_layer_scale': 0.0, 'head_bias': True})
  c.model.embed_dim = 128
  c.model.captioning_queries = 16
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
  # False: a captioning-only model (Cap / CapPa), built without the contrastive pooler,
  # projections, temperature and text [CLS], so that no parameter sits unused; it needs
  # loss.contrastive_weight 0, and its image vector (probes) is the encoder tokens' mean.
  c.model.contrastive = True
  # The classification head (vlrep/models/classifier.py), built only for
  # loss.kind='classification': num_classes outputs on 'embedding' (the image embedding
  # that contrastive and probe evaluations read) or 'attn' (an attentional pooler of its own
  # over the encoder's tokens, any family). Other runs keep their parameter trees unchanged.
  c.model.num_classes = 0
  c.model.classifier_pool = 'embedding'
  # MLP activation everywhere: 'gelu_tanh' | 'gelu' (exact) | 'quick_gelu' (OpenAI CLIP).
  c.model.activation = 'gelu_tanh'
  # LayerNorm epsilon of the poolers and the multimodal half (the towers have their own).
  c.model.ln_eps = DEFAULT_LN_EPS
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
  c.model.dtype = 'float32'
  c.model.param_dtype = 'float32'

  c.loss = ml_collections.ConfigDict({
      'contrastive_weight': 1.0, 'caption_weight': 2.0,
      # softmax (CLIP/CoCa) or sigmoid (SigLIP, with a learned bias).
      'contrastive_type': 'softmax',
      # gather: all-gather the embeddings (local x global logits per device);
      # ring: pass them round the devices (local x local), for very large batches.
      'contrastive_impl': 'gather',
      # How an image and a text are compared: 'global' (one vector each, CLIP) or 'token'
      # (FILIP's late interaction over patch and text-token embeddings, needs
      # model.pooler='none'; vlrep/late_interaction.py). token_similarity_chunk: texts per
      # slice of its token products, each slice a [local images, patches, chunk, tokens]
      # float32 block, so memory follows the device's own images, not the texts it meets
      # (benchmarks/token_similarity_memory.py); 0 = a whole block at once.
      'contrastive_similarity': 'global', 'token_similarity_chunk': 16,
      # Positions per slice of the caption loss: the output head, log-softmax and target
      # gather run a slice at a time, each slice taking its gradients at once (fused), so
      # the float32 [batch, length, vocab] logits never exist; 0 = all positions in one go.
      'caption_chunk': 8,
      # CapPa's parallel prediction: this fraction of each batch's rows (spread evenly over
      # the batch, vlrep/models/text.py `parallel_rows`) read a learned [MASK] at every
      # decoder position with no causal mask, and predict the whole caption at once from the
      # image; the rest are teacher-forced. Needs model.contrastive=False. 0 = off.
      'parallel_fraction': 0.0,
      # What the step minimises: 'pretrain' (the weighted contrastive + caption losses above)
      # or 'classification' (cross-entropy of the classification head's logits on the
      # batch's data.label_key, vlrep/classification.py; fine-tuning, configs/finetune.py).
      'kind': 'pretrain'})

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.optim.decay = 'cosine'
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.grad_clip_norm = 1.0
  # Adafactor factors a parameter's second moments over its two largest dimensions when the
  # smaller of the two is at least this (optax's and Lingvo's 128). Attention kernels
  # [width, heads, 64] then keep full second moments; 64 factors them too, shrinking the
  # paper sizes' optimizer state further (benchmarks/optimizer_memory.py, RESULTS.md).
  c.optim.factor_min_dim = optim.DEFAULT_FACTOR_MIN_DIM
  # Parameter groups (vlrep/param_groups.py), each entry a regex matched against the whole
  # '/'-joined parameter path ('image_encoder/block_0/mlp/fc1/kernel'); one that matches no
  # parameter is an error. freeze: parameters that never change (LiT's locked image tower:
  # ('image_encoder/.*',)), with no gradient, no optimizer state, no weight decay and no
  # share of the clipping norm. lr_multipliers: 'REGEX=FACTOR' entries scaling the update
  # (weight decay included) of the parameters REGEX matches, first match wins, others 1.
  # layer_decay: layer-wise rate decay, block i of L in each stack scaled by
  # layer_decay ** (L - i), its tower's embeddings by layer_decay ** (L + 1); 0 = off.
  # Empty and 0: every parameter trained at the scheduled rate, as before these existed.
  c.optim.freeze = ()
  c.optim.lr_multipliers = ()
  c.optim.layer_decay = 0.0
  # Decay of an exponential moving average of the parameters kept in the train state
  # (vlrep/ema.py `ema_update`, bias-corrected): it averages out the noise of the last
  # ~1/(1 - decay) updates. Evaluations, `vlrep.load` and init_from read it in place of the
  # raw parameters when a checkpoint has it. 0 = off: no EMA in the state or the checkpoints,
  # as before the field existed.
  c.optim.ema_decay = 0.0

  c.data = ml_collections.ConfigDict()
  c.data.train = 'synthetic'
  c.data.eval = 'synthetic:test'
  c.data.eval_examples = 1_000
  c.data.image_size = 64
  c.data.max_text_len = 64
  c.data.tokenizer = 'bytes'
  # 'resize' (shorter side to image_size, center crop) or 'random_resized_crop' (50-100%
  # of the area, seeded per example: the same for any process count and after a resume).
  c.data.augment = 'resize'
  # Frames per training example: 0 = images; T > 0 = the training source holds video clips
  # (`synthetic_video`, video records), T frames sampled uniformly from each, every frame
  # through the image encoder and the tokens of all T pooled together (`CoCa.encode_video`).
  c.data.frames = 0
  # tfds:NAME sources: feature keys ('/' for nested ones) and the data directory ('' = TFDS's
  # default). A feature with several captions gives one at random per example.
  c.data.tfds_image_key = 'image'
  c.data.tfds_caption_key = 'captions/text'
  c.data.tfds_data_dir = ''
  # The training examples' label, read into each batch as `label` when set: a key of the
  # source's examples (the synthetic set's multi-hot 'labels/<task>'; a field of an
  # ArrayRecord record) or a TFDS feature (a ClassLabel: its index). '' = none (pretraining).
  c.data.label_key = ''
  # Threads that draw/decode examples ahead of the step, and worker processes (grain
  # mp_prefetch) that decode batches ahead (-1 = none, in this process). 0 = chosen from the
  # host's cores (vlrep.data.pipeline.input_workers; `vlrep.data.bench` prints the choice):
  # one thread and no processes on 2 cores, where more only compete with the step.
  c.data.worker_threads = 0
  c.data.workers = 0

  c.lock()
  return c


def set_fields(c: ml_collections.ConfigDict, fields: Mapping[str, Any]) -> None:
  """Sets each dotted field path of `fields` ('model.text.width') in `c`; a callable value
  is called for the value (entries.benchmark_evals, ...)."""
  for key, value in fields.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value() if callable(value) else value


# Fields that earlier layouts lack and whose absence meant something else than today's
# default: the value that reproduces how those configs ran. Any other absent field takes its
# default (the feature did not exist, and its default is the old behaviour).
ABSENT: dict[str, Any] = {
    'loss.caption_chunk': 0,  # the plain, unchunked caption loss
    'model.dtype': 'float32',  # before model.dtype every model computed in float32
    'model.vision.stem_channels': (),  # plain patchify before the conv stem
    'evals': entries.legacy_evals,  # the fixed evaluation before config.evals
}
# Tower LayerNorm epsilons absent: that of model.ln_eps (the saved one, if any).
_ABSENT_FROM = {'model.vision.ln_eps': 'model.ln_eps', 'model.text.ln_eps': 'model.ln_eps'}
# Fields of earlier layouts that no longer exist, dropped by name (none so far).
REMOVED: tuple[str, ...] = ()


def _tuples(value: Any) -> Any:
  """JSON gives lists; the config's sequence fields are tuples."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _flat(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, Mapping) and key != 'evals':
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def migrate(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A saved config (the dict of a `config.json`, any earlier layout) as a current config,
  locked. Raises ValueError naming a field the schema does not know."""
  saved = _flat(dict(saved.to_dict() if isinstance(saved, ml_collections.ConfigDict)
                     else saved))
  c = defaults()
  known = _flat(c.to_dict())
  unknown = sorted(k for k in saved if k not in known and k not in REMOVED)
  if unknown:
    raise ValueError(f'saved config field {unknown[0]!r} is not a vlrep config field'
                     + (f' (nor are {unknown[1:]})' if len(unknown) > 1 else ''))
  absent = {k: v for k, v in ABSENT.items() if k not in saved}
  absent.update({k: saved.get(src, known[src]) for k, src in _ABSENT_FROM.items()
                 if k not in saved})
  set_fields(c, {k: _tuples(v) for k, v in saved.items()
           if k not in REMOVED and k != 'evals'})
  if 'evals' in saved:
    c.evals = ml_collections.ConfigDict(_tuples(saved['evals']))
  set_fields(c, {k: (lambda v=v: v(c)) if callable(v) else v for k, v in absent.items()})
  c.unlock()
  c.lock()
  return c
