"""The commands' work, as named steps: each module is one thing a user asks for.

``pipeline`` (one fine-tuning run: ``run_finetune``), ``compare`` and
``compare_rows`` (compare-policies), ``auto_policy`` (``--policy auto``),
``shots`` (few-shot learning curves), ``scoring`` (evaluate a model on
videos), ``extract`` (extract-features), ``export`` (ONNX / TorchScript),
``run_model`` (the model a run starts from), ``runs`` (run folders).
"""
