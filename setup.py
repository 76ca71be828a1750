"""vlrep: a JAX/Flax training stack for CoCa-style image-text foundation models."""

from setuptools import find_packages, setup

setup(
    name='vlrep',
    version='0.1.0',
    description='Train, evaluate and load CoCa / CLIP-family image-text models in JAX/Flax.',
    long_description=open('README.md').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['vlrep', 'vlrep.*']),
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
    ],
    extras_require={
        # tfds:NAME sources read with tfds.data_source (no TensorFlow needed for many sets).
        'tfds': ['tensorflow-datasets>=4.9'],
        'test': ['pytest>=8.0', 'tensorflow-datasets>=4.9'],
    },
)
