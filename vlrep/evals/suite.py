"""The evaluation run during and after training: every metric on the held-out examples.

Loads the eval source once (`config.data.eval`, first `config.data.eval_examples`) and, for
a `Pretrained` model, computes zero-shot accuracy for each task the data set defines,
retrieval recall@1/5 both ways and greedy-captioning CIDEr-D / BLEU-4 / exact match.
Metric names are `eval_name/metric` (e.g. `zeroshot_colour/top1`, `retrieval/i2t_r@1`,
`captioning/cider_greedy`).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from vlrep.data import pipeline
from vlrep.evals import captioning, retrieval, zeroshot
from vlrep.pretrained import Pretrained


class Evaluator:
  def __init__(self, config: ml_collections.ConfigDict):
    self.examples = pipeline.eval_examples(config)
    captions = self.examples['captions']
    # Which caption is right for which image depends on the data only: computed once.
    self.correct_pairs = retrieval.correct_pairs(np.arange(len(captions)), len(captions),
                                                 captions, identical_text_is_hit=True)

  def __call__(self, model: Pretrained) -> dict[str, float]:
    images, captions = self.examples['images'], self.examples['captions']
    image_emb = model.encode_image(images)
    text_emb = model.encode_text(captions)
    results: dict[str, float] = {}
    for task, (class_names, templates) in self.examples['zero_shot_tasks'].items():
      labels = self.examples.get(f'labels/{task}')
      if labels is None:
        continue
      classes = zeroshot.class_embeddings(model.encode_text, class_names, templates)
      results[f'zeroshot_{task}/top1'] = zeroshot.topk_accuracy(image_emb, classes, labels, 1)
    for name, value in retrieval.recall_at_k(image_emb, text_emb, self.correct_pairs,
                                             (1, 5)).items():
      results[f'retrieval/{name}'] = value
    if model.config.model.text.multimodal_layers:
      predictions = dict(enumerate(model.caption(images)))
      references = {i: [c] for i, c in enumerate(captions)}
      results['captioning/cider_greedy'] = captioning.cider_d(predictions, references)
      results['captioning/bleu4_greedy'] = captioning.bleu4(predictions, references)
      results['captioning/exact_match_greedy'] = float(np.mean(
          [captioning.normalize_caption(predictions[i]) == captioning.normalize_caption(c)
           for i, c in enumerate(captions)]))
    return results
