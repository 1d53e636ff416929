"""trime_fairseq: memory-augmented language models as a fairseq plugin.

Install torch first (the build of fairseq-fixed compiles against it), then this
package without build isolation -- see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="trime_fairseq",
    version="0.1.0",
    description="TRIME (local, long-term and external memory; language models and translation), continuous "
    "cache, kNN-LM, kNN-MT, Transformer-XL and LaMemo as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["trime_fairseq", "trime_fairseq.*"]),
    install_requires=[
        "fairseq-fixed==0.12.3.1",  # imports as `fairseq`; builds on Python 3.11
        "torch>=2.0",
        "numpy",
        "faiss-cpu>=1.8",
        "scipy",  # BM25 batching (sparse products)
        "rank-bm25",
        "sacrebleu",
        "sacremoses",  # MT data preparation (scripts/prepare_multi30k.sh) and detokenised BLEU
        "subword-nmt",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "matplotlib",
        "tensorboardX",  # fairseq's --tensorboard-logdir
    ],
    extras_require={
        # official faiss GPU wheels (same API as faiss-cpu); uninstall faiss-cpu after installing
        "gpu": ["faiss-gpu>=1.15"],
        "test": ["pytest>=7"],
    },
    entry_points={
        "console_scripts": [
            "trime-tune = trime_fairseq.cli.tune:cli_main",
            "trime-build-datastore = trime_fairseq.cli.build_datastore:cli_main",
            "trime-bm25-batches = trime_fairseq.cli.bm25_batches:cli_main",
            "trime-sweep-memory = trime_fairseq.cli.sweep_memory:cli_main",
            "trime-tune-mt = trime_fairseq.cli.tune_mt:cli_main",
            "trime-neighbours = trime_fairseq.cli.neighbours:cli_main",
            "trime-train-skip-predictor = trime_fairseq.cli.train_skip_predictor:cli_main",
            "trime-train-adaptive-knn = trime_fairseq.cli.train_adaptive_knn:cli_main",
            "trime-recall = trime_fairseq.cli.recall:cli_main",
            "trime-retrieve-pairs = trime_fairseq.cli.retrieve_pairs:cli_main",
            "trime-retrieval-accuracy = trime_fairseq.cli.retrieval_accuracy:cli_main",
        ],
    },
)
