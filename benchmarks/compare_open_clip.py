"""Training speed of the same CoCa in open_clip (PyTorch, CPU) and in vlrep, in one run.

Builds open_clip's `CoCa` with the architecture of `configs/coca.py:VARIANT` (default
`small`) and vlrep's train step for the same config, then trains both on the same random
batch in interleaved rounds (one step of each per round, after warm-up) so that load from
other processes hits both alike. open_clip: AdamW, `CoCaLoss` (contrastive weight 1,
caption weight 2, PAD ignored), gradient clipping at 1, float32, `torch.set_num_threads`
= the CPU count, `OMP_WAIT_POLICY=PASSIVE` unless set. vlrep: the real `train_step` (`vlrep.tools.bench.compile_step`) of the config.
Prints both examples/s and their ratio; the last line is one JSON object.

Optional dependency (not part of CI): `pip install open_clip_torch torch`. Run from the
repository root:

  python benchmarks/compare_open_clip.py [--variant=small] [--batch=N] [--rounds=3]

Architecture differences that remain (open_clip 3.x's CoCa): each of its multimodal layers
is a self-attention block and a separate cross-attention block, each with its own MLP, so it
has one MLP more per multimodal layer than vlrep's (self-attention, cross-attention, one
MLP); the script counts those FLOPs and prints a per-FLOP ratio as well. It also has a
LayerNorm before the ViT blocks, exact rather than tanh GELU, a bias-free patch embedding and
LM head. Both: cascade poolers (N captioning queries, then one contrastive query), [CLS]
appended at the end of the caption, untied output head.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from config_spec import load_config


def _import_open_clip():
  """open_clip, importable beside CPU torch although it imports torchvision at module level
  (tests/weights/open_clip_shim.py stubs the names it needs when torchvision cannot load)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests',
                                  'weights'))
  import open_clip_shim  # noqa: F401  (before open_clip)
  import open_clip
  return open_clip


def open_clip_model(open_clip, config):
  """open_clip's CoCa with the architecture of a vlrep CoCa config."""
  vision, text, model = config.model.vision, config.model.text, config.model
  if vision.stem_channels:
    raise SystemExit('open_clip has no conv stem: use a variant with stem_channels=()')
  text_cfg = {'context_length': config.data.max_text_len, 'vocab_size': text.vocab_size,
              'width': text.width, 'heads': text.heads, 'layers': text.unimodal_layers,
              'mlp_ratio': text.mlp_dim / text.width, 'embed_cls': True,
              'output_tokens': True, 'pad_id': 0}
  return open_clip.CoCa(
      embed_dim=model.embed_dim,
      vision_cfg={'image_size': config.data.image_size, 'patch_size': vision.patch_size,
                  'width': vision.width, 'layers': vision.layers,
                  'head_width': vision.width // vision.heads,
                  'mlp_ratio': vision.mlp_dim / vision.width,
                  'attentional_pool': model.pooler,
                  'attn_pooler_queries': model.captioning_queries,
                  'attn_pooler_heads': vision.heads, 'output_tokens': True},
      text_cfg=text_cfg,
      multimodal_cfg={'context_length': config.data.max_text_len,
                      'vocab_size': text.vocab_size, 'width': text.width, 'heads': text.heads,
                      'layers': text.multimodal_layers, 'mlp_ratio': text.mlp_dim / text.width},
      pad_id=0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variant', default='small')
  parser.add_argument('--batch', type=int, default=0, help="0: the config's batch_size")
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--precision', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype of both: bfloat16 = vlrep model.dtype=bfloat16 and '
                      'open_clip under torch.autocast (both keep float32 weights)')
  args = parser.parse_args()
  # PyTorch's OpenMP threads otherwise spin after each of its parallel regions, taking the
  # cores from the XLA step that runs next in the interleaved rounds (the measurement:
  # benchmarks/RESULTS.md).
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # read when torch loads OpenMP
  open_clip = _import_open_clip()
  import torch

  from vlrep.tools import bench, flops

  config = load_config(f'configs/coca.py:{args.variant}')
  if args.batch:
    config.batch_size = args.batch
  config.model.dtype = args.precision
  batch_np = bench.synthetic_batch(config)

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = open_clip_model(open_clip, config)
  model.train()
  loss_fn = open_clip.CoCaLoss(caption_loss_weight=config.loss.caption_weight,
                               clip_loss_weight=config.loss.contrastive_weight, pad_id=0)
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.learning_rate,
                                betas=(config.optim.b1, config.optim.b2),
                                weight_decay=config.optim.weight_decay)
  mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
  std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
  images = torch.from_numpy(batch_np['images']).permute(0, 3, 1, 2).float() / 255.0
  images = (images - mean) / std
  tokens = torch.from_numpy(batch_np['tokens']).long()

  def torch_step() -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.precision == 'bfloat16'):
      out = model(images, tokens)
      # open_clip's (marked work-in-progress) cascade pooler leaves the query axis: [B, 1, E].
      image_features = out['image_features'].reshape(len(tokens), -1)
      losses = loss_fn(image_features, out['text_features'], out['logits'],
                       out['labels'], out['logit_scale'])
      loss = sum(losses)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
    optimizer.step()
    if not torch.isfinite(loss):
      raise FloatingPointError('open_clip loss is not finite')
    return time.perf_counter() - start

  vlrep_step = bench.compile_step(config)
  print(f'vlrep compiled in {vlrep_step.compile_s:.1f} s; open_clip {sum(p.numel() for p in model.parameters()):,} '
        f'parameters, {threads} threads', flush=True)
  for _ in range(bench.WARMUP_STEPS):
    torch_step()
  vlrep_step.run(bench.WARMUP_STEPS)
  times = {'open_clip': [], 'vlrep': []}
  for _ in range(args.rounds):
    times['open_clip'].append(torch_step())
    times['vlrep'] += vlrep_step.run(1)

  ours = flops.train_flops_per_step(config)['total']
  text = config.model.text
  extra_mlps = (flops.TRAIN_FORWARD_MULTIPLE * config.batch_size * text.multimodal_layers *
                2 * 2 * (config.data.max_text_len - 1) * text.width * text.mlp_dim)
  model_flops = {'open_clip': ours + extra_mlps, 'vlrep': ours}
  results = {}
  print(f'coca.py:{args.variant}, batch {config.batch_size}, {args.precision}, {args.rounds} interleaved rounds '
        f'(median step; spread = max/min - 1)')
  print(f'{"framework":>10s} {"step s":>8s} {"spread":>7s} {"examples/s":>11s} {"GFLOP/step":>11s} '
        f'{"GFLOP/s":>8s}')
  for name, values in times.items():
    median = statistics.median(values)
    results[name] = {'step_s': round(median, 4), 'examples_per_s': round(config.batch_size / median, 2),
                     'spread': round(max(values) / min(values) - 1, 3),
                     'model_flops_per_step': model_flops[name],
                     'gflops_per_s': round(model_flops[name] / median / 1e9, 2)}
    r = results[name]
    print(f'{name:>10s} {median:8.3f} {r["spread"]:7.1%} {r["examples_per_s"]:11.2f} '
          f'{model_flops[name] / 1e9:11.1f} {r["gflops_per_s"]:8.1f}')
  speedup = results['vlrep']['examples_per_s'] / results['open_clip']['examples_per_s']
  per_flop = results['vlrep']['gflops_per_s'] / results['open_clip']['gflops_per_s']
  print(f'vlrep / open_clip: {speedup:.2f}x examples/s, {per_flop:.2f}x FLOP/s')
  print(json.dumps({'variant': args.variant, 'batch_size': config.batch_size,
                    'precision': args.precision,
                    'rounds': args.rounds, 'threads': threads, **results,
                    'examples_per_s_ratio': round(speedup, 3),
                    'flops_per_s_ratio': round(per_flop, 3)}))


if __name__ == '__main__':
  main()
